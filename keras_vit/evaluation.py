"""Classification metrics: top-1/top-5, per-class accuracy, confusion matrix.

The arithmetic is pure NumPy (`label_ranks`, `top_k_correct`, `ConfusionCounts`) so it can be
checked by hand; `evaluate` runs a model over a finite dataset under any `tf.distribute`
strategy and feeds the logits to that arithmetic. Predicting on image files is
`keras_vit.inference`; class names are `keras_vit.class_names`.

Ties between logits are broken toward the lower class index, as `np.argmax` does, so the
top-1 accuracy always agrees with the confusion matrix's diagonal (an untrained model whose
zero head gives equal logits everywhere predicts class 0 for every image, not "all correct").
"""

import time

import numpy as np
import tensorflow as tf
from absl import logging

from keras_vit.class_names import fallback_class_names
from pipelines.errors import UserError


# --- Arithmetic (NumPy) ------------------------------------------------------------------------


def label_ranks(logits, labels):
    """Rank of each true label among the logits: 0 = the model's first choice.

    rank = #classes with a larger logit + #classes with an equal logit and a lower index.

    Args:
        logits: (batch, num_classes) float scores (logits or probabilities).
        labels: (batch,) int class indices in [0, num_classes).

    Returns:
        (batch,) int64 ranks in [0, num_classes).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"Expected logits (batch, num_classes) and labels (batch,), got {logits.shape} and "
            f"{labels.shape}."
        )
    num_classes = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"Labels must lie in [0, {num_classes}) for a {num_classes}-class model, found "
            f"{labels.min()}..{labels.max()}; check the dataset's label offset and class count."
        )
    true_logit = logits[np.arange(len(labels)), labels][:, None]
    lower_index = np.arange(num_classes)[None, :] < labels[:, None]
    beaten_by = (logits > true_logit) | ((logits == true_logit) & lower_index)
    return beaten_by.sum(axis=1).astype(np.int64)


def top_k_correct(logits, labels, k):
    """(batch,) bool: is the true label among the model's k first choices? See `label_ranks`."""
    return label_ranks(logits, labels) < k


class ConfusionCounts:
    """Streaming counts for classification metrics, updated batch by batch.

    Attributes:
        confusion: (num_classes, num_classes) int64; confusion[t, p] = number of examples of
            true class t whose top-1 prediction is p.
        top_k_hits: {k: number of examples whose label is among the top k}, for each k in ks.
    """

    def __init__(self, num_classes, ks=(1, 5)):
        self.num_classes = int(num_classes)
        self.ks = tuple(int(k) for k in ks)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.top_k_hits = {k: 0 for k in self.ks}

    def update(self, logits, labels):
        """Adds a batch: logits (batch, num_classes), labels (batch,)."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Expected logits of shape (batch, {self.num_classes}), got {logits.shape}."
            )
        ranks = label_ranks(logits, labels)
        predictions = np.argmax(logits, axis=1)
        np.add.at(self.confusion, (np.asarray(labels, np.int64), predictions), 1)
        for k in self.ks:
            self.top_k_hits[k] += int(np.sum(ranks < k))

    @property
    def num_examples(self):
        return int(self.confusion.sum())

    def top_k_accuracy(self, k):
        """Fraction of examples with the label among the top k (NaN with no examples)."""
        if self.num_examples == 0:
            return float("nan")
        return self.top_k_hits[k] / self.num_examples

    def per_class_accuracy(self):
        """(num_classes,) float64 top-1 accuracy per true class; NaN for classes with no example."""
        counts = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, np.diag(self.confusion) / counts, np.nan)

    def summary(self, class_names=None):
        """A JSON-ready dict: num_examples, top1, top5 (each k in ks), mean_per_class_accuracy
        (over the classes that occur), and per_class [{index, name, num_examples, accuracy}]."""
        per_class = self.per_class_accuracy()
        counts = self.confusion.sum(axis=1)
        names = class_names if class_names is not None else fallback_class_names(self.num_classes)
        present = counts > 0
        result = {"num_examples": self.num_examples}
        for k in self.ks:
            result[f"top{k}"] = _json_float(self.top_k_accuracy(k))
        result["mean_per_class_accuracy"] = _json_float(
            float(per_class[present].mean()) if present.any() else float("nan")
        )
        result["per_class"] = [
            {
                "index": index,
                "name": names[index],
                "num_examples": int(counts[index]),
                "accuracy": _json_float(per_class[index]),
            }
            for index in range(self.num_classes)
        ]
        return result


def _json_float(value):
    value = float(value)
    return None if np.isnan(value) else value


def format_report(results, max_classes=30):
    """Human-readable text of a `ConfusionCounts.summary` dict (plus any timing keys): the
    headline numbers, then per-class accuracy (all classes up to `max_classes`, else the
    `max_classes` worst)."""
    lines = [
        f"examples: {results['num_examples']}",
        *(f"{key}: {_percent(results[key])}" for key in results if key.startswith("top")),
        f"mean per-class accuracy: {_percent(results['mean_per_class_accuracy'])}",
    ]
    if "images_per_sec" in results:
        lines.append(f"images/s: {results['images_per_sec']:.1f} "
                     f"({results['seconds']:.1f} s, {results['num_replicas']} replica(s))")
    if results.get("num_skipped_records"):
        lines.append(f"skipped bad records: {results['num_skipped_records']}")
    per_class = [entry for entry in results["per_class"] if entry["num_examples"]]
    if len(per_class) > max_classes:
        per_class = sorted(per_class, key=lambda entry: entry["accuracy"])[:max_classes]
        lines.append(f"per-class accuracy (the {max_classes} worst):")
    else:
        lines.append("per-class accuracy:")
    width = max((len(entry["name"]) for entry in per_class), default=0)
    for entry in per_class:
        lines.append(f"  {entry['name']:<{width}}  {_percent(entry['accuracy'])}  "
                     f"(n={entry['num_examples']})")
    return "\n".join(lines)


def _percent(value):
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


# --- Running a model ---------------------------------------------------------------------------


def evaluate(model, dataset_fn, *, strategy=None, num_classes=None, ks=(1, 5), log_every=50):
    """Runs `model` over a finite dataset once and counts its predictions.

    Args:
        model: a `keras.Model` from float32 images to logits (batch, num_classes), created
            under `strategy.scope()` when a strategy is given.
        dataset_fn: `input_context -> tf.data.Dataset` of (images, labels) batches that ends
            (e.g. `pipelines.build_dataset(..., training=False, input_context=...)`); called by
            `strategy.distribute_datasets_from_function`, so with several workers each reads its
            share of the files. Its batch dimension must not be static (no drop_remainder):
            with a static one, tf.distribute assumes full steps and silently drops a final
            batch that does not fill every replica.
        strategy: a `tf.distribute.Strategy`; None for the current (default) one.
        num_classes: default: the model's output width.
        ks: the k of the top-k accuracies.
        log_every: log progress every this many steps.

    Returns:
        (counts, stats): a `ConfusionCounts` and {"seconds", "images_per_sec", "num_steps",
        "num_replicas"}; images/s counts the images over the wall time after the
        first step (which includes tracing), or over the whole run if there was one step.
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_classes = num_classes or int(model.output_shape[-1])
    counts = ConfusionCounts(num_classes, ks)
    distributed = strategy.distribute_datasets_from_function(dataset_fn)

    @tf.function
    def step(batch):
        def replica_step(images, labels):
            return model(images, training=False), labels

        logits, labels = strategy.run(replica_step, args=batch)
        return strategy.gather(logits, axis=0), strategy.gather(labels, axis=0)

    start = time.perf_counter()
    first_step_end = None
    num_steps = 0
    images_after_first = 0
    for batch in distributed:
        logits, labels = step(batch)
        logits, labels = logits.numpy(), labels.numpy()
        counts.update(logits, labels)
        num_steps += 1
        if first_step_end is None:
            first_step_end = time.perf_counter()
        else:
            images_after_first += len(labels)
        if log_every and num_steps % log_every == 0:
            logging.info("Step %d: %d images, top-1 %.4f.", num_steps, counts.num_examples,
                         counts.top_k_accuracy(ks[0]))
    end = time.perf_counter()
    seconds = end - start
    if num_steps > 1:
        images_per_sec = images_after_first / max(end - first_step_end, 1e-9)
    else:
        images_per_sec = counts.num_examples / max(seconds, 1e-9)
    stats = {
        "seconds": seconds,
        "images_per_sec": images_per_sec,
        "num_steps": num_steps,
        "num_replicas": int(strategy.num_replicas_in_sync),
    }
    return counts, stats
