r"""Evaluates a classifier on a dataset: top-1, top-5, per-class accuracy, images/s.

    python tools/evaluate.py --checkpoint=/tmp/run --data=/tmp/digits --split=test
    python tools/evaluate.py --checkpoint=ViT-B_16.npz --image_size=384 --data=tfds:imagenet2012 \
        --split=validation --batch_size=256 --strategy=mirrored --output=results.json \
        --confusion_png=confusion.png
    python tools/evaluate.py --checkpoint=/tmp/run --fewshot_train=/tmp/digits \
        --fewshot_test=/tmp/digits --fewshot_shots=1,5,10,25 --linear_probe --output=probe.json

Every example of the split is seen exactly once, the final partial batch included, under any
--strategy. A corrupt record, or fewer examples evaluated than dataset_info.json lists, is an error
unless --on_bad_record=skip (then a warning with the count and the shards). The --fewshot_*
flags add big_vision's few-shot linear evaluation of the pre-logits features (and --linear_probe
a logistic regression on all of them), "fewshot" and "linear_probe" in --output. See
docs/analysis.md.
"""

import json
import math

import tensorflow as tf
from absl import app, flags, logging

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import pipelines
from keras_vit import class_names as class_names_lib, evaluation, fewshot, inference, probes
from keras_vit import load_classifier
from keras_vit.analysis import figures
from keras_vit.training.strategy import STRATEGIES, create_strategy
from keras_vit import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, cli.CHECKPOINT_HELP,
    required=True)
_DATA = flags.DEFINE_string(
    "data", None, "TFRecord directory or file pattern (tools/convert_data.py), or tfds:NAME. "
    "Optional with --fewshot_train (probes only).")
_SPLIT = flags.DEFINE_string("split", "test", "The split to evaluate (ImageNet: validation).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Input side in pixels. Default: the model's. A checkpoint is "
    "resampled to it; a dynamic-size model takes any multiple of its patch.")
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
_FEWSHOT_TRAIN = flags.DEFINE_string(
    "fewshot_train", None, "Few-shot linear evaluation (big_vision's fewshot_lsr): the data the "
    "shots are drawn from (as --data). See docs/analysis.md.")
_FEWSHOT_TRAIN_SPLIT = flags.DEFINE_string("fewshot_train_split", "train", "Its split.")
_FEWSHOT_TEST = flags.DEFINE_string(
    "fewshot_test", None, "The data few-shot accuracy is measured on, of the same classes. "
    "Default: --fewshot_train.")
_FEWSHOT_TEST_SPLIT = flags.DEFINE_string(
    "fewshot_test_split", None, "Its split. Default: --split.")
_FEWSHOT_SHOTS = flags.DEFINE_list(
    "fewshot_shots", [str(shots) for shots in fewshot.DEFAULT_SHOTS],
    "Training images per class of each few-shot problem.")
_FEWSHOT_SEEDS = flags.DEFINE_integer(
    "fewshot_seeds", fewshot.DEFAULT_SEEDS, "Draws of the shots; accuracy is their mean.",
    lower_bound=1)
_FEWSHOT_L2_REG = flags.DEFINE_float(
    "fewshot_l2_reg", fewshot.DEFAULT_L2_REG, "Ridge regulariser (big_vision: 2^10).")
_FEWSHOT_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "fewshot_train_examples", None, "Read only the first N examples of the few-shot training "
    "split (big_vision: 65000 of ImageNet's train, at least 30 per class).", lower_bound=1)
_LINEAR_PROBE = flags.DEFINE_bool(
    "linear_probe", False, "Also fit a logistic regression on every few-shot training "
    "feature and report its top-1 on the few-shot test split.")
_LINEAR_PROBE_C = flags.DEFINE_float(
    "linear_probe_c", 1.0, "Inverse L2 strength of the linear probe (scikit-learn's C).")
# Settings of the probe, refused without --fewshot_train rather than ignored.
_PROBE_FLAGS = (_FEWSHOT_TRAIN_SPLIT, _FEWSHOT_TEST, _FEWSHOT_TEST_SPLIT, _FEWSHOT_SHOTS,
                _FEWSHOT_SEEDS, _FEWSHOT_L2_REG, _FEWSHOT_TRAIN_EXAMPLES, _LINEAR_PROBE,
                _LINEAR_PROBE_C)
_ALLOW_NON_FINITE = flags.DEFINE_bool(
    "allow_non_finite_weights", False, "Load a model whose weights hold NaN or Inf (refused by "
    "default).")


def _check_flags(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; all options are --flags.")
    if _BATCH_SIZE.value < 1:
        raise app.UsageError(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}.")
    if not _DATA.value and not _FEWSHOT_TRAIN.value:
        raise app.UsageError("Pass --data (the split to evaluate) or --fewshot_train (probes "
                             "only), or both.")
    if _CONFUSION_PNG.value and not _DATA.value:
        raise app.UsageError("--confusion_png draws --data's confusion matrix: pass --data.")
    probe_flags = [flag.name for flag in _PROBE_FLAGS if flag.present]
    if probe_flags and not _FEWSHOT_TRAIN.value:
        raise app.UsageError(f"--{', --'.join(probe_flags)} set the few-shot probe, which "
                             "reads --fewshot_train: pass it.")
    if _FEWSHOT_TRAIN.value:
        _fewshot_settings()  # its flag errors before any model is loaded


def _fewshot_settings():
    """--fewshot_shots and the other probe flags as a `probes.ProbeSettings`."""
    try:
        shots = tuple(int(value) for value in _FEWSHOT_SHOTS.value)
    except ValueError:
        shots = ()
    if not shots or min(shots) < 1:
        raise app.UsageError(f"--fewshot_shots={','.join(_FEWSHOT_SHOTS.value)}: expected "
                             "positive integers such as 1,5,10,25.")
    for flag in (_FEWSHOT_L2_REG, _LINEAR_PROBE_C):
        if not (math.isfinite(flag.value) and flag.value > 0):
            raise app.UsageError(f"--{flag.name}={flag.value}: expected a finite number > 0.")
    return probes.ProbeSettings(shots=shots, seeds=_FEWSHOT_SEEDS.value,
                                l2_reg=_FEWSHOT_L2_REG.value, linear_probe=_LINEAR_PROBE.value,
                                linear_probe_c=_LINEAR_PROBE_C.value)


def _probe(model, image_size):
    """The `probes.Probe` of the --fewshot_* flags, its model and data checked."""
    data = probes.ProbeData(
        train=_FEWSHOT_TRAIN.value, test=_FEWSHOT_TEST.value or _FEWSHOT_TRAIN.value,
        train_split=_FEWSHOT_TRAIN_SPLIT.value,
        test_split=_FEWSHOT_TEST_SPLIT.value or _SPLIT.value,
        max_train_examples=_FEWSHOT_TRAIN_EXAMPLES.value, tfds_data_dir=_TFDS_DATA_DIR.value)
    return probes.Probe(model, data, _fewshot_settings(), image_size=image_size,
                        batch_size=_BATCH_SIZE.value)


def _write_output(results):
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as stream:
            json.dump(results, stream, indent=1)
        print(f"Wrote {_OUTPUT.value}")


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
    image_size = inference.input_image_size(model, _IMAGE_SIZE.value)
    results = {"checkpoint": _CHECKPOINT.value, "image_size": image_size}
    # Checked before the evaluation pass, so a bad probe costs no evaluation.
    probe = _probe(model, image_size) if _FEWSHOT_TRAIN.value else None
    if _DATA.value:
        results.update(_classify(model, class_names, image_size, strategy))
        _write_output(results)  # kept should the probe then fail on its data
    if probe is not None:
        report = probe.run()
        print(probes.format_probes(report))
        results.update(report)
        _write_output(results)


def _classify(model, class_names, image_size, strategy):
    """Top-1/top-5/per-class results on --data --split, printed (and the confusion drawn)."""
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
    if _CONFUSION_PNG.value:
        figures.save(figures.confusion_figure(counts.confusion, class_names), _CONFUSION_PNG.value)
        print(f"Wrote {_CONFUSION_PNG.value}")
    return results


def run():
    """Console script `keras-vit-evaluate`."""
    cli.run(main)


if __name__ == "__main__":
    run()
