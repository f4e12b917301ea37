"""Training curves from TensorBoard event files (as `keras.callbacks.TensorBoard` and
`keras_vit.training.callbacks.StepScalars` write them).

Keras writes scalars as tensor summaries: in `logs/train` "epoch_loss", "epoch_<metric>",
"epoch_learning_rate" (step = epoch) and with `update_freq` "batch_<metric>" (step = the
optimizer's micro-step counter); in `logs/validation` "epoch_<metric>" and
"evaluation_<metric>_vs_iterations" (the same counter). `StepScalars` (tools/train.py's
--log_every_steps) writes "step_<metric>" in both runs at x = the optimizer update step, which
differs from Keras's counter under gradient accumulation. The x axis "step" draws a run's
step_* curves, or where a run has none (a run trained before StepScalars, or by plain Keras)
its batch_* and evaluation_* ones. Event files are read with
`tf.compat.v1.train.summary_iterator`, so TensorBoard itself is not needed.
"""

import collections
import os
import re

import numpy as np
import tensorflow as tf

from pipelines.errors import MissingFileError

#: StepScalars' tag prefix (keras_vit.training.callbacks.STEP_TAG_PREFIX; not imported, so
#: reading curves needs no training module).
STEP_TAG_PREFIX = "step_"
#: The panels of a curves figure, in order; `group_curves` sorts each metric into one of them.
CURVE_GROUPS = ("loss", "accuracy", "learning rate")
_EVALUATION_TAG = re.compile(r"^evaluation_(.+)_vs_iterations$")


def _scalar(value):
    """A summary value's number, or None when it is not a scalar (an image, a histogram...)."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        array = tf.make_ndarray(value.tensor)
        if array.shape == () and np.issubdtype(array.dtype, np.number):
            return float(array)
    return None


def _event_files(logdir):
    for root, _, files in sorted(tf.io.gfile.walk(logdir)):
        for name in sorted(files):
            if "tfevents" in name:
                yield root, os.path.join(root, name)


def read_scalars(logdir):
    """Reads every scalar in the event files under `logdir`.

    Args:
        logdir: a TensorBoard log directory, e.g. MODEL_DIR/logs with runs `train/` and
            `validation/` (event files directly in `logdir` form the run ".").

    Returns:
        {run: {tag: (steps int64 (n,), values float64 (n,))}} sorted by step; a step written
        twice (a resumed run) keeps its last value.

    Raises:
        MissingFileError: `logdir` is missing or holds no event file.
    """
    if not tf.io.gfile.isdir(logdir):
        raise MissingFileError(
            f"TensorBoard log directory {logdir} does not exist: expected MODEL_DIR/logs as "
            "tools/train.py writes it, or pass --logdir."
        )
    points = collections.defaultdict(lambda: collections.defaultdict(dict))
    found = False
    for root, path in _event_files(logdir):
        found = True
        run = os.path.relpath(root, logdir)
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = _scalar(value)
                if number is not None:
                    points[run][value.tag][int(event.step)] = number
    if not found:
        raise MissingFileError(
            f"No TensorBoard event files (*tfevents*) under {logdir}; was the run trained with "
            "the TensorBoard callback?"
        )
    scalars = {}
    for run, tags in points.items():
        scalars[run] = {}
        for tag, by_step in tags.items():
            steps = np.array(sorted(by_step), dtype=np.int64)
            scalars[run][tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return scalars


def _parse_tag(tag):
    """(metric name, x axis) of a tag: "epoch" for epoch_*, "step" for StepScalars' step_*
    (optimizer updates), "keras_step" for Keras's per-batch tags and untagged scalars."""
    if tag.startswith("epoch_"):
        return tag[len("epoch_"):], "epoch"
    if tag.startswith(STEP_TAG_PREFIX):
        return tag[len(STEP_TAG_PREFIX):], "step"
    if tag.startswith("batch_"):
        return tag[len("batch_"):], "keras_step"
    match = _EVALUATION_TAG.match(tag)
    if match:
        return match.group(1), "keras_step"
    return tag, "keras_step"


def _run_axis(tags, x_axis):
    """The tag axis a run is drawn from: for "step", its step_* tags if it has any (both
    kinds would draw each metric twice), else Keras's per-batch ones."""
    if x_axis == "epoch":
        return "epoch"
    return "step" if any(_parse_tag(tag)[1] == "step" for tag in tags) else "keras_step"


def default_x_axis(scalars):
    """"step" when `scalars` (from `read_scalars`) hold `StepScalars`' step_* tags, else
    "epoch": a run logged without them (before --log_every_steps) draws its epochs."""
    has_steps = any(_parse_tag(tag)[1] == "step" for tags in scalars.values() for tag in tags)
    return "step" if has_steps else "epoch"


def _group(metric):
    if metric in ("learning_rate", "lr") or metric.startswith("learning_rate"):
        return "learning rate"
    if "loss" in metric:
        return "loss"
    if "acc" in metric or re.fullmatch(r"top_?\d+(_accuracy)?", metric):
        return "accuracy"
    return None


def group_curves(scalars, x_axis="epoch"):
    """Sorts scalars into the panels of a curves figure.

    Args:
        scalars: from `read_scalars`.
        x_axis: "epoch" (epoch_* tags) or "step": optimizer update steps (`StepScalars`'
            step_* tags; in a run without them, Keras's per-batch tags and untagged scalars).

    Returns:
        {group: [(label "run/metric", steps (n,), values (n,)), ...]} for the groups of
        `CURVE_GROUPS` that have data, in that order.
    """
    if x_axis not in ("epoch", "step"):
        raise ValueError(f"x_axis must be 'epoch' or 'step', got {x_axis!r}.")
    groups = {group: [] for group in CURVE_GROUPS}
    for run in sorted(scalars):
        run_axis = _run_axis(scalars[run], x_axis)
        for tag in sorted(scalars[run]):
            metric, axis = _parse_tag(tag)
            group = _group(metric)
            if group is None or axis != run_axis:
                continue
            steps, values = scalars[run][tag]
            label = metric if run == "." else f"{run}/{metric}"
            groups[group].append((label, steps, values))
    return {group: curves for group, curves in groups.items() if curves}
