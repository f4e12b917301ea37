"""Few-shot and linear probes of a classifier's representation on a labelled dataset pair.

What big_vision's `fewshot_lsr` evaluator and the AugReg paper rank pre-training runs by: the
pooled pre-logits features of a train and a test split (`keras_vit.feature_extractor(model,
output="pre_logits")`, read through the evaluation pipeline), then `keras_vit.fewshot`'s
closed-form least squares per shot count and, optionally, a logistic regression on every
training feature. `tools/evaluate.py --fewshot_*` and `tools/train.py --fewshot_every_steps`
both run a `Probe`.
"""

import dataclasses

import tensorflow as tf

import pipelines
from keras_vit import fewshot
from keras_vit.features import feature_extractor
from keras_vit.inference import eval_crop_fraction


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """The labelled splits a probe reads (TFRecord directories or patterns, or tfds:NAME).

    `max_train_examples` keeps the first N training examples, in file order (big_vision reads
    ImageNet's `train[:65000]`, which holds at least 30 of every class).
    """

    train: str
    test: str
    train_split: str = "train"
    test_split: str = "test"
    max_train_examples: int | None = None
    tfds_data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """What to fit on the features: big_vision's few-shot defaults, the linear probe off."""

    shots: tuple[int, ...] = fewshot.DEFAULT_SHOTS
    seeds: int = fewshot.DEFAULT_SEEDS
    l2_reg: float = fewshot.DEFAULT_L2_REG
    linear_probe: bool = False
    linear_probe_c: float = 1.0


class Probe:
    """Few-shot (and linear) probes of one model on one `ProbeData`, checked when made.

    Making it builds the pre-logits extractor (a `FewshotError` for a model that is not a
    keras_vit ViT) and the input pipelines of both splits (missing data, an empty split or
    two datasets whose dataset infos list different classes are errors), so a run learns of
    a bad probe before it trains; `run` then reads the splits with the model's current
    weights.

    Args:
        model: a keras_vit classifier (any pooling and token options); its own layers are
            called again, no weights are copied.
        data: a `ProbeData`.
        settings: a `ProbeSettings`.
        image_size: side in pixels the splits are read at (the model's input size).
        batch_size: images per feature-extraction batch, all on one device (`_one_device_call`).
    """

    def __init__(self, model, data, settings=ProbeSettings(), *, image_size, batch_size=64):
        try:
            extractor = feature_extractor(model, output="pre_logits")
        except ValueError as error:
            raise fewshot.FewshotError(f"Cannot probe this model: {error}") from error
        self.features_model = _one_device_call(extractor)
        self.data, self.settings = data, settings
        _check_same_classes(data)
        read = dict(image_size=image_size, batch_size=batch_size,
                    central_crop_fraction=eval_crop_fraction(model),
                    tfds_data_dir=data.tfds_data_dir)
        # Built (and their shards checked) once; every `run` iterates them again.
        self._datasets = {(source, split): _split_dataset(source, split, **read)
                          for source, split in ((data.train, data.train_split),
                                                (data.test, data.test_split))}

    def run(self):
        """Few-shot accuracies (and the linear probe's) of the model's pre-logits.

        Returns:
            A JSON-ready dict: "fewshot" {str(shots): accuracy in [0, 1], mean over seeds},
            "fewshot_per_seed" {str(shots): [accuracy of seed 0, 1, ...]}, "fewshot_data"
            (what was read: sources, splits, example and class counts, l2_reg), and
            "linear_probe" (test top-1) when `settings.linear_probe`.

        Raises:
            FewshotError: a corrupt record in either split (named), or features that are not
                finite (a diverged model).
        """
        data, settings = self.data, self.settings
        train = self._features(data.train, data.train_split, data.max_train_examples)
        test = self._features(data.test, data.test_split)
        result = fewshot.fewshot_accuracies(*train, *test, shots=settings.shots,
                                            seeds=settings.seeds, l2_reg=settings.l2_reg)
        report = {
            "fewshot": {str(shots): float(value) for shots, value in result.accuracy.items()},
            "fewshot_per_seed": {str(shots): [float(v) for v in values]
                                 for shots, values in result.per_seed.items()},
            "fewshot_data": {
                "train": data.train, "train_split": data.train_split, "test": data.test,
                "test_split": data.test_split, "num_train": result.num_train,
                "num_test": result.num_test, "num_classes": result.num_classes,
                "seeds": settings.seeds, "l2_reg": settings.l2_reg},
        }
        if settings.linear_probe:
            report["linear_probe"] = float(fewshot.linear_probe(*train, *test,
                                                                c=settings.linear_probe_c))
        return report

    def _features(self, source, split, max_examples=None):
        """(features float32 (N, D), labels int64 (N,)) of one split, each example once, in
        file order. A corrupt record stops the pass (`on_bad_record="fail"`): a probe on a
        silently smaller set would not compare between runs."""
        try:
            return fewshot.extract_features(self.features_model, self._datasets[source, split],
                                            max_examples=max_examples)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
            text = error.message.split("assertion failed:", 1)[-1].strip().split("\n")[0]
            raise fewshot.FewshotError(
                f"{source} split '{split}' cannot be read whole for the probe: "
                f"{text.replace('] [', ' ').strip('[]')}. A probe reads every example, so "
                "re-create the data with tools/convert_data.py.") from error


def run_probes(model, data, settings=ProbeSettings(), *, image_size, batch_size=64):
    """`Probe(model, data, settings, ...).run()`: the probes of `model` once."""
    return Probe(model, data, settings, image_size=image_size, batch_size=batch_size).run()


def _one_device_call(feature_model):
    """`feature_model` as one tf.function call per batch, outside any tf.distribute strategy.

    Keras's `predict_on_batch` under MultiWorkerMirroredStrategy gathers its outputs from
    every worker, so the chief could not probe alone (and would get every worker's rows);
    a plain call in the cross-replica context reads the variables on this worker only (on a
    TPU, the host runs the model).
    """
    call = tf.function(lambda images: feature_model(images, training=False),
                       reduce_retracing=True)
    return lambda images, training=False: call(images)


def _split_dataset(source, split, *, image_size, batch_size, central_crop_fraction,
                   tfds_data_dir):
    """The evaluation pipeline of one split, every example once, failing on corrupt records."""
    return pipelines.build_dataset(
        source, split=split, image_size=image_size, batch_size=batch_size, training=False,
        central_crop_fraction=central_crop_fraction, on_bad_record="fail",
        tfds_data_dir=tfds_data_dir)


def _check_same_classes(data):
    """Refuses shots and test images of datasets whose dataset infos list different classes."""
    train_names, _ = pipelines.describe_source(data.train, data.train_split, data.tfds_data_dir)
    test_names, _ = pipelines.describe_source(data.test, data.test_split, data.tfds_data_dir)
    if train_names is not None and test_names is not None and train_names != test_names:
        raise fewshot.FewshotError(
            f"The few-shot training data {data.train} has {len(train_names)} classes "
            f"({', '.join(train_names[:3])}, ...) and the test data {data.test} "
            f"{len(test_names)} ({', '.join(test_names[:3])}, ...): the shots and the images "
            "scored must be of the same classes. Pass both from one dataset.")


def format_probes(report):
    """Lines for the terminal: accuracy per shot count (mean ± spread over seeds)."""
    lines = []
    data = report["fewshot_data"]
    lines.append(f"few-shot linear (big_vision fewshot_lsr) on {data['test']} "
                 f"{data['test_split']} ({data['num_test']} images, {data['num_classes']} "
                 f"classes), shots from {data['train']} {data['train_split']}, "
                 f"{data['seeds']} seeds:")
    for shots, accuracy in report["fewshot"].items():
        values = report["fewshot_per_seed"][shots]
        lines.append(f"  {shots:>3}-shot  {accuracy:.4f}  (seeds {min(values):.4f}-"
                     f"{max(values):.4f})")
    if "linear_probe" in report:
        lines.append(f"  linear probe (logistic regression, all {data['num_train']} training "
                     f"features)  {report['linear_probe']:.4f}")
    return "\n".join(lines)
