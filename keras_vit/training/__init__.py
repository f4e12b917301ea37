"""Training pieces for keras_vit: schedules, optimizers, losses, metrics, strategies, the engine.

    from keras_vit.training import TrainConfig, train
    results = train(TrainConfig(model="S/16", train_data="/data/i1k", ...))

Each piece also works on its own with `model.fit` in a script of yours.
"""

from keras_vit.training.backup import AtomicBackupAndRestore, AtomicWeightsCheckpoint, BackupError
from keras_vit.training.callbacks import StepAndThroughput, TerminateOnNaN, TrainingNaNError
from keras_vit.training.config import ConfigError, TrainConfig, parse_model, validate
from keras_vit.training.distillation import (DistillationError, DistillationLoss, Distiller,
                                             distillation_loss, load_teacher)
from keras_vit.training.ema import (EmaError, EmaEvaluation, copy_ema_into_model, ema_weights,
                                    evaluate_with_ema)
from keras_vit.training.engine import RESULTS_FILENAME, build_model, compile_model, train
from keras_vit.training.layer_decay import (LayerDecayError, layer_ids,
                                            learning_rate_multipliers)
from keras_vit.training.losses import ClassificationLoss
from keras_vit.training.metrics import TopKAccuracy
from keras_vit.training.multi_worker_fix import fix_multi_worker_fit
from keras_vit.training.optimizers import build_optimizer, no_decay_variables
from keras_vit.training.schedules import WarmupDecay
from keras_vit.training.strategy import create_strategy, is_chief
