"""`callbacks.StepScalars` (--log_every_steps) and the curves drawn from it against steps.

Truths: the steps are the multiples of N optimizer updates (with gradient accumulation, with
steps_per_execution, across a resumed run); a written loss is the mean of the per-batch losses
of its window, computed here in NumPy from a model whose weights do not move; the learning
rate is the WarmupDecay formula of schedules.py's docstring (big_vision's) evaluated by hand at
the step; validation scalars are `History`'s values; the curves' x values are those steps.
"""

import glob
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vit import analysis
from keras_vit.analysis import curves, figures
from keras_vit.training import backup, callbacks
from keras_vit.training.schedules import WarmupDecay

BASE, TOTAL, WARMUP = 0.1, 24, 4


def _cosine_by_hand(step):
    warmup = min(1.0, step / WARMUP)
    progress = min(max((step - WARMUP) / (TOTAL - WARMUP), 0.0), 1.0)
    return BASE * warmup * 0.5 * (1 + math.cos(math.pi * progress))


def _data(examples=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(examples, 4)).astype(np.float32), rng.integers(0, 3, examples)


def _model(learning_rate, seed=0, steps_per_execution=1, gradient_accumulation_steps=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate, gradient_accumulation_steps=gradient_accumulation_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")],
        steps_per_execution=steps_per_execution)
    return model


def _schedule(steps_per_update=1):
    return WarmupDecay(BASE, total_steps=TOTAL, warmup_steps=WARMUP,
                       steps_per_update=steps_per_update)


def _repeated(x, y, batch_size=4):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()


def _steps(logdir, run, tag):
    return analysis.read_scalars(logdir)[run][tag][0].tolist()


def test_window_means_are_the_per_batch_losses_by_hand(tmp_path):
    x, y = _data()
    model = _model(0.0)  # the weights stay put, so each batch's loss is computable here
    kernel, bias = (np.asarray(w, np.float64) for w in model.layers[0].get_weights())
    logits = x @ kernel + bias
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    losses = -log_p[np.arange(len(y)), y].reshape(12, 4).mean(1)  # 12 batches of 4
    correct = (logits.argmax(1) == y).reshape(12, 4).mean(1)
    logdir = str(tmp_path / "logs")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[callbacks.StepScalars(logdir, every_steps=4, global_batch_size=4)])
    scalars = analysis.read_scalars(logdir)["train"]
    steps, values = scalars["step_loss"]
    assert steps.tolist() == [4, 8, 12, 16, 20, 24]
    windows = np.tile(losses.reshape(3, 4).mean(1), 2)
    np.testing.assert_allclose(values, windows, rtol=1e-5)
    np.testing.assert_allclose(scalars["step_top1"][1], np.tile(correct.reshape(3, 4).mean(1), 2),
                               rtol=1e-5)
    assert np.all(scalars["step_images_per_sec"][1] > 0)
    np.testing.assert_array_equal(scalars["step_learning_rate"][1], 0.0)


def test_gradient_accumulation_counts_optimizer_updates(tmp_path):
    x, y = _data()
    model = _model(_schedule(steps_per_update=2), gradient_accumulation_steps=2)
    logdir = str(tmp_path / "logs")
    history = model.fit(
        _repeated(x, y), epochs=2, steps_per_epoch=12, validation_data=(x, y), verbose=0,
        shuffle=False,
        callbacks=[callbacks.StepScalars(logdir, every_steps=2, steps_per_update=2)])
    scalars = analysis.read_scalars(logdir)
    steps, rates = scalars["train"]["step_learning_rate"]
    assert steps.tolist() == [2, 4, 6, 8, 10, 12]  # 12 micro-steps per epoch = 6 updates
    np.testing.assert_allclose(rates, [_cosine_by_hand(s) for s in steps], rtol=1e-5)
    val_steps, val_losses = scalars["validation"]["step_loss"]
    assert val_steps.tolist() == [6, 12]
    np.testing.assert_allclose(val_losses, history.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(scalars["validation"]["step_top1"][1], history.history["val_top1"],
                               rtol=1e-6)


@pytest.mark.parametrize("steps_per_execution, expected", [
    (3, [3, 6, 9, 12, 15, 18, 21, 24]),  # divides every_steps: on each multiple
    (4, [4, 8, 12, 16, 20, 24]),  # the first call at or past each multiple of 3
])
def test_steps_per_execution(tmp_path, steps_per_execution, expected):
    x, y = _data()
    model = _model(_schedule(), steps_per_execution=steps_per_execution)
    logdir = str(tmp_path / "logs")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[callbacks.StepScalars(logdir, every_steps=3)])
    steps, rates = analysis.read_scalars(logdir)["train"]["step_learning_rate"]
    assert steps.tolist() == expected
    np.testing.assert_allclose(rates, [_cosine_by_hand(s) for s in steps], rtol=1e-5)


class _CrashAtStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.step:
            raise RuntimeError("simulated crash")


def _resumable_fit(tmp_path, extra_callbacks=()):
    x, y = _data()
    model = _model(_schedule())
    logdir, backup_dir = str(tmp_path / "logs"), str(tmp_path / "backup")
    history = model.fit(
        _repeated(x, y), epochs=4, steps_per_epoch=6, validation_data=(x, y), verbose=0,
        shuffle=False,
        callbacks=[callbacks.StepScalars(logdir, every_steps=3),
                   backup.AtomicBackupAndRestore(backup_dir, 6), *extra_callbacks])
    return logdir, history


def test_a_resumed_run_continues_the_steps(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resumable_fit(tmp_path, [_CrashAtStep(16)])  # backups at 6 and 12; 15 was written
    first_files = set(glob.glob(str(tmp_path / "logs" / "*" / "*tfevents*")))
    assert _steps(str(tmp_path / "logs"), "train", "step_loss") == [3, 6, 9, 12, 15]
    logdir, history = _resumable_fit(tmp_path)
    resumed_files = set(glob.glob(os.path.join(logdir, "*", "*tfevents*"))) - first_files
    resumed = {}
    for path in resumed_files:
        run = os.path.basename(os.path.dirname(path))
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                resumed.setdefault((run, value.tag), []).append(event.step)
    assert sorted(resumed["train", "step_loss"]) == [15, 18, 21, 24]  # from the backup's 12 on
    assert sorted(resumed["validation", "step_top1"]) == [18, 24]  # epochs 3 and 4
    scalars = analysis.read_scalars(logdir)
    steps, rates = scalars["train"]["step_learning_rate"]
    assert steps.tolist() == list(range(3, 25, 3))
    np.testing.assert_allclose(rates, [_cosine_by_hand(s) for s in steps], rtol=1e-5)
    np.testing.assert_allclose(scalars["validation"]["step_loss"][1][-2:],
                               history.history["val_loss"], rtol=1e-6)


def test_curves_are_drawn_against_optimizer_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="Keras's TensorBoard callback needs tensorboard")
    x, y = _data()
    model = _model(_schedule(steps_per_update=2), gradient_accumulation_steps=2)
    logdir = str(tmp_path / "logs")
    model.fit(_repeated(x, y), epochs=2, steps_per_epoch=12, validation_data=(x, y), verbose=0,
              shuffle=False,
              callbacks=[callbacks.StepScalars(logdir, every_steps=3, steps_per_update=2),
                         keras.callbacks.TensorBoard(logdir)])  # both share the runs
    scalars = analysis.read_scalars(logdir)
    assert curves.default_x_axis(scalars) == "step"
    groups = analysis.group_curves(scalars, "step")
    # Keras's evaluation_*_vs_iterations (micro-steps) are left out: one curve per metric.
    expected = {"loss": {"train/loss": [3, 6, 9, 12], "validation/loss": [6, 12]},
                "accuracy": {"train/top1": [3, 6, 9, 12], "validation/top1": [6, 12]},
                "learning rate": {"train/learning_rate": [3, 6, 9, 12]}}
    assert {group: {label: steps.tolist() for label, steps, _ in found}
            for group, found in groups.items()} == expected
    figure = figures.curves_figure(groups, "optimizer step")
    for axes, group in zip(figure.axes, groups):
        assert axes.get_xlabel() == "optimizer step"
        assert [line.get_xdata().tolist() for line in axes.get_lines()] == [
            steps for steps in expected[group].values()]
    epoch_groups = analysis.group_curves(scalars, "epoch")  # Keras's epoch curves remain
    assert [label for label, _, _ in epoch_groups["loss"]] == ["train/loss", "validation/loss"]


def test_a_run_without_step_scalars_defaults_to_epochs():
    scalars = {"train": {"epoch_loss": (np.array([0, 1]), np.array([1.0, 0.5]))},
               "validation": {"evaluation_loss_vs_iterations": (np.array([6]), np.array([1.0]))}}
    assert curves.default_x_axis(scalars) == "epoch"


def test_the_tag_prefix_is_the_one_curves_reads():
    assert callbacks.STEP_TAG_PREFIX == curves.STEP_TAG_PREFIX


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        callbacks.StepScalars("/tmp/x", every_steps=0)


def test_float16_loss_scaling_keeps_the_update_steps(tmp_path):
    # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer whose own step
    # counter stays at 0; the scalars and images/s must follow the inner optimizer's updates.
    x, y = _data()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _model(0.01)
    finally:
        keras.config.set_dtype_policy(previous)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logdir = str(tmp_path / "logs")
    throughput = callbacks.StepAndThroughput(4)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, validation_data=(x, y),
              callbacks=[throughput, callbacks.StepScalars(logdir, every_steps=4)])
    assert _steps(logdir, "train", "step_loss") == [4, 8, 12, 16, 20, 24]
    assert _steps(logdir, "validation", "step_loss") == [12, 24]
    assert [step for step, _ in throughput.history] == [12, 24]
