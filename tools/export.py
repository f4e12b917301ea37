r"""Exports a trained classifier: a TF Serving SavedModel, or a LiteRT, ONNX or OpenVINO file.

    python tools/export.py --model_dir=/tmp/vit_digits --export_dir=/models/vit
    python tools/export.py --checkpoint=augreg_B/16_i21k_ft_i1k --export_dir=/models/vit \
        --precision=bfloat16 --warmup_batch_sizes=1,8
    python tools/export.py --model_dir=/tmp/run --format=onnx --output=/out/vit.onnx
    python tools/export.py --model_dir=/tmp/run --format=litert --precision=int8_full \
        --calibration_data=/data/in1k --output=/out/vit.tflite
    python tools/export.py --model_dir=/tmp/run --export_dir=/models/vit \
        --signatures=serving_default,predict_pixels,features,explain --features_output=spatial
    python tools/export.py --verify=/models/vit/3          # re-check an export, anywhere

A SavedModel goes to EXPORT_DIR/<version>/ with the signatures serving_default (encoded
images), predict_pixels (float32 [0, 255] pixels), predict_tf_example and predict_image_tensor,
and TF Serving's warmup requests (--signatures adds `features`, a representation, and
`explain`, top-k with the attention-rollout heat map); the other formats take float32
`images` (batch, S, S, 3) in [0, 255]. Every export is run in its own runtime on a probe batch
before it is published, and refused beyond its precision's bound; its manifest
(keras_vit_export.json) is published with it (docs/serving.md).
"""

import dataclasses
import json
import os

from absl import app, flags, logging

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import keras_vit
from keras_vit import cli, serving
from keras_vit.serving import export as export_lib
from keras_vit.serving import manifest, representations, verified

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Training model directory (model.keras, class_names.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, cli.CHECKPOINT_HELP)
_FORMAT = flags.DEFINE_enum("format", "saved_model", list(verified.FORMATS), "What to export.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "saved_model: the base path TF Serving watches; versions go below it.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "litert, onnx, openvino: the file to write (.tflite, .onnx, .xml + .bin).")
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", ["float32", "bfloat16", "float16", "int8", "int8_full"],
    "saved_model: float32|bfloat16; litert: float32|float16|int8 (dynamic range)|int8_full "
    "(calibrated); onnx: float32|int8; openvino: float32|bfloat16|int8 (calibrated, NNCF).")
_CALIBRATION_DATA = flags.DEFINE_string(
    "calibration_data", None, "Calibrated int8: TFRecords or a tfds name, read through the eval "
    "pipeline.")
_CALIBRATION_SPLIT = flags.DEFINE_string("calibration_split", "train", "Its split.")
_CALIBRATION_EXAMPLES = flags.DEFINE_integer(
    "calibration_examples", 64, "Images to calibrate on.", lower_bound=1)
_WARMUP_BATCH_SIZES = flags.DEFINE_list(
    "warmup_batch_sizes", ["1", "8"], "saved_model: batch sizes of TF Serving's warmup requests "
    "(one per signature each); empty for none.")
_PROBE_IMAGES = flags.DEFINE_list(
    "probe_images", [], "Image files the export is verified on (default: scikit-learn's digits "
    "in colour; for a calibrated int8 export, the 8 images of --calibration_data after those it "
    "calibrates on).")
_VERIFY = flags.DEFINE_string(
    "verify", None, "Only re-run the check of this export (a SavedModel version directory or a "
    "file) against the manifest beside it.")
_VERSION = flags.DEFINE_integer("version", None, "Version number. Default: the next free one.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Best classes returned per image.")
_CLASS_NAMES = flags.DEFINE_string(
    "class_names", None, "JSON list or one-name-per-line file; overrides the model's names.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Checkpoints only: input size (position embeddings are resampled).")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Checkpoints only: attach a new zero head of this many classes.")
_CENTRAL_CROP_FRACTION = flags.DEFINE_float(
    "central_crop_fraction", None,
    "Central crop of the eval preprocessing (e.g. 0.875); match the evaluation you measured.")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", export_lib.DEFAULT_MAX_IMAGE_PIXELS,
    "serving_default refuses images whose header declares more pixels (height x width), "
    "before decoding them; 0 for no cap.", lower_bound=0)
_SIGNATURES = flags.DEFINE_list(
    "signatures", list(serving.DEFAULT_SIGNATURES), "saved_model: the signatures to export, of "
    f"{', '.join(serving.ALL_SIGNATURES)}; serving_default and predict_pixels are always "
    "exported (TF Serving's default; the export is verified through predict_pixels).")
_FEATURES_OUTPUT = flags.DEFINE_enum(
    "features_output", representations.DEFAULT_FEATURES_OUTPUT,
    ["pre_logits", "tokens", "spatial"], "features signature: the pooled features the head "
    "reads (batch, D), a block's patch tokens (batch, N, D), or their map (batch, S/P, S/P, D).")
_FEATURES_BLOCK = flags.DEFINE_integer(
    "features_block", None, "features signature, tokens/spatial: the encoder block (negative "
    "from the end); default the last.")
_FEATURES_NORM = flags.DEFINE_bool(
    "features_norm", False, "features signature, tokens/spatial: through the final LayerNorm.")
_EXPLAIN_RESIDUAL_WEIGHT = flags.DEFINE_float(
    "explain_residual_weight", representations.DEFAULT_RESIDUAL_WEIGHT,
    "explain signature: rollout weight of the identity added to each attention map (as "
    "tools/visualize.py --residual_weight).")
_ALLOW_NON_FINITE = flags.DEFINE_bool(
    "allow_non_finite_weights", False, "Load a model whose weights hold NaN or Inf (refused by "
    "default).")


def main(argv):
    del argv
    if _VERIFY.value:
        print(json.dumps(verified.verify_export(_VERIFY.value)))
        return
    source = _source()
    verified.check_format(_FORMAT.value, _PRECISION.value)
    signatures = export_lib.checked_signatures(_SIGNATURES.value)
    options = _representation_options(signatures)  # checked before the model is loaded
    model, class_names = keras_vit.load_classifier(
        source, image_size=_IMAGE_SIZE.value, num_classes=_NUM_CLASSES.value,
        class_names_path=_CLASS_NAMES.value, allow_non_finite=_ALLOW_NON_FINITE.value)
    if _FORMAT.value == "saved_model":
        if class_names is None:
            logging.warning("No class names found for %s: labels will be class_0, ...", source)
        exported, record = verified.export_verified(
            model, "saved_model", export_dir=_EXPORT_DIR.value, **_common(model, source),
            class_names=class_names, version=_VERSION.value,
            central_crop_fraction=_CENTRAL_CROP_FRACTION.value,
            max_image_pixels=_MAX_IMAGE_PIXELS.value or None,
            warmup_batch_sizes=tuple(int(size) for size in _WARMUP_BATCH_SIZES.value),
            signatures=signatures, **options)
        path, summary = exported.path, dataclasses.asdict(exported)
        summary["signatures"] = list(summary["signatures"])
        del summary["path"]
    else:
        calibration, held_out = _calibration_images(model)
        path, record = verified.export_verified(
            model, _FORMAT.value, output=_OUTPUT.value,
            **_common(model, source, default_probe=held_out), calibration_images=calibration)
        summary = {"precision": _PRECISION.value}
    print(json.dumps({"export_path": path, "format": _FORMAT.value, **summary,
                      "manifest": verified.manifest_path(path),
                      "verification": record["verification"], "bytes": _size(path)}))


def _source():
    """--model_dir or --checkpoint, and the output flag the format needs, checked."""
    if bool(_MODEL_DIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("Pass exactly one of --model_dir or --checkpoint (or --verify).")
    if _MODEL_DIR.value and not os.path.isdir(_MODEL_DIR.value):
        raise keras_vit.MissingFileError(f"--model_dir={_MODEL_DIR.value} is not a directory.")
    needed, other = ((_EXPORT_DIR, _OUTPUT) if _FORMAT.value == "saved_model"
                     else (_OUTPUT, _EXPORT_DIR))
    if not needed.value or other.value:
        raise app.UsageError(f"--format={_FORMAT.value} writes to --{needed.name}, not "
                             f"--{other.name}.")
    saved_model_only = [flag.name for flag in (_SIGNATURES, _FEATURES_OUTPUT, _FEATURES_BLOCK,
                                               _FEATURES_NORM, _EXPLAIN_RESIDUAL_WEIGHT)
                        if flag.present]
    if _FORMAT.value != "saved_model" and saved_model_only and (
            saved_model_only != ["signatures"]
            or tuple(_SIGNATURES.value) != serving.DEFAULT_SIGNATURES):
        raise app.UsageError(
            f"--format={_FORMAT.value} has one interface, predict_pixels' (images in, top-k "
            f"out); --{', --'.join(saved_model_only)} apply to --format=saved_model only.")
    return _MODEL_DIR.value or _CHECKPOINT.value


def _representation_options(signatures):
    """The features and explain signatures' options from their flags; a UsageError for an
    option of a signature --signatures does not export (it would be ignored)."""
    for signature, options in ((serving.FEATURES_SIGNATURE,
                                (_FEATURES_OUTPUT, _FEATURES_BLOCK, _FEATURES_NORM)),
                               (serving.EXPLAIN_SIGNATURE, (_EXPLAIN_RESIDUAL_WEIGHT,))):
        given = [flag.name for flag in options if flag.present]
        if given and signature not in signatures:
            raise app.UsageError(f"--{', --'.join(given)} set the {signature} signature, which "
                                 f"is exported only when --signatures names it.")
    return dict(
        feature_options=representations.FeatureOptions(
            _FEATURES_OUTPUT.value, _FEATURES_BLOCK.value, _FEATURES_NORM.value),
        explain_options=representations.ExplainOptions(_EXPLAIN_RESIDUAL_WEIGHT.value))


def _common(model, source, default_probe=None):
    """export_verified's arguments common to every format; the probe batch is --probe_images,
    else `default_probe`, else (None) the manifest's digits."""
    probe = default_probe
    if _PROBE_IMAGES.value:
        probe = manifest.probe_images(export_lib.served_image_size(model), _PROBE_IMAGES.value)
    return dict(precision=_PRECISION.value, source=_file_read(source), probe_images=probe,
                top_k=_TOP_K.value)


def _file_read(source):
    """The file or folder the model was read from, for the manifest's sha256: a model
    directory's model.keras, a registry name's cached download."""
    from keras_vit import loading, sources

    if os.path.isdir(source) and os.path.exists(os.path.join(source, loading.MODEL_FILENAME)):
        return os.path.join(source, loading.MODEL_FILENAME)
    return sources.local_path(source)


def _calibration_images(model):
    """--calibration_data's first --calibration_examples images, float32 (n, S, S, 3), and
    the next `manifest.PROBE_SIZE` (or fewer; None when none are left) as the probe batch: a
    calibrated model is verified on images like those it was calibrated on, which the
    coloured digits of the default probe batch are not. (None, None) when not calibrated."""
    if _PRECISION.value not in ("int8_full",) and not (
            _FORMAT.value == "openvino" and _PRECISION.value == "int8"):
        return None, None
    if not _CALIBRATION_DATA.value:
        raise app.UsageError(f"--format={_FORMAT.value} --precision={_PRECISION.value} is "
                             "calibrated: pass --calibration_data.")
    import numpy as np

    import pipelines

    dataset = pipelines.build_dataset(
        _CALIBRATION_DATA.value, split=_CALIBRATION_SPLIT.value,
        image_size=export_lib.served_image_size(model),
        batch_size=_CALIBRATION_EXAMPLES.value + manifest.PROBE_SIZE,
        training=False)  # the images only: the labels may be of another task
    images, _ = next(iter(dataset))
    images = np.asarray(images, np.float32)
    count = _CALIBRATION_EXAMPLES.value
    return images[:count], (images[count:] if len(images) > count else None)


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path) + (os.path.getsize(path[:-4] + ".bin")
                                    if path.endswith(".xml") else 0)


def run():
    """Console script `keras-vit-export`."""
    cli.run(main)


if __name__ == "__main__":
    run()
