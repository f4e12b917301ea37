r"""Exports a trained classifier for TensorFlow Serving: EXPORT_DIR/<version>/ SavedModel.

    python tools/export.py --model_dir=/tmp/vit_digits --export_dir=/models/vit
    python tools/export.py --checkpoint=ViT-B_16.npz --num_classes=1000 \
        --class_names=imagenet_classes.txt --export_dir=/models/vit --version=7 --top_k=5

Signatures `serving_default` (image_bytes: encoded images) and `predict_pixels` (images:
float32 pixels in [0, 255]); see docs/serving.md for serving and querying it.
"""

import json
import os

from absl import app, flags, logging

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import keras_vit
from keras_vit import serving
from keras_vit import cli
from keras_vit.serving import export as export_lib

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Training model directory (model.keras, class_names.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, cli.CHECKPOINT_HELP)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Model base path TF Serving watches; versions go below it.", required=True)
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
_ALLOW_NON_FINITE = flags.DEFINE_bool(
    "allow_non_finite_weights", False, "Load a model whose weights hold NaN or Inf (refused by "
    "default).")


def main(argv):
    del argv
    if bool(_MODEL_DIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("Pass exactly one of --model_dir or --checkpoint.")
    source = _MODEL_DIR.value or _CHECKPOINT.value
    if _MODEL_DIR.value and not os.path.isdir(_MODEL_DIR.value):
        raise keras_vit.MissingFileError(f"--model_dir={_MODEL_DIR.value} is not a directory.")
    model, class_names = keras_vit.load_classifier(
        source,
        image_size=_IMAGE_SIZE.value,
        num_classes=_NUM_CLASSES.value,
        class_names_path=_CLASS_NAMES.value,
        allow_non_finite=_ALLOW_NON_FINITE.value,
    )
    if class_names is None:
        logging.warning("No class names found for %s: labels will be class_0, class_1, ...", source)
    exported = serving.export_classifier(
        model,
        _EXPORT_DIR.value,
        class_names=class_names,
        version=_VERSION.value,
        top_k=_TOP_K.value,
        central_crop_fraction=_CENTRAL_CROP_FRACTION.value,
        max_image_pixels=_MAX_IMAGE_PIXELS.value or None,
    )
    print(json.dumps({
        "export_path": exported.path,
        "version": exported.version,
        "signatures": [serving.SERVING_SIGNATURE, serving.PIXELS_SIGNATURE],
        "image_size": exported.image_size,
        "num_classes": exported.num_classes,
        "top_k": exported.top_k,
        "max_image_pixels": exported.max_image_pixels,
        "weight_bytes": exported.weight_bytes,
        "variables_bytes": exported.variables_bytes,
    }))


def run():
    """Console script `keras-vit-export`."""
    cli.run(main)


if __name__ == "__main__":
    run()
