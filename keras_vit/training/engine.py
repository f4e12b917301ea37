"""`train(config)`: one training run under a `tf.distribute` strategy with `model.fit`.

Structure of a run (MODEL_DIR layout in keras_vit/loading.py and docs/training.md):
  strategy from --strategy -> (optional) data conversion -> model (inside DeiT's Distiller with
  --teacher), optimizer (layer decay, EMA), loss, metrics under strategy.scope() -> data
  through strategy.distribute_datasets_from_function(pipelines.build_dataset) -> model.fit in
  Keras "epochs" of --checkpoint_every_steps updates (atomic backup and checkpoints,
  TensorBoard every --log_every_steps, eval (and EMA eval) every --eval_every_steps) ->
  final evaluation -> results.json, model.keras, class_names.json (chief only).
"""

import contextlib
import json
import os
import statistics
import time
from typing import NamedTuple

import keras
import tensorflow as tf
from absl import logging

import pipelines
from keras_vit import probes
from keras_vit.class_names import fallback_class_names, write_class_names
from keras_vit.loading import MODEL_FILENAME
from keras_vit.model import create_model
from keras_vit.sources import from_checkpoint
from keras_vit.training import backup as backup_lib
from keras_vit.training import callbacks as callbacks_lib
from keras_vit.training import distillation
from keras_vit.training import ema as ema_lib
from keras_vit.training import strategy as strategy_lib
from keras_vit.training.config import MIXED_PRECISION, ConfigError, parse_model, validate
from keras_vit.training.fewshot_logging import FewshotLogging
from keras_vit.training.losses import ClassificationLoss
from keras_vit.training.metrics import TopKAccuracy
from keras_vit.training.multi_worker_fix import fix_multi_worker_fit
from keras_vit.training.optimizers import build_optimizer
from keras_vit.training.schedules import WarmupDecay

RESULTS_FILENAME = "results.json"


def prepare_data(config, strategy):
    """Converts --prepare_data into --train_data / --eval_data when they lack their split.

    Args:
        config: the `TrainConfig`; nothing happens when its `prepare_data` is empty.
        strategy: the run's strategy; workers of a multi-worker cluster cannot convert.

    Raises:
        ConfigError: a split is missing under a multi-worker strategy.
    """
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
    """The ViT of --model (a variant, a custom d.._l.._h.._m.._p.. size, pretrained:NAME or
    checkpoint:PATH).

    Args:
        config: the `TrainConfig` (model, image size, pooling, dropout rates, distillation
            token, rematerialisation).
        num_classes: K, the width of the head.

    Returns:
        A `keras.Model` from images `(batch, image_size, image_size, 3)` to logits
        `(batch, K)`; from a checkpoint, with its encoder's weights (and its architecture and
        input normalisation) and a new zero head where K differs from the checkpoint's.
    """
    parsed = parse_model(config.model)
    training_options = dict(
        dropout_rate=config.dropout_rate,
        attention_dropout_rate=config.attention_dropout_rate,
        stochastic_depth_rate=config.stochastic_depth_rate,
        remat=config.remat,
    )
    if isinstance(parsed, str):
        return from_checkpoint(parsed, image_size=config.image_size, num_classes=num_classes,
                               **training_options)
    architecture = {"distillation_token": True} if config.distillation_token else {}
    return create_model(
        parsed,
        image_size=config.image_size,
        num_classes=num_classes,
        pooling=config.pooling,
        representation_size=config.representation_size or None,
        **training_options,
        **architecture,
    )


def build_training_model(config, num_classes):
    """`build_model`'s student, inside DeiT's `Distiller` when --teacher is set.

    Returns:
        (model to compile and fit, the student: the model that is evaluated and saved).
    """
    student = build_model(config, num_classes)
    if not config.teacher:
        return student, student
    teacher = distillation.load_teacher(config.teacher, num_classes=num_classes,
                                        image_size=config.image_size)
    distiller = distillation.Distiller(student, teacher, kind=config.distillation,
                                       alpha=config.distillation_alpha,
                                       tau=config.distillation_tau)
    return distiller, student


def input_normalization(model):
    """(mean, std): the per-channel [0, 255] pixel values the model normalises to 0 and 1.

    Random erasing fills its box with `mean + std * N(0, 1)`, which the model's normalisation
    turns into timm's N(0, 1) noise on normalised images.
    """
    layer = model.get_layer("rescale")
    return (tuple(255.0 * m for m in layer.mean), tuple(255.0 * s for s in layer.std))


#: --augment flag value -> `pipelines.build_dataset(augment=...)`.
_AUGMENT_MODES = {"crop_flip": "inception_crop", "none": "none"}


def _augmentation_arguments(config, normalization):
    """The `pipelines.build_dataset` arguments of the training augmentation flags."""
    mean, std = normalization
    return dict(
        augment=_AUGMENT_MODES[config.augment],
        randaugment=config.randaugment or None,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        mixup_prob=config.mixup_prob,
        mixup_switch_prob=config.mixup_switch_prob,
        random_erase=config.random_erase,
        erase_mean=mean,
        erase_std=std,
        aug_repeats=config.aug_repeats,
        crop_sampler=config.crop_sampler,
        crop_area_range=(config.crop_min_area, 1.0),
        resize_kernel=config.resize_kernel,
    )


def make_datasets(config, strategy, num_classes, resume_step=0, normalization=None,
                  dropped=None):
    """The training and evaluation data, distributed over `strategy`'s replicas.

    Args:
        config: the `TrainConfig` (data sources, splits, batch sizes, augmentation).
        strategy: the `tf.distribute.Strategy`; each input pipeline reads its own shard.
        num_classes: K, for the labels (soft `(batch, K)` under mixup or CutMix).
        resume_step: the update step the run resumes from (0 for a new run); the training data
            then skips what those steps consumed (`examples_to_skip`).
        normalization: (mean, std) of the model's input normalisation in [0, 255] pixels
            (`input_normalization`), for random erasing; None: Google's (127.5, 127.5).
        dropped: with --deterministic, {input pipeline id: `pipelines.DroppedPositions`}: where
            earlier runs dropped undecodable training records (the skip goes past them), and
            where each pipeline drops them (a new entry for a pipeline without one); saved in
            each backup (`make_callbacks`). None: not tracked.

    Returns:
        (train, eval): distributed datasets of `(images, labels)` batches, per replica
        `micro_batch_size / replicas` images for training; eval is None without --eval_data.
    """
    tfds_dir = config.tfds_data_dir or None
    augmentation = _augmentation_arguments(
        config, normalization or ((127.5,) * 3, (127.5,) * 3))

    def train_fn(context):
        batch_size = context.get_per_replica_batch_size(config.micro_batch_size)
        skip = examples_to_skip(config, strategy, context, batch_size, resume_step)
        positions = None
        if dropped is not None and config.deterministic:
            positions = dropped.setdefault(context.input_pipeline_id, pipelines.DroppedPositions())
        if skip:
            among = (positions.resume_position(skip) - skip) if positions else 0
            logging.info("Resuming at step %d: the training data skips the %d examples it "
                         "delivered before%s.", resume_step, skip,
                         f" and the {among} undecodable records it dropped among them"
                         if among else "")
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
            **augmentation,
            tfds_data_dir=tfds_dir,
            # The same seed in every input pipeline: pipelines that share files and keep
            # every n-th record must shuffle the file list identically.
            seed=config.seed,
            deterministic=config.deterministic,
            skip_examples=skip,
            dropped_positions=positions,
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
    """Attaches optimizer (with the schedule, layer decay and EMA), loss and top-1/top-5
    metrics; call in scope.

    Args:
        model: the `keras.Model` of `build_model` (or `build_training_model`'s Distiller),
            built under the strategy's scope.
        config: the `TrainConfig` (optimizer, schedule, loss, compilation settings).
        num_classes: K; top-5 accuracy is tracked only when K > 5.

    Returns:
        `model`, compiled.
    """
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
        model=getattr(model, "student", model),  # a Distiller's teacher is not trained
        momentum=config.momentum,
        beta1=config.beta1,
        beta2=config.beta2,
        weight_decay=config.weight_decay,
        weight_decay_exclude=config.weight_decay_exclude,
        global_clipnorm=config.grad_clip_norm or None,
        gradient_accumulation_steps=config.grad_accum_steps,
        layer_decay=config.layer_decay,
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
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


def backup_directory(config, strategy, chief):
    """MODEL_DIR/backup for the chief, MODEL_DIR/backup/{task_type}_{task_id} for a worker."""
    backup_dir = os.path.join(config.model_dir, "backup")
    if chief:
        return backup_dir
    # Every worker restores its own copy; they hold the same synchronous state.
    task_type, task_id = strategy_lib.worker_index(strategy)
    return os.path.join(backup_dir, f"{task_type}_{task_id}")


class Resume(NamedTuple):
    """Where a run resumes (`_resume_step`)."""

    step: int  # the update step, 0 for a new run
    verified: bool  # this worker's backup of `step` was checked against its manifest just now


def _resume_step(config, strategy, chief, below=None, earlier_failures=()):
    """The update step the run resumes from: its newest complete backup's (older than `below`),
    or in a multi-worker run the smallest of the workers' (a worker killed between two backups
    is one behind).

    Returns:
        The `Resume`.

    Raises:
        BackupError: this worker's, or another worker's, backups exist but none can be restored.
    """
    backup_dir = backup_directory(config, strategy, chief)
    try:
        newest = backup_lib.newest_complete_step(backup_dir, below, earlier_failures)
        if not newest and below is None:
            newest = backup_lib.keras_backup_step(backup_dir, config.checkpoint_every_steps) or 0
        failure = None
    except backup_lib.BackupError as error:
        newest, failure = -1, error  # told to the other workers first, which would wait
    agreed = strategy_lib.smallest_over_workers(strategy, newest)
    if failure is not None:
        raise failure
    if agreed < 0:
        raise backup_lib.BackupError(
            "Another worker's backups exist but none of them can be restored (its log names "
            "them): put a good copy back there, or move every worker's backup directory away "
            "to train anew.")
    if agreed != newest:
        logging.warning("This worker's newest backup is of update step %d, another worker's of "
                        "%d: every worker resumes from %d.", newest, agreed, agreed)
    return Resume(agreed, agreed == newest)


_DROPPED_KEY = "dropped_positions"  # in a backup's data state: {pipeline id: [positions]}


def _dropped_state(dropped):
    """A backup's data state of `make_datasets`'s `dropped` ({} when none were dropped)."""
    found = {str(pipeline): positions.positions for pipeline, positions in (dropped or {}).items()
             if positions.positions}
    return {_DROPPED_KEY: found} if found else {}


def _dropped_at(config, strategy, chief, step):
    """`make_datasets`'s `dropped` for a run resuming at `step`, from that backup's data state."""
    backup_dir = backup_directory(config, strategy, chief)
    known = backup_lib.data_state(backup_dir, step).get(_DROPPED_KEY, {}) if step else {}
    return {int(pipeline): pipelines.DroppedPositions(positions)
            for pipeline, positions in known.items()}


def examples_to_skip(config, strategy, context, per_replica_batch, resume_step):
    """Training examples one input pipeline delivered in `resume_step` updates, which a run
    resumed at that step skips (`--resume_data_position`); 0 for a new run."""
    if not (config.resume_data_position and resume_step):
        return 0
    replicas_per_pipeline = strategy.num_replicas_in_sync // context.num_input_pipelines
    return resume_step * config.grad_accum_steps * replicas_per_pipeline * per_replica_batch


def make_callbacks(config, strategy, chief, eval_data=None, resume=Resume(0, False),
                   probe=None, dropped=None):
    """The callbacks of `fit`; the model directory's shared files are written by the chief only.

    Args:
        config: the `TrainConfig` (model directory, batch, checkpoint, EMA and log settings).
        strategy: the run's strategy; each non-chief worker backs up into its own folder.
        chief: whether this process is the chief (see `strategy.is_chief`).
        eval_data: the distributed eval dataset, for the EMA's evaluation beside the raw
            weights' (--ema_decay); None without --eval_data.
        resume: `_resume_step`'s: the step the run resumes from (in a multi-worker run, the
            one the workers agreed on), whose backup is restored; default: a new run.
        probe: the `fewshot_probe` the chief runs every --fewshot_every_steps; None: none.
        dropped: `make_datasets`'s record positions, saved in each backup's manifest.

    Returns:
        (callbacks, throughput): the list for `fit`, and its `StepAndThroughput`, whose
        history holds the images/s of each chunk.
    """
    backup_dir = backup_directory(config, strategy, chief)
    throughput = callbacks_lib.StepAndThroughput(config.micro_batch_size, config.grad_accum_steps)
    callbacks = [throughput, callbacks_lib.TerminateOnNaN(config.grad_accum_steps)]
    if config.ema_decay and eval_data is not None:
        # Before the loggers: it adds val_*_ema to the epoch's logs.
        callbacks.append(ema_lib.EmaEvaluation(
            eval_data, evaluate_callbacks=[callbacks_lib.QuietEndOfEvaluationData()]))
    callbacks += [
        # Keras epoch = --checkpoint_every_steps updates, so a backup per epoch is per chunk.
        backup_lib.AtomicBackupAndRestore(
            backup_dir, config.checkpoint_every_steps,
            resume_step=resume.step, verified=resume.verified,
            data_state=lambda: _dropped_state(dropped)),
        callbacks_lib.QuietEndOfEvaluationData(),
    ]
    if chief:
        logs = os.path.join(config.model_dir, "logs")
        checkpoints = os.path.join(config.model_dir, "checkpoints")
        callbacks += [
            backup_lib.AtomicWeightsCheckpoint(
                os.path.join(checkpoints, "ckpt-{step:07d}.weights.h5")),
            callbacks_lib.PruneCheckpoints(
                os.path.join(checkpoints, "ckpt-*.weights.h5"), config.keep_checkpoints),
            callbacks_lib.StepScalars(logs, config.log_every_steps, config.grad_accum_steps,
                                      global_batch_size=config.micro_batch_size),
            keras.callbacks.TensorBoard(logs, update_freq="epoch"),
        ]
        if probe is not None:
            callbacks.append(FewshotLogging(logs, config.fewshot_every_steps, probe,
                                            config.grad_accum_steps))
    return callbacks, throughput


def fewshot_probe(config, student, strategy):
    """--fewshot_every_steps' `probes.Probe` of `student`, its splits defaulting to the run's
    data: the shots from --train_data, scored on --eval_data; with --fewshot_train given,
    scored on that dataset too (another dataset's images cannot be scored with its shots).

    Raises:
        FewshotError: the model is not a keras_vit ViT, or the data are missing or of other
            classes (before any training).
    """
    train = config.fewshot_train or config.train_data
    default_test = (config.fewshot_train if config.fewshot_train
                    else config.eval_data or config.train_data)
    data = probes.ProbeData(
        train=train, train_split=config.fewshot_train_split or config.train_split,
        test=config.fewshot_test or default_test,
        test_split=config.fewshot_test_split or config.eval_split,
        max_train_examples=config.fewshot_train_examples or None,
        tfds_data_dir=config.tfds_data_dir or None)
    if data.train == config.train_data and data.max_train_examples is None:
        logging.warning("Each few-shot probe reads all of %s split '%s' for its shots; "
                        "--fewshot_train_examples=N reads the first N only (big_vision: "
                        "65000 of ImageNet's).", data.train, data.train_split)
    settings = probes.ProbeSettings(
        shots=tuple(int(shots) for shots in config.fewshot_shots.split(",")),
        seeds=config.fewshot_seeds, l2_reg=config.fewshot_l2_reg)
    # One device runs the probe: one replica's share of the batch fits where training does.
    batch_size = max(1, config.micro_batch_size // strategy.num_replicas_in_sync)
    return probes.Probe(student, data, settings, image_size=config.image_size,
                        batch_size=batch_size)


def _create_strategy(config):
    """The strategy of --strategy, once the config is known to fit its replicas.

    Raises:
        ConfigError: the batches do not split over its replicas, --grad_accum_steps > 1
            under a tf.distribute strategy (Keras's accumulation fails there), or
            --steps_per_execution > 1 under MultiWorkerMirroredStrategy.
    """
    strategy = strategy_lib.create_strategy(config.strategy, config.tpu or None)
    validate(config, strategy.num_replicas_in_sync)
    if strategy_lib.is_multi_worker(strategy) and config.steps_per_execution > 1:
        # Measured with Keras 3.15: the multi-step loop fails under MultiWorkerMirroredStrategy
        # ("You must feed a value for placeholder tensor ... multi_step_on_iterator").
        raise ConfigError(f"--steps_per_execution={config.steps_per_execution}: must be 1 under "
                          "MultiWorkerMirroredStrategy (Keras's multi-step loop fails there).")
    if config.grad_accum_steps > 1 and strategy is not tf.distribute.get_strategy():
        # Measured with Keras 3.15: its accumulation's `ops.cond` around the all-reduce fails
        # under every tf.distribute strategy ("merge_call called while defining a new graph"),
        # even a one-device MirroredStrategy.
        raise ConfigError(
            f"--grad_accum_steps={config.grad_accum_steps}: Keras's gradient accumulation fails "
            f"under {type(strategy).__name__}; use --strategy=default (one device) with it, or "
            "--grad_accum_steps=1 with a smaller --global_batch_size or --remat to fit memory.")
    logging.info("Strategy %s with %d replica(s); this process is %s.",
                 type(strategy).__name__, strategy.num_replicas_in_sync,
                 "the chief" if strategy_lib.is_chief(strategy) else "a worker")
    return strategy


def check_data_sources(config):
    """Fails early, before a model is built, on a --train_data or a set --eval_data that names
    nothing.

    Raises:
        ConfigError: naming the flag whose directory or file pattern does not exist.
    """
    flags = ("train_data", "eval_data") if config.eval_data else ("train_data",)
    for flag in flags:
        source = getattr(config, flag)
        if source.startswith("tfds:") or tf.io.gfile.glob(source) or tf.io.gfile.isdir(source):
            continue
        raise ConfigError(f"--{flag}={source!r}: no such directory or file pattern. "
                          "Convert data with tools/convert_data.py or use --prepare_data.")


def _training_class_names(config):
    """The class names of the head and the size of the training split.

    Returns:
        (class_names, num_train): --num_classes names (the training data's own when it
        records as many, `fallback_class_names` otherwise; without --num_classes, the
        data's), and the examples in the training split (None when the source does not say).

    Raises:
        ConfigError: --num_classes=0 and the training data records no class names.
    """
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
    return class_names or fallback_class_names(num_classes), num_train


@contextlib.contextmanager
def _dtype_policy(name):
    """Sets Keras's global dtype policy to `name` for the block, then restores the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _build_for_strategy(config, strategy, num_classes):
    """The compiled model (a Distiller with --teacher), its variables placed by `strategy`,
    ready for `fit`, and the student inside it (the model itself without a teacher)."""
    with strategy.scope():
        model, student = build_training_model(config, num_classes)
        compile_model(model, config, num_classes)
    fix_multi_worker_fit(model, strategy)
    return model, student


def _fit(model, config, datasets, callbacks, verbose):
    """`model.fit` for --total_steps updates in Keras epochs of --checkpoint_every_steps.

    Returns:
        The seconds `fit` took (tracing and compilation included).
    """
    train_data, eval_data = datasets
    updates_per_epoch = config.checkpoint_every_steps
    start = time.perf_counter()
    model.fit(
        train_data,
        epochs=config.total_steps // updates_per_epoch,
        steps_per_epoch=updates_per_epoch * config.grad_accum_steps,
        validation_data=eval_data,
        validation_freq=config.eval_every_steps // updates_per_epoch,
        callbacks=callbacks,
        shuffle=False,  # the input pipeline shuffles
        verbose=verbose,
    )
    return time.perf_counter() - start


def _fit_resumed(model, config, strategy, num_classes, normalization, probe, verbose):
    """`_fit` from the step `_resume_step` chooses, the training data positioned there.

    On one worker, a backup that passes its manifest's checks but does not load is skipped:
    `fit` starts again from the next older backup, the data positioned at that step (the
    failed load is overwritten whole). A multi-worker run stops instead, as every worker would
    have to agree on another step.

    Returns:
        (datasets, throughput, train_seconds): `make_datasets`'s pair, the `StepAndThroughput`
        callback, and the seconds of the `fit` that ran to the end.
    """
    chief = strategy_lib.is_chief(strategy)
    below, failures = None, []
    while True:
        resume = _resume_step(config, strategy, chief, below, failures)
        dropped = _dropped_at(config, strategy, chief, resume.step)
        datasets = make_datasets(config, strategy, num_classes, resume.step, normalization,
                                 dropped)
        callbacks, throughput = make_callbacks(config, strategy, chief, datasets[1], resume,
                                               probe, dropped)
        try:
            return datasets, throughput, _fit(model, config, datasets, callbacks, verbose)
        except backup_lib.UnloadableBackupError as error:
            if strategy_lib.is_multi_worker(strategy):
                raise
            logging.warning("Resuming from an older backup than %s, which does not load; the "
                            "training data is positioned at its step.", error.path)
            below, failures = error.step, failures + [f"{error.path}: does not load"]


def _final_evaluation(model, config, eval_data, verbose):
    """The metrics of the trained model on --eval_data ({} without eval data); with
    --ema_decay, those of the EMA weights too, under "<name>_ema"."""
    if eval_data is None:
        return {}
    quiet = [callbacks_lib.QuietEndOfEvaluationData()]
    evaluation = model.evaluate(eval_data, return_dict=True, verbose=verbose, callbacks=quiet)
    if config.ema_decay:
        with_ema = ema_lib.evaluate_with_ema(model, eval_data, verbose=verbose, callbacks=quiet)
        evaluation.update({f"{name}_ema": value for name, value in with_ema.items()})
    return evaluation


def _metric(logs, name):
    value = logs.get(name)
    return None if value is None else float(value)


def _evaluation_results(evaluation, config):
    names = ("top1", "top5", "loss")
    if config.ema_decay:
        names += ("top1_ema", "top5_ema", "loss_ema")
    return {f"eval_{name}": _metric(evaluation, name) for name in names}


def _progress_results(model, config, throughput, train_seconds):
    """Updates reached, where this run started, and speed (images/s, the median over chunks)."""
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    rates = [rate for _, rate in throughput.history]
    return {
        "steps": steps,
        "total_steps": config.total_steps,
        # Update step this process started training from: > 0 when it resumed from backup/.
        "resumed_from_step": throughput.first_step if throughput.first_step is not None else steps,
        # The first chunk of a run includes tracing/compilation; leave it out when others exist.
        "train_images_per_sec": statistics.median(rates[1:] or rates) if rates else None,
        "train_seconds": train_seconds,
    }


def _setup_results(config, strategy, num_classes, num_train):
    """What the run ran on: batch, replicas, classes, data size and library versions."""
    return {
        "global_batch_size": config.global_batch_size,
        "num_replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "num_classes": num_classes,
        "num_train_examples": num_train,
        "keras_version": keras.version(),
        "tensorflow_version": tf.__version__,
    }


def write_model_directory(model, class_names, results, model_dir):
    """Writes model.keras, class_names.json and results.json into `model_dir` (a local path
    or any file system of `tf.io.gfile`, such as gs://)."""
    tf.io.gfile.makedirs(model_dir)
    # An inference copy of the graph (same layers, no optimizer or compile state), so
    # loading it needs nothing from keras_vit.training.
    inference = keras.Model(model.inputs, model.outputs, name=model.name)
    inference.save(os.path.join(model_dir, MODEL_FILENAME))
    write_class_names(class_names, model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, RESULTS_FILENAME), "w") as stream:
        stream.write(json.dumps(results, indent=1))


def train(config):
    """Runs the training of `config`.

    Args:
        config: a `TrainConfig`.

    Returns:
        The results dict, also written to MODEL_DIR/results.json by the chief: eval_top1,
        eval_top5 (fractions in [0, 1]) and eval_loss (None without --eval_data), with
        --ema_decay also eval_top1_ema, eval_top5_ema and eval_loss_ema of the EMA weights;
        steps (updates reached), resumed_from_step, train_images_per_sec, train_seconds,
        saved_weights ("ema" with --export_ema, else "raw": which weights model.keras holds),
        and what the run ran on (batch, replicas, strategy, classes, library versions).

    Raises:
        ConfigError: a bad setting (before any work starts when it can be told from flags).
        callbacks.TrainingNaNError: the loss became NaN/Inf.
    """
    validate(config)
    strategy = _create_strategy(config)
    prepare_data(config, strategy)
    check_data_sources(config)
    class_names, num_train = _training_class_names(config)
    num_classes = len(class_names)
    chief = strategy_lib.is_chief(strategy)
    verbose = 1 if chief else 0
    keras.utils.set_random_seed(config.seed)
    with _dtype_policy(MIXED_PRECISION[config.mixed_precision] or "float32"):
        model, student = _build_for_strategy(config, strategy, num_classes)
        probe = (fewshot_probe(config, student, strategy)
                 if chief and config.fewshot_every_steps else None)
        datasets, throughput, train_seconds = _fit_resumed(
            model, config, strategy, num_classes, input_normalization(student), probe, verbose)
        evaluation = _final_evaluation(model, config, datasets[1], verbose)
        results = {
            **_evaluation_results(evaluation, config),
            **_progress_results(model, config, throughput, train_seconds),
            **_setup_results(config, strategy, num_classes, num_train),
            "saved_weights": "ema" if config.export_ema else "raw",
        }
        if config.export_ema:
            ema_lib.copy_ema_into_model(model)
        if chief:
            write_model_directory(student, class_names, results, config.model_dir)
    return results
