"""Training callbacks beyond Keras's own: throughput, step bookkeeping, a clear NaN stop,
checkpoint pruning, and no false "interrupting training" warning after each evaluation.

Keras counts in epochs; `engine.train` makes one Keras epoch = `checkpoint_every_steps`
optimizer updates, so an epoch boundary is where the backup and the checkpoint (backup.py)
save and `epoch * updates_per_epoch` is the global update step.
"""

import glob
import os
import time
import warnings

import keras
import numpy as np
from absl import logging

from pipelines.errors import UserError


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
        return int(keras.ops.convert_to_numpy(self.model.optimizer._iterations))

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
            micro = int(keras.ops.convert_to_numpy(self.model.optimizer._iterations))
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
        files = sorted(glob.glob(self.pattern))
        for path in files[: -self.keep]:
            os.remove(path)
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
