"""Few-shot accuracy during training, to TensorBoard: big_vision's way of following a
pre-training run by what its representation is worth (`keras_vit.probes`).

Every --fewshot_every_steps updates (a multiple of the chunk, so at an epoch end of
`engine.train`'s Keras epochs) the trained model's pre-logits are read on the few-shot splits
and `fewshot_<k>shot` scalars are written to MODEL_DIR/logs/fewshot at the update step.
"""

import os

import keras
import tensorflow as tf
from absl import logging

from keras_vit.training.callbacks import optimizer_micro_steps


class FewshotLogging(keras.callbacks.Callback):
    """Runs a `probes.Probe` every `every_steps` updates and logs its accuracies.

    The chief alone runs it (engine.make_callbacks): the probe calls the model on one device,
    outside the strategy, with no collective, so the other workers of a multi-worker run just
    wait for the chief at their next all-reduce.

    Args:
        log_dir: the run's TensorBoard directory (MODEL_DIR/logs); scalars go to its
            `fewshot` run as `fewshot_<shots>shot`, accuracy in [0, 1].
        every_steps: updates between probes (a multiple of the updates per Keras epoch).
        probe: a `probes.Probe` of the model being trained (a Distiller's student), made
            before `fit` so that its data and model are checked before any training.
        steps_per_update: micro-steps per optimizer update (gradient accumulation).

    Attributes:
        history: (update step, {shots: accuracy}) of each probe of this run.
    """

    def __init__(self, log_dir, every_steps, probe, steps_per_update=1):
        super().__init__()
        self.log_dir = os.path.join(log_dir, "fewshot")
        self.every_steps = int(every_steps)
        self.probe = probe
        self.steps_per_update = int(steps_per_update)
        self.history = []
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        step = optimizer_micro_steps(self.model) // self.steps_per_update
        if step % self.every_steps:
            return
        accuracies = self.probe.run()["fewshot"]
        self.history.append((step, accuracies))
        logging.info("Step %d: few-shot %s", step,
                     ", ".join(f"{shots}-shot {value:.4f}" for shots, value in accuracies.items()))
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default(step=step):
            for shots, value in accuracies.items():
                tf.summary.scalar(f"fewshot_{shots}shot", value)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
