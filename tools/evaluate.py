r"""Evaluates a classifier on a dataset: top-1, top-5, per-class accuracy, images/s.

    python tools/evaluate.py --checkpoint=/tmp/run --data=/tmp/digits --split=test
    python tools/evaluate.py --checkpoint=ViT-B_16.npz --image_size=384 --data=tfds:imagenet2012 \
        --split=validation --batch_size=256 --strategy=mirrored --output=results.json \
        --confusion_png=confusion.png

Every example of the split is seen exactly once, the final partial batch included, under any
--strategy. A corrupt record, or fewer examples evaluated than dataset_info.json lists, is an error
unless --on_bad_record=skip (then a warning with the count and the shards). See docs/analysis.md.
"""

import json

import tensorflow as tf
from absl import app, flags, logging

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import pipelines
from keras_vit import class_names as class_names_lib, evaluation, inference, load_classifier
from keras_vit.analysis import figures
from keras_vit.training.strategy import STRATEGIES, create_strategy
from keras_vit import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, cli.CHECKPOINT_HELP,
    required=True)
_DATA = flags.DEFINE_string(
    "data", None, "TFRecord directory or file pattern (tools/convert_data.py), or tfds:NAME.",
    required=True)
_SPLIT = flags.DEFINE_string("split", "test", "The split to evaluate (ImageNet: validation).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Input side in pixels. Default: the model's. For an .npz another size "
    "resamples the position embeddings.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size (all replicas).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_CONFUSION_PNG = flags.DEFINE_string("confusion_png", None, "Draw the confusion matrix here.")
_LABELS = flags.DEFINE_string("labels", None, "Class names: JSON list or one name per line.")
_LABEL_OFFSET = flags.DEFINE_integer(
    "label_offset", None, "Subtracted from stored labels (1 for 1-based Model Garden ImageNet "
    "shards). Default: from dataset_info.json, else 0.")
_CENTRAL_CROP = flags.DEFINE_float(
    "central_crop_fraction", None, "Keep this central fraction of each side before resizing.")
_ON_BAD_RECORD = flags.DEFINE_enum(
    "on_bad_record", "fail", ["skip", "fail"],
    "fail: stop at a corrupt record or shard, naming it, and exit with an error when fewer "
    "examples were evaluated than the dataset lists. skip: skip and count them, and warn.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", list(STRATEGIES), "tf.distribute strategy, as for tools/train.py.")
_TPU = flags.DEFINE_string("tpu", None, "TPU name or grpc:// address for --strategy=tpu.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Data dir of prepared TFDS datasets.")
_ALLOW_NON_FINITE = flags.DEFINE_bool(
    "allow_non_finite_weights", False, "Load a model whose weights hold NaN or Inf (refused by "
    "default).")


def _check_flags(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; all options are --flags.")
    if _BATCH_SIZE.value < 1:
        raise app.UsageError(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}.")


def _check_all_evaluated(num_evaluated, expected, counters):
    """Delivered vs expected: an error unless --on_bad_record=skip (then a warning).

    Raises:
        pipelines.UserError: fewer or more examples evaluated than the dataset lists.
    """
    skipped = sum(counter.count for counter in counters)
    if expected is None or expected == num_evaluated:
        return
    shards = sorted({path for counter in counters for path in counter.shard_errors})
    message = (f"Evaluated {num_evaluated} examples but {_DATA.value} lists {expected} for split "
               f"'{_SPLIT.value}' ({skipped} skipped as bad"
               + (f"; broken shards: {', '.join(shards[:5])}" if shards else "") + ")")
    if _ON_BAD_RECORD.value == "skip":
        logging.warning("%s.", message)
        return
    raise pipelines.UserError(
        f"{message}. Re-create the data with tools/convert_data.py, or pass "
        "--on_bad_record=skip to evaluate what can be read.")


def _evaluate_naming_bad_data(model, dataset_fn, strategy, num_classes):
    """`evaluation.evaluate`; fail mode's error for a corrupt record or shard as a UserError.

    Raises:
        pipelines.UserError: (fail mode) the pipeline stopped at a corrupt record or shard.
    """
    try:
        return evaluation.evaluate(model, dataset_fn, strategy=strategy, num_classes=num_classes)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
        text = error.message
        if "assertion failed:" not in text or "shard" not in text:
            raise
        text = text.split("assertion failed:", 1)[1].strip().split("\n")[0]
        raise pipelines.UserError(
            f"{_DATA.value} split '{_SPLIT.value}': {text.replace('] [', ' ').strip('[]')}"
        ) from error


def main(argv):
    _check_flags(argv)
    strategy = create_strategy(_STRATEGY.value, _TPU.value)
    with strategy.scope():
        model, class_names = load_classifier(
            _CHECKPOINT.value, image_size=_IMAGE_SIZE.value, class_names_path=_LABELS.value,
            allow_non_finite=_ALLOW_NON_FINITE.value)
    image_size = int(model.input_shape[1])
    if _IMAGE_SIZE.value and _IMAGE_SIZE.value != image_size:
        raise pipelines.UserError(
            f"--image_size={_IMAGE_SIZE.value} but {_CHECKPOINT.value} takes {image_size}-pixel "
            "images; a saved Keras model has a fixed input size (only a checkpoint can be "
            "resampled).")
    num_classes = int(model.output_shape[-1])
    data_class_names, expected = pipelines.describe_source(
        _DATA.value, _SPLIT.value, _TFDS_DATA_DIR.value)
    if data_class_names is not None and len(data_class_names) > num_classes:
        raise pipelines.UserError(
            f"{_DATA.value} has {len(data_class_names)} classes but the model's head has "
            f"{num_classes} outputs; evaluate with a model trained on this dataset.")
    class_names = class_names_lib.resolve_class_names(
        num_classes, class_names or (data_class_names if data_class_names and
                                     len(data_class_names) == num_classes else None))

    # One counter per input pipeline (one per worker), summed after the pass.
    bad_record_counters = []

    def dataset_fn(input_context):
        counter = pipelines.BadRecordCounter()
        bad_record_counters.append(counter)
        batch_size = input_context.get_per_replica_batch_size(_BATCH_SIZE.value)
        return pipelines.build_dataset(
            _DATA.value, split=_SPLIT.value, image_size=image_size, batch_size=batch_size,
            input_context=input_context, training=False, num_classes=num_classes,
            label_offset=_LABEL_OFFSET.value,
            central_crop_fraction=inference.eval_crop_fraction(model, _CENTRAL_CROP.value),
            on_bad_record=_ON_BAD_RECORD.value, tfds_data_dir=_TFDS_DATA_DIR.value,
            bad_record_counter=counter)

    counts, stats = _evaluate_naming_bad_data(model, dataset_fn, strategy, num_classes)
    skipped = sum(counter.count for counter in bad_record_counters)
    summary = counts.summary(class_names)
    per_class = summary.pop("per_class")
    results = {
        **summary, **stats, "num_skipped_records": skipped, "expected_num_examples": expected,
        "checkpoint": _CHECKPOINT.value, "data": _DATA.value, "split": _SPLIT.value,
        "image_size": image_size, "batch_size": _BATCH_SIZE.value, "strategy": _STRATEGY.value,
        "per_class": per_class,
    }
    _check_all_evaluated(counts.num_examples, expected, bad_record_counters)

    print(evaluation.format_report(results))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as stream:
            json.dump(results, stream, indent=1)
        print(f"Wrote {_OUTPUT.value}")
    if _CONFUSION_PNG.value:
        figures.save(figures.confusion_figure(counts.confusion, class_names), _CONFUSION_PNG.value)
        print(f"Wrote {_CONFUSION_PNG.value}")


def run():
    """Console script `keras-vit-evaluate`."""
    cli.run(main)


if __name__ == "__main__":
    run()
