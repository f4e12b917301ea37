r"""Trains a Vision Transformer: `python tools/train.py --flagfile=configs/NAME.flags [--flag=...]`.

    python tools/train.py --flagfile=configs/demo.flags            # CPU demo on sklearn digits
    python tools/train.py --flagfile=configs/cifar10_b16.flags \
        --train_data=/data/cifar10 --model=npz:ViT-B_16.npz --model_dir=/tmp/c10

One process per host; the strategy comes from --strategy (auto: TPU if --tpu, multi-worker if
TF_CONFIG names several tasks, all GPUs of the host otherwise). Kill it and start it again with
the same flags: it resumes from MODEL_DIR/backup. See docs/training.md.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vit.training import config as config_lib  # noqa: E402
from keras_vit.training import engine  # noqa: E402
from keras_vit.training.callbacks import TrainingNaNError  # noqa: E402
from keras_vit import cli  # noqa: E402

HELP = {
    "model": "B/16 (any keras_vit variant), npz:PATH (a Google checkpoint to fine-tune), or "
             "d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch> for a custom size.",
    "image_size": "Training and eval resolution in pixels (multiple of the patch size).",
    "num_classes": "Classes of the head; 0 = from the training data's dataset_info.json.",
    "pooling": "token (class token) or gap (global average pooling).",
    "representation_size": "Width of the pre-logits Dense+tanh layer (pre-training); 0 = none.",
    "dropout_rate": "Dropout after embeddings, attention and MLP.",
    "attention_dropout_rate": "Dropout on attention probabilities.",
    "stochastic_depth_rate": "Drop-path rate of the last block.",
    "train_data": "Converted directory, TFRecord pattern or tfds:NAME (pipelines.build_dataset).",
    "eval_data": "Same for evaluation; empty = no evaluation.",
    "train_split": "Split of --train_data to train on.",
    "eval_split": "Split of --eval_data to evaluate on.",
    "prepare_data": "A converter source (e.g. digits:) to convert into --train_data/--eval_data "
                    "when they lack their split; empty = data must exist.",
    "tfds_data_dir": "Data dir of prepared TFDS datasets.",
    "shuffle_buffer": "Records in the training shuffle buffer.",
    "cache_data": "Cache the serialized training records in memory (small datasets).",
    "augment": "crop_flip: Inception crop + horizontal flip (pipelines' training transform); "
               "none: the eval preprocessing only, for data a crop or flip would mislabel.",
    "randaugment": "'NUM_LAYERS,MAGNITUDE' such as '2,10'; empty = none.",
    "mixup_alpha": "Mixup Beta(alpha, alpha); 0 = none.",
    "resize_kernel": "Training resize+flip: compiled (a C++ op built on first use), tensorflow "
                     "(TF's ops), or auto (compiled where it builds). See docs/data.md.",
    "global_batch_size": "Images per optimizer update, over all replicas and accumulation steps.",
    "eval_batch_size": "Global eval batch; 0 = global_batch_size / grad_accum_steps.",
    "optimizer": "sgd (momentum), adam or adamw.",
    "learning_rate": "Peak learning rate (after warmup).",
    "momentum": "SGD momentum.",
    "beta1": "Adam beta1.",
    "beta2": "Adam beta2.",
    "weight_decay": "Decoupled weight decay (w -= lr * wd * w); 0 = none.",
    "weight_decay_exclude": "Variable groups without weight decay: bias, norm, embedding.",
    "warmup_steps": "Updates of linear warmup.",
    "total_steps": "Optimizer updates of the whole run.",
    "decay": "cosine, linear or constant decay after warmup.",
    "end_learning_rate": "Learning rate reached at --total_steps.",
    "grad_clip_norm": "Clip gradients to this global norm; 0 = no clipping.",
    "grad_accum_steps": "Micro-batches averaged per update (memory: batch / this per pass).",
    "label_smoothing": "Label smoothing epsilon.",
    "loss": "softmax or sigmoid cross-entropy.",
    "mixed_precision": "none, bfloat16 or float16 (Keras mixed policy; logits/loss in float32).",
    "jit_compile": "Compile the train step with XLA.",
    "steps_per_execution": "Micro-steps per tf.function call.",
    "strategy": "auto, default, mirrored, multi_worker or tpu.",
    "tpu": "TPU name or grpc:// address ('local' on a TPU VM).",
    "model_dir": "Checkpoints, logs, backup, model.keras, results.json.",
    "eval_every_steps": "Evaluate every this many updates (a multiple of checkpoint_every_steps).",
    "checkpoint_every_steps": "Back up and checkpoint every this many updates.",
    "keep_checkpoints": "Keep the newest N files in MODEL_DIR/checkpoints (0 = all).",
    "seed": "Seed of initialization, data order and augmentation.",
    "deterministic": "Deterministic input pipeline (slower).",
}

_ENUMS = {
    "pooling": config_lib.POOLINGS,
    "augment": config_lib.AUGMENTS,
    "resize_kernel": config_lib.RESIZE_KERNELS,
    "optimizer": config_lib.OPTIMIZERS,
    "decay": config_lib.DECAYS,
    "loss": config_lib.LOSSES,
    "mixed_precision": tuple(config_lib.MIXED_PRECISION),
    "strategy": config_lib.STRATEGIES,
}


def _define_flags():
    for field in dataclasses.fields(config_lib.TrainConfig):
        name, default = field.name, field.default
        if name in _ENUMS:
            flags.DEFINE_enum(name, default, _ENUMS[name], HELP[name])
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, HELP[name])
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, HELP[name])
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, HELP[name])
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, list(default), HELP[name])
        else:
            flags.DEFINE_string(name, default, HELP[name])


_define_flags()


def config_from_flags():
    values = {}
    for field in dataclasses.fields(config_lib.TrainConfig):
        value = flags.FLAGS[field.name].value
        values[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    return config_lib.TrainConfig(**values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; every setting is a --flag.")
    config = config_from_flags()
    try:
        config_lib.validate(config)
        results = engine.train(config)
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingNaNError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(json.dumps({"model_dir": config.model_dir, **results}, indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
