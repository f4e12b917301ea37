r"""What each export format and precision loses against the float32 Keras model, on real images.

    python bench/precision.py --model_dir=/tmp/keras_vit/demo --data=/tmp/keras_vit/digits \
        --split=test --calibration_data=/tmp/keras_vit/digits --calibration_split=train
    python bench/precision.py --model_dir=/tmp/run --images=/photos --calibration_images=/calib
    python bench/precision.py --model_dir=/tmp/run --data=/data/c10 --formats=litert,onnx \
        --skip=litert:int8_full --max_images=512

Loads a trained classifier (a model directory as tools/train.py writes it: model.keras and
class_names.json, `keras_vit.load_classifier`), reads the measured images through the eval
preprocessing (--data/--split: TFRecords through `pipelines.build_dataset`; --images: image files
through `keras_vit.inference.load_images`), then for every format x precision that installs here:
  - saved_model float32/bfloat16: `serving.export_classifier`, run by `tf.saved_model.load` on
    its `predict_pixels` signature;
  - litert, onnx, openvino (`serving.runtimes.EXPORTERS` x `PRECISIONS`): run by
    `serving.run_exported` in its own runtime (LiteRT's interpreter, ONNX Runtime, OpenVINO
    with the export's precision hint).
The calibrated precisions (litert int8_full, openvino int8) calibrate on --calibration_data
(or --calibration_images), which must be other images than the measured ones; without either
they are skipped with a message.

Images go through every model in batches of --batch_size, in the same order (ONNX Runtime's
dynamic int8 quantises activations over the whole batch, so its answers depend on the batch's
other images; the others answer each image alone). Prints per row: the file's size on disk,
top-1 agreement with the float32 Keras model (argmax, ties to the lower class), top-1 accuracy
against the labels when they are known (--data, or --images with one sub-folder per class
named as the model's classes), and the max and mean |difference| of the probabilities over
every image and class. --output writes the same as JSON.
"""

import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Trained model: a directory with model.keras and class_names.json (as "
    "tools/train.py writes), or a .keras file.")
_DATA = flags.DEFINE_string("data", None, "Measured images: TFRecords (tools/convert_data.py).")
_SPLIT = flags.DEFINE_string("split", "test", "--data's split to measure on.")
_IMAGES = flags.DEFINE_string(
    "images", None, "Measured images instead of --data: a folder of image files (labelled when "
    "its sub-folders are named after the model's classes).")
_CALIBRATION_DATA = flags.DEFINE_string(
    "calibration_data", None, "Calibration images for litert int8_full and openvino int8: "
    "TFRecords, other images than the measured ones.")
_CALIBRATION_SPLIT = flags.DEFINE_string("calibration_split", "train", "Its split.")
_CALIBRATION_IMAGES = flags.DEFINE_string(
    "calibration_images", None, "Calibration images instead of --calibration_data: a folder "
    "of image files.")
_CALIBRATION_EXAMPLES = flags.DEFINE_integer(
    "calibration_examples", 128, "Calibration images used (the first ones).", lower_bound=1)
_FORMATS = flags.DEFINE_list(
    "formats", ["saved_model", "litert", "onnx", "openvino"], "Formats to measure.")
_SKIP = flags.DEFINE_list("skip", [], "format:precision pairs not to measure, e.g. litert:int8.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", None, "Measure on the first N images only.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per call of every model.",
                                   lower_bound=1)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Keep the exports here (an empty or new directory). Default: a "
    "temporary directory, removed at the end.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the rows as JSON here (their paths exist with --export_dir).")

EXTENSIONS = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
CALIBRATED = {("litert", "int8_full"), ("openvino", "int8")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def _check_flags():
    """UsageErrors for flag combinations that cannot be measured, before any model is loaded."""
    if not _MODEL_DIR.value:
        raise app.UsageError("Pass --model_dir: a trained model directory (tools/train.py).")
    if bool(_DATA.value) == bool(_IMAGES.value):
        raise app.UsageError("Pass exactly one of --data (TFRecords) and --images (a folder).")
    if _CALIBRATION_DATA.value and _CALIBRATION_IMAGES.value:
        raise app.UsageError("Pass at most one of --calibration_data and --calibration_images.")
    same_records = (_DATA.value and _CALIBRATION_DATA.value and _SPLIT.value ==
                    _CALIBRATION_SPLIT.value and os.path.abspath(_DATA.value) ==
                    os.path.abspath(_CALIBRATION_DATA.value))
    same_folder = (_IMAGES.value and _CALIBRATION_IMAGES.value and
                   os.path.abspath(_IMAGES.value) == os.path.abspath(_CALIBRATION_IMAGES.value))
    if same_records or same_folder:
        raise app.UsageError("The calibration images are the measured images: calibrate on "
                             "another split (--calibration_split) or folder.")
    from keras_vit.serving import verified

    for pair in _SKIP.value:
        file_format, _, precision = pair.partition(":")
        if precision not in verified.PRECISIONS.get(file_format, ()):
            raise app.UsageError(f"--skip={pair}: expected format:precision, e.g. litert:int8.")
    unknown = sorted(set(_FORMATS.value) - set(verified.FORMATS))
    if unknown:
        raise app.UsageError(f"--formats: {', '.join(unknown)} unknown; choose among "
                             f"{', '.join(verified.FORMATS)}.")


def image_files(folder):
    """The image files below `folder`, sorted by path; UsageError when there are none."""
    if not os.path.isdir(folder):
        raise app.UsageError(f"{folder} is not a folder of image files.")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise app.UsageError(f"{folder} holds no {'/'.join(IMAGE_EXTENSIONS)} files.")
    return paths


def folder_labels(paths, folder, class_names):
    """Each file's class index from its first sub-folder below `folder`, or None unless every
    file lies in a sub-folder named after one of `class_names`."""
    if not class_names:
        return None
    index = {name: i for i, name in enumerate(class_names)}
    parts = [os.path.relpath(path, folder).split(os.sep) for path in paths]
    if any(len(part) < 2 or part[0] not in index for part in parts):
        return None
    import numpy as np

    return np.array([index[part[0]] for part in parts], np.int64)


def read_images(model, class_names, *, data, split, folder, limit):
    """Eval-preprocessed images float32 (n, S, S, 3) in [0, 255] and their labels (n,) int64 or
    None: the first `limit` (None: all) of `data`'s `split` or of the files below `folder`."""
    import numpy as np

    from keras_vit import inference
    from keras_vit.serving import served_image_size

    size, crop = served_image_size(model), inference.eval_crop_fraction(model)
    if folder:
        paths = image_files(folder)[:limit]
        labels = folder_labels(paths, folder, class_names)
        return inference.load_images(paths, size, crop), labels
    import pipelines

    # deterministic: the same images in the same order on every run, so the first `limit`
    # and ONNX int8's batches (which change its answers) are the same.
    dataset = pipelines.build_dataset(data, split=split, image_size=size, batch_size=256,
                                      training=False, central_crop_fraction=crop,
                                      on_bad_record="fail", deterministic=True)
    images, labels, count = [], [], 0
    for batch_images, batch_labels in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        count += len(images[-1])
        if limit and count >= limit:
            break
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit].astype(np.int64)


def calibration_images(model, class_names):
    """The calibration images (n, S, S, 3), or None when no calibration source is given."""
    if not (_CALIBRATION_DATA.value or _CALIBRATION_IMAGES.value):
        return None
    images, _ = read_images(model, class_names, data=_CALIBRATION_DATA.value,
                            split=_CALIBRATION_SPLIT.value, folder=_CALIBRATION_IMAGES.value,
                            limit=_CALIBRATION_EXAMPLES.value)
    return images


def cases():
    """(format, precision) pairs to measure, in --formats order, --skip left out."""
    from keras_vit.serving import verified

    return [(file_format, precision) for file_format in _FORMATS.value
            for precision in verified.PRECISIONS[file_format]
            if f"{file_format}:{precision}" not in _SKIP.value]


def export(model, file_format, precision, directory, calibration):
    """Writes one export into `directory`; returns the path run_exported/TensorFlow loads."""
    from keras_vit import serving
    from keras_vit.serving import runtimes

    if file_format == "saved_model":
        # No warmup requests: they are not the model, and need tensorflow-serving-api.
        return serving.export_classifier(
            model, os.path.join(directory, f"saved_model_{precision}"), precision=precision,
            warmup_batch_sizes=()).path
    path = os.path.join(directory, f"{file_format}_{precision}{EXTENSIONS[file_format]}")
    runtimes.EXPORTERS[file_format](model, path, precision=precision,
                                    calibration_images=calibration)
    return path


def size_on_disk(path):
    """Bytes of an export: a SavedModel directory's files, an OpenVINO .xml with its .bin."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(path) for name in names)
    extra = path[:-4] + ".bin" if path.endswith(".xml") else None
    return os.path.getsize(path) + (os.path.getsize(extra) if extra else 0)


def probabilities_of(path, images, batch_size):
    """float32 (n, K) probabilities of the export at `path` on `images`, `batch_size` at a
    time: a SavedModel's predict_pixels in TensorFlow, any other file in its own runtime."""
    import numpy as np

    if os.path.isdir(path):
        import tensorflow as tf

        signature = tf.saved_model.load(path).signatures["predict_pixels"]
        call = lambda batch: signature(images=tf.constant(batch))["probabilities"].numpy()  # noqa
    else:
        from keras_vit.serving import run_exported

        runner = run_exported.load(path)
        call = lambda batch: runner(batch)["probabilities"]  # noqa: E731
    return np.concatenate([call(images[start:start + batch_size])
                           for start in range(0, len(images), batch_size)]).astype(np.float32)


def compare(probabilities, reference, labels):
    """Row statistics of `probabilities` (n, K) against the Keras model's `reference` (n, K):
    agreement and accuracy as (correct, n) counts, max and mean |dp|."""
    import numpy as np

    predicted = np.argmax(probabilities, axis=1)  # ties to the lower class, as np.argmax does
    difference = np.abs(probabilities.astype(np.float64) - reference)
    row = {"agree": int(np.sum(predicted == np.argmax(reference, axis=1))),
           "images": int(len(predicted)), "max_dp": float(difference.max()),
           "mean_dp": float(difference.mean())}
    if labels is not None:
        row["correct"] = int(np.sum(predicted == labels))
    return row


def measure(model, images, labels, calibration, directory):
    """The Keras reference row, then one row per case that exports and runs here."""
    from keras_vit import inference

    reference = inference.softmax(inference.predict_logits(model, images, _BATCH_SIZE.value))
    rows = [{"format": "keras", "precision": "float32", "size": None,
             **compare(reference, reference, labels)}]
    for file_format, precision in cases():
        if (file_format, precision) in CALIBRATED and calibration is None:
            print(f"skipped {file_format} {precision}: calibrated; pass --calibration_data or "
                  "--calibration_images")
            continue
        try:
            path = export(model, file_format, precision, directory, calibration)
            probabilities = probabilities_of(path, images, _BATCH_SIZE.value)
        except ImportError as error:  # MissingExtraError included: names what to install
            print(f"skipped {file_format} {precision}: {error}")
            continue
        logging.info("measured %s %s (%s)", file_format, precision, path)
        rows.append({"format": file_format, "precision": precision, "path": path,
                     "size": size_on_disk(path), **compare(probabilities, reference, labels)})
    return rows


def _percent(count, total):
    return f"{100.0 * count / total:.1f}% ({count}/{total})"


def format_table(rows):
    """The rows as a text table; the accuracy column only when labels are known."""
    labelled = "correct" in rows[0]
    header = (f"{'format':<12}{'precision':<11}{'size kB':>10}  {'top-1 agreement':<20}"
              + (f"{'top-1 accuracy':<20}" if labelled else "") + f"{'max |dp|':>10}"
              f"{'mean |dp|':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        size = "" if row["size"] is None else f"{row['size'] / 1e3:.1f}"
        accuracy = f"{_percent(row['correct'], row['images']):<20}" if labelled else ""
        lines.append(f"{row['format']:<12}{row['precision']:<11}{size:>10}  "
                     f"{_percent(row['agree'], row['images']):<20}{accuracy}"
                     f"{row['max_dp']:>10.1e}{row['mean_dp']:>11.1e}")
    return "\n".join(lines)


def _header(images, calibration):
    source = _IMAGES.value or f"{_DATA.value} split {_SPLIT.value}"
    load = os.getloadavg()
    calibrated = (f"{len(calibration)} of {_CALIBRATION_IMAGES.value or _CALIBRATION_DATA.value}"
                  + ("" if _CALIBRATION_IMAGES.value else f" split {_CALIBRATION_SPLIT.value}")
                  if calibration is not None else "none")
    return (f"model={_MODEL_DIR.value} images={len(images)} of {source} "
            f"size={images.shape[1]} batch={_BATCH_SIZE.value} calibration={calibrated} "
            f"cpus={os.cpu_count()} load(1/5/15 min)={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} "
            f"date={time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; all options are --flags.")
    _check_flags()
    from keras_vit import load_classifier

    model, class_names = load_classifier(_MODEL_DIR.value)
    images, labels = read_images(model, class_names, data=_DATA.value, split=_SPLIT.value,
                                 folder=_IMAGES.value, limit=_MAX_IMAGES.value)
    calibration = calibration_images(model, class_names)
    directory = _EXPORT_DIR.value or tempfile.mkdtemp(prefix="keras_vit_precision_")
    try:
        rows = measure(model, images, labels, calibration, directory)
    finally:
        if not _EXPORT_DIR.value:
            shutil.rmtree(directory, ignore_errors=True)
    header = _header(images, calibration)
    print(header)
    print(format_table(rows))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as stream:
            json.dump({"header": header, "rows": rows}, stream, indent=1)


if __name__ == "__main__":
    from keras_vit import cli

    cli.run(main)  # a UserError (missing file, bad image) as one `error: ...` line, exit 2
