"""Training callbacks beyond Keras's own: throughput, step bookkeeping, TensorBoard scalars
every N optimizer updates, a clear NaN stop, checkpoint pruning, and no false "interrupting
training" warning after each evaluation.

Keras counts in epochs; `engine.train` makes one Keras epoch = `checkpoint_every_steps`
optimizer updates, so an epoch boundary is where the backup and the checkpoint (backup.py)
save and `epoch * updates_per_epoch` is the global update step.
"""

import os
import time
import warnings

import keras
import numpy as np
from absl import logging

from pipelines.errors import UserError


def optimizer_micro_steps(model):
    """Forward/backward passes the model's optimizer has run (updates x accumulation steps).

    Under a float16 policy Keras wraps the optimizer in a `LossScaleOptimizer`, whose own
    counter never moves; the inner optimizer's does.
    """
    optimizer = model.optimizer
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return int(keras.ops.convert_to_numpy(optimizer._iterations))


class TrainingNaNError(UserError, FloatingPointError):
    """The training loss became NaN or infinite: a setting to change, so a `UserError`.

    Also a `FloatingPointError`, which it was before `UserError` existed, for code that
    catches that.
    """


class StepAndThroughput(keras.callbacks.Callback):
    """Adds "step" (optimizer updates so far) and "images_per_sec" to each epoch's logs.

    TensorBoard, the progress bar and History read these logs. Put this callback before them
    in the list.

    Args:
        global_batch_size: images per micro-step, summed over all replicas.
        steps_per_update: micro-steps per optimizer update (gradient accumulation).

    Attributes:
        history: (update step, images per second) at the end of each epoch of this run.
        first_step: the update step this run's first epoch started at (> 0 after a resume).
    """

    def __init__(self, global_batch_size, steps_per_update=1):
        super().__init__()
        self.global_batch_size = int(global_batch_size)
        self.steps_per_update = int(steps_per_update)
        self.history = []
        self.first_step = None
        self._start = None
        self._start_iterations = 0

    def _micro_steps(self):
        return optimizer_micro_steps(self.model)

    def on_train_begin(self, logs=None):
        self.first_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start_iterations = self._micro_steps()
        if self.first_step is None:
            # After the backup's on_train_begin: the update step this run resumed from.
            self.first_step = self._start_iterations // self.steps_per_update
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        micro_steps = self._micro_steps()
        seconds = time.perf_counter() - self._start
        images = (micro_steps - self._start_iterations) * self.global_batch_size
        rate = images / seconds if seconds > 0 else 0.0
        step = micro_steps // self.steps_per_update
        self.history.append((step, rate))
        if logs is not None:
            logs["images_per_sec"] = rate
            logs["step"] = step


#: Tag prefix of `StepScalars`' scalars (x = optimizer update step); `keras.callbacks.TensorBoard`
#: writes "epoch_" (x = epoch) and "batch_" / "evaluation_*_vs_iterations" (x = micro-step).
STEP_TAG_PREFIX = "step_"
#: The runs (sub-directories of the log directory) StepScalars writes, as Keras's TensorBoard.
TRAIN_RUN, VALIDATION_RUN = "train", "validation"


class StepScalars(keras.callbacks.Callback):
    """TensorBoard scalars every `every_steps` optimizer updates, at x = the update step.

    In LOG_DIR/train: "step_<metric>" for each training log (loss, top1, ...), the mean over
    the updates since the last write (Keras's logs hold the epoch's running mean; the window's
    mean is recovered from two of them, exact because every training batch is full: the
    training stream repeats), "step_learning_rate" (the schedule at the optimizer's counter,
    the rate of the next update) and, with `global_batch_size`, "step_images_per_sec" (the
    first write of a run includes tracing and compilation). In LOG_DIR/validation at each
    epoch end with validation: "step_<metric>" for each val_* log (val_top1_ema included),
    "val_" dropped as Keras's TensorBoard does. `keras_vit.analysis.group_curves(x_axis="step")`
    draws these.

    Keras calls `on_train_batch_end` once per `steps_per_execution` micro-steps, so with
    steps_per_execution > 1 a write lands at the first call at or past each multiple of
    `every_steps` (exactly on it when steps_per_execution divides every_steps ×
    steps_per_update). A resumed run continues from the restored optimizer counter: put this
    callback anywhere in the list; it reads the counter from the first batch on. Write on the
    chief only.

    Args:
        log_dir: the TensorBoard directory (MODEL_DIR/logs, shared with Keras's callback).
        every_steps: optimizer updates between writes (--log_every_steps), >= 1.
        steps_per_update: micro-steps per optimizer update (gradient accumulation).
        global_batch_size: images per micro-step over all replicas, for images/s; None
            writes no images/s.

    Raises:
        ValueError: every_steps or steps_per_update < 1.
    """

    def __init__(self, log_dir, every_steps, steps_per_update=1, global_batch_size=None):
        super().__init__()
        if every_steps < 1 or steps_per_update < 1:
            raise ValueError(f"every_steps and steps_per_update must be >= 1, got "
                             f"{every_steps} and {steps_per_update}.")
        self.log_dir = log_dir
        self.every_steps = int(every_steps)
        self.steps_per_update = int(steps_per_update)
        self.global_batch_size = global_batch_size
        self._writers = {}
        self._last_step = None  # the update step of the last write (or of the run's start)

    def _micro_steps(self):
        return optimizer_micro_steps(self.model)

    def _writer(self, run):
        import tensorflow as tf  # Here: summaries need TensorFlow, the JAX backend included.

        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(os.path.join(self.log_dir, run))
        return self._writers[run]

    def _write(self, run, scalars, step):
        import tensorflow as tf

        with self._writer(run).as_default():
            for name, value in scalars.items():
                tf.summary.scalar(STEP_TAG_PREFIX + name, float(value), step=step)
        self._writer(run).flush()

    def on_train_begin(self, logs=None):
        self._last_step = None  # read at the first epoch, after a backup's restore

    def on_epoch_begin(self, epoch, logs=None):
        # Keras resets the metrics at each epoch: the running means restart from zero batches.
        self._epoch_batches = 0
        self._epoch_sums = {}
        if self._last_step is None:
            self._last_step = self._micro_steps() // self.steps_per_update
            self._window_start = (self._micro_steps(), time.perf_counter())
            self._window = {}

    def on_train_batch_end(self, batch, logs=None):
        self._accumulate(batch + 1, logs or {})
        step = self._micro_steps() // self.steps_per_update
        if step // self.every_steps > self._last_step // self.every_steps:
            self._write(TRAIN_RUN, self._train_scalars(), step)
            self._last_step = step

    def _accumulate(self, batches, logs):
        """Adds the batches since the last call to the window, from the running means."""
        new = batches - self._epoch_batches
        for name, mean in logs.items():
            if np.ndim(mean) != 0:
                continue
            total = float(mean) * batches
            window_sum, window_count = self._window.get(name, (0.0, 0))
            self._window[name] = (window_sum + total - self._epoch_sums.get(name, 0.0),
                                  window_count + new)
            self._epoch_sums[name] = total
        self._epoch_batches = batches

    def _train_scalars(self):
        """The window's means, the learning rate and images/s; starts a new window."""
        scalars = {name: total / count for name, (total, count) in self._window.items() if count}
        scalars["learning_rate"] = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))
        micro_steps, now = self._micro_steps(), time.perf_counter()
        start_micro_steps, start = self._window_start
        if self.global_batch_size and now > start:
            images = (micro_steps - start_micro_steps) * self.global_batch_size
            scalars["images_per_sec"] = images / (now - start)
        self._window_start, self._window = (micro_steps, now), {}
        return scalars

    def on_epoch_end(self, epoch, logs=None):
        validation = {name[len("val_"):]: value for name, value in (logs or {}).items()
                      if name.startswith("val_") and np.ndim(value) == 0}
        if validation:
            self._write(VALIDATION_RUN, validation, self._micro_steps() // self.steps_per_update)

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


class TerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """Stops at the first NaN/Inf loss with a message saying where and what to try.

    Args:
        steps_per_update: micro-steps per optimizer update (gradient accumulation), to report
            the update, not the micro-step, where the loss went bad.

    Raises:
        TrainingNaNError: from `on_batch_end`, at the first non-finite loss.
    """

    def __init__(self, steps_per_update=1):
        super().__init__(raise_error=True)
        self.steps_per_update = steps_per_update

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            micro = optimizer_micro_steps(self.model)
            raise TrainingNaNError(
                f"The training loss became {loss} at optimizer update "
                f"{micro // self.steps_per_update}. Training stopped; the last good state is in "
                "the model directory's backup/ and checkpoints/. Try a lower --learning_rate, "
                "a longer --warmup_steps, --grad_clip_norm=1, or --mixed_precision=bfloat16 "
                "instead of float16; and check the input data."
            )


class PruneCheckpoints(keras.callbacks.Callback):
    """Keeps only the newest `keep` files matching `pattern` after each epoch's save.

    Put it after the `backup.AtomicWeightsCheckpoint` that writes them. File names must sort in
    step order (as the zero-padded "ckpt-{step:07d}.weights.h5" do).

    Args:
        pattern: a glob of the checkpoint files, such as "DIR/ckpt-*.weights.h5".
        keep: how many of the newest files to keep; 0 keeps all.

    Raises:
        ValueError: `keep` is negative.
    """

    def __init__(self, pattern, keep):
        super().__init__()
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}.")
        self.pattern = pattern
        self.keep = int(keep)

    def on_epoch_end(self, epoch, logs=None):
        if not self.keep:
            return
        import tensorflow as tf  # Here, as in StepScalars: gfile reaches gs:// and the like.

        files = sorted(tf.io.gfile.glob(self.pattern))
        for path in files[: -self.keep]:
            tf.io.gfile.remove(path)
            logging.info("Removed old checkpoint %s (--keep_checkpoints=%d).", path, self.keep)


class QuietEndOfEvaluationData(keras.callbacks.Callback):
    """Silences Keras's "Your input ran out of data; interrupting training" during evaluation.

    Keras warns whenever an iterator ends before it knows the dataset's length. The evaluation
    pipeline's length is unknown (it may skip bad records), so every evaluation pass, in `fit`'s
    validation and in `evaluate`, ends that way and Keras says training was interrupted when it
    was not. Only evaluation is silenced: the training data repeats, so the warning there would
    still mean something.
    """

    def __init__(self):
        super().__init__()
        self._silenced = None

    def on_test_begin(self, logs=None):
        self._silenced = warnings.catch_warnings()
        self._silenced.__enter__()
        warnings.filterwarnings(
            "ignore", message="Your input ran out of data", category=UserWarning)

    def on_test_end(self, logs=None):
        if self._silenced is not None:
            self._silenced.__exit__(None, None, None)
            self._silenced = None
