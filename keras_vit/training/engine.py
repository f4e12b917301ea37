"""`train(config)`: one training run under a `tf.distribute` strategy with `model.fit`.

Structure of a run (MODEL_DIR layout in keras_vit/loading.py and docs/training.md):
  strategy from --strategy -> (optional) data conversion -> model, optimizer, loss, metrics
  under strategy.scope() -> data through strategy.distribute_datasets_from_function(
  pipelines.build_dataset) -> model.fit in Keras "epochs" of --checkpoint_every_steps updates
  (BackupAndRestore, ModelCheckpoint, TensorBoard, eval every --eval_every_steps) ->
  final evaluation -> results.json, model.keras, class_names.json (chief only).
"""

import json
import os
import statistics
import time

import keras
import tensorflow as tf
from absl import logging

import pipelines
from keras_vit.checkpoints import from_npz
from keras_vit.loading import MODEL_FILENAME, write_class_names
from keras_vit.model import create_model
from keras_vit.training import callbacks as callbacks_lib
from keras_vit.training import strategy as strategy_lib
from keras_vit.training.config import MIXED_PRECISION, ConfigError, parse_model, validate
from keras_vit.training.losses import ClassificationLoss
from keras_vit.training.metrics import TopKAccuracy
from keras_vit.training.optimizers import build_optimizer
from keras_vit.training.schedules import WarmupDecay

RESULTS_FILENAME = "results.json"


def prepare_data(config, strategy):
    """Converts --prepare_data into --train_data / --eval_data when they lack their split."""
    if not config.prepare_data:
        return
    targets = [(config.train_data, config.train_split)]
    if config.eval_data:
        targets.append((config.eval_data, config.eval_split))
    for directory, split in targets:
        info = pipelines.load_dataset_info(directory) if os.path.isdir(directory) else None
        if info and split in info.get("splits", {}):
            logging.info("%s already holds split %r; not converting.", directory, split)
            continue
        if strategy_lib.is_multi_worker(strategy):
            raise ConfigError(
                f"--prepare_data={config.prepare_data!r}: {directory} lacks split {split!r} and "
                "workers cannot convert concurrently; convert first with tools/convert_data.py."
            )
        logging.info("Converting %s split %r into %s.", config.prepare_data, split, directory)
        pipelines.convert(config.prepare_data, directory, split=split)


def build_model(config, num_classes):
    """The ViT of --model (a variant, a custom d.._l.._h.._m.._p.. size, or npz:PATH)."""
    parsed = parse_model(config.model)
    dropout = dict(
        dropout_rate=config.dropout_rate,
        attention_dropout_rate=config.attention_dropout_rate,
        stochastic_depth_rate=config.stochastic_depth_rate,
    )
    if isinstance(parsed, str):
        return from_npz(parsed, image_size=config.image_size, num_classes=num_classes, **dropout)
    return create_model(
        parsed,
        image_size=config.image_size,
        num_classes=num_classes,
        pooling=config.pooling,
        representation_size=config.representation_size or None,
        **dropout,
    )


#: --augment flag value -> `pipelines.build_dataset(augment=...)`.
_AUGMENT_MODES = {"crop_flip": "inception_crop", "none": "none"}


def make_datasets(config, strategy, num_classes):
    """(train, eval or None) distributed datasets; batches are per replica inside."""
    tfds_dir = config.tfds_data_dir or None

    def train_fn(context):
        batch_size = context.get_per_replica_batch_size(config.micro_batch_size)
        return pipelines.build_dataset(
            config.train_data,
            split=config.train_split,
            image_size=config.image_size,
            batch_size=batch_size,
            input_context=context,
            training=True,
            num_classes=num_classes,
            shuffle_buffer=config.shuffle_buffer,
            cache=config.cache_data,
            augment=_AUGMENT_MODES[config.augment],
            randaugment=config.randaugment or None,
            mixup_alpha=config.mixup_alpha,
            resize_kernel=config.resize_kernel,
            tfds_data_dir=tfds_dir,
            # The same seed in every input pipeline: pipelines that share files and keep
            # every n-th record must shuffle the file list identically.
            seed=config.seed,
            deterministic=config.deterministic,
        )

    def eval_fn(context):
        batch = config.eval_batch_size or config.micro_batch_size
        return pipelines.build_dataset(
            config.eval_data,
            split=config.eval_split,
            image_size=config.image_size,
            batch_size=context.get_per_replica_batch_size(batch),
            input_context=context,
            training=False,
            num_classes=num_classes,
            tfds_data_dir=tfds_dir,
        )

    train = strategy.distribute_datasets_from_function(train_fn)
    evaluation = strategy.distribute_datasets_from_function(eval_fn) if config.eval_data else None
    return train, evaluation


def compile_model(model, config, num_classes):
    """Attaches optimizer (with the schedule), loss and top-1/top-5 metrics; call in scope."""
    schedule = WarmupDecay(
        config.learning_rate,
        total_steps=config.total_steps,
        warmup_steps=config.warmup_steps,
        decay=config.decay,
        end_learning_rate=config.end_learning_rate,
        steps_per_update=config.grad_accum_steps,
    )
    optimizer = build_optimizer(
        config.optimizer,
        schedule,
        model=model,
        momentum=config.momentum,
        beta1=config.beta1,
        beta2=config.beta2,
        weight_decay=config.weight_decay,
        weight_decay_exclude=config.weight_decay_exclude,
        global_clipnorm=config.grad_clip_norm or None,
        gradient_accumulation_steps=config.grad_accum_steps,
    )
    metrics = [TopKAccuracy(1)]
    if num_classes > 5:
        metrics.append(TopKAccuracy(5))
    model.compile(
        optimizer=optimizer,
        loss=ClassificationLoss(config.loss, num_classes, config.label_smoothing),
        metrics=metrics,
        jit_compile=config.jit_compile,
        steps_per_execution=config.steps_per_execution,
    )
    return model


def make_callbacks(config, strategy, chief):
    """The callback list; shared files are written by the chief only."""
    task_type, task_id = strategy_lib.worker_index(strategy)
    backup_dir = os.path.join(config.model_dir, "backup")
    if not chief:
        # Every worker restores its own copy; they hold the same synchronous state.
        backup_dir = os.path.join(backup_dir, f"{task_type}_{task_id}")
    throughput = callbacks_lib.StepAndThroughput(config.micro_batch_size, config.grad_accum_steps)
    callbacks = [
        throughput,
        callbacks_lib.TerminateOnNaN(config.grad_accum_steps),
        # Keras epoch = --checkpoint_every_steps updates, so "epoch" saving is per chunk.
        keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch", delete_checkpoint=False),
        callbacks_lib.QuietEndOfEvaluationData(),
    ]
    if chief:
        checkpoints = os.path.join(config.model_dir, "checkpoints")
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                os.path.join(checkpoints, "ckpt-{step:07d}.weights.h5"),
                save_weights_only=True,
                save_freq="epoch",
            ),
            callbacks_lib.PruneCheckpoints(
                os.path.join(checkpoints, "ckpt-*.weights.h5"), config.keep_checkpoints),
            keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs"), update_freq="epoch"),
        ]
    return callbacks, throughput


def _metric(logs, name):
    value = logs.get(name)
    return None if value is None else float(value)


def train(config):
    """Runs the training of `config` (a TrainConfig); returns the results dict.

    Raises:
        ConfigError: a bad setting (before any work starts when it can be told from flags).
        callbacks.TrainingNaNError: the loss became NaN/Inf.
    """
    validate(config)
    strategy = strategy_lib.create_strategy(config.strategy, config.tpu or None)
    replicas = strategy.num_replicas_in_sync
    validate(config, replicas)
    if strategy_lib.is_multi_worker(strategy) and config.steps_per_execution > 1:
        # Measured with Keras 3.15: the multi-step loop fails under MultiWorkerMirroredStrategy
        # ("You must feed a value for placeholder tensor ... multi_step_on_iterator").
        raise ConfigError(f"--steps_per_execution={config.steps_per_execution}: must be 1 under "
                          "MultiWorkerMirroredStrategy (Keras's multi-step loop fails there).")
    chief = strategy_lib.is_chief(strategy)
    logging.info("Strategy %s with %d replica(s); this process is %s.",
                 type(strategy).__name__, replicas, "the chief" if chief else "a worker")
    prepare_data(config, strategy)
    if config.eval_data:
        for flag in ("train_data", "eval_data"):
            source = getattr(config, flag)
            if not source.startswith("tfds:") and not tf.io.gfile.glob(source) and not tf.io.gfile.isdir(source):
                raise ConfigError(f"--{flag}={source!r}: no such directory or file pattern. "
                                  "Convert data with tools/convert_data.py or use --prepare_data.")
    class_names, num_train = pipelines.describe_source(
        config.train_data, config.train_split, config.tfds_data_dir or None
    )
    num_classes = config.num_classes or (len(class_names) if class_names else 0)
    if not num_classes:
        raise ConfigError(f"--num_classes=0: {config.train_data} records no class names; "
                          "pass --num_classes.")
    if class_names and len(class_names) != num_classes:
        logging.warning("--num_classes=%d but %s names %d classes; using generic names.",
                        num_classes, config.train_data, len(class_names))
        class_names = None
    class_names = class_names or [str(index) for index in range(num_classes)]
    keras.utils.set_random_seed(config.seed)

    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(MIXED_PRECISION[config.mixed_precision] or "float32")
    try:
        with strategy.scope():
            model = build_model(config, num_classes)
            compile_model(model, config, num_classes)
        strategy_lib.fix_multi_worker_fit(model, strategy)
        train_data, eval_data = make_datasets(config, strategy, num_classes)
        callbacks, throughput = make_callbacks(config, strategy, chief)
        updates_per_epoch = config.checkpoint_every_steps
        epochs = config.total_steps // updates_per_epoch
        start = time.perf_counter()
        model.fit(
            train_data,
            epochs=epochs,
            steps_per_epoch=updates_per_epoch * config.grad_accum_steps,
            validation_data=eval_data,
            validation_freq=config.eval_every_steps // updates_per_epoch,
            callbacks=callbacks,
            shuffle=False,  # the input pipeline shuffles
            verbose=1 if chief else 0,
        )
        train_seconds = time.perf_counter() - start
        steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        evaluation = {}
        if eval_data is not None:
            evaluation = model.evaluate(eval_data, return_dict=True, verbose=1 if chief else 0,
                                        callbacks=[callbacks_lib.QuietEndOfEvaluationData()])
        rates = [rate for _, rate in throughput.history]
        results = {
            "eval_top1": _metric(evaluation, "top1"),
            "eval_top5": _metric(evaluation, "top5"),
            "eval_loss": _metric(evaluation, "loss"),
            "steps": steps,
            "total_steps": config.total_steps,
            # Update step this process started training from: > 0 when it resumed from backup/.
            "resumed_from_step": throughput.first_step if throughput.first_step is not None else steps,
            # The first chunk of a run includes tracing/compilation; leave it out when others exist.
            "train_images_per_sec": statistics.median(rates[1:] or rates) if rates else None,
            "train_seconds": train_seconds,
            "global_batch_size": config.global_batch_size,
            "num_replicas": replicas,
            "strategy": type(strategy).__name__,
            "num_classes": num_classes,
            "num_train_examples": num_train,
            "keras_version": keras.version(),
            "tensorflow_version": tf.__version__,
        }
        if chief:
            os.makedirs(config.model_dir, exist_ok=True)
            # An inference copy of the graph (same layers, no optimizer or compile state), so
            # loading it needs nothing from keras_vit.training.
            inference = keras.Model(model.inputs, model.outputs, name=model.name)
            inference.save(os.path.join(config.model_dir, MODEL_FILENAME))
            write_class_names(class_names, config.model_dir)
            with open(os.path.join(config.model_dir, RESULTS_FILENAME), "w") as stream:
                json.dump(results, stream, indent=1)
        return results
    finally:
        keras.config.set_dtype_policy(previous_policy)
