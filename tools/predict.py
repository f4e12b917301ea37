r"""Top-5 classes of images.

    python tools/predict.py --checkpoint=/tmp/run cat.jpg dog.png
    python tools/predict.py --checkpoint=ViT-B_16.npz --image_size=384 --json photo.jpg

Class names come from the model directory (class_names.json), from --labels, or, for a
1000-class model, the ImageNet names shipped with keras_vit. Images are preprocessed as in
evaluation (pipelines.preprocess_for_eval).
"""

import json
import math
import sys

from absl import app, flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
from keras_vit import class_names as class_names_lib, inference, load_classifier
from keras_vit import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, cli.CHECKPOINT_HELP,
    required=True)
_LABELS = flags.DEFINE_string("labels", None, "Class names: JSON list or one name per line.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Input side in pixels. Default: the model's. A checkpoint is "
    "resampled to it; a dynamic-size model takes any multiple of its patch.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "How many classes to list per image.")
_CENTRAL_CROP = flags.DEFINE_float(
    "central_crop_fraction", None, "Keep this central fraction of each side before resizing.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per image instead of a table.")
_ALLOW_NON_FINITE = flags.DEFINE_bool(
    "allow_non_finite_weights", False,
    "Load a model whose weights hold NaN or Inf (refused by default); its probabilities are "
    "then printed as null in --json.")
flags.register_validator("top_k", lambda value: value >= 1,
                         message="--top_k must be at least 1 (how many classes to list per image).")
flags.register_validator(
    "image_size", lambda value: value is None or value >= 1,
    message="--image_size must be a positive number of pixels.")


def _predictions(class_names, top_indices, top_probabilities):
    """One image's ranked classes; a probability that is not finite (NaN weights loaded with
    --allow_non_finite_weights) becomes None, JSON's null."""
    return [
        {"class": class_names[i], "index": int(i),
         "probability": float(p) if math.isfinite(p) else None}
        for i, p in zip(top_indices, top_probabilities)
    ]


def _print_table(path, predictions):
    print(path)
    for rank, prediction in enumerate(predictions, 1):
        probability = prediction["probability"]
        shown = "nan" if probability is None else f"{probability:.4f}"
        print(f"  {rank}. {shown}  {prediction['class']} ({prediction['index']})")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give one or more image files: predict.py --checkpoint=PATH IMAGE...")
    model, class_names = load_classifier(
        _CHECKPOINT.value, image_size=_IMAGE_SIZE.value, class_names_path=_LABELS.value,
        allow_non_finite=_ALLOW_NON_FINITE.value)
    class_names = class_names_lib.resolve_class_names(int(model.output_shape[-1]), class_names)
    images = inference.load_images(paths, inference.input_image_size(model, _IMAGE_SIZE.value),
                                   inference.eval_crop_fraction(model, _CENTRAL_CROP.value))
    indices, probabilities = inference.top_k_predictions(
        inference.predict_logits(model, images), _TOP_K.value)
    for path, top_indices, top_probabilities in zip(paths, indices, probabilities):
        predictions = _predictions(class_names, top_indices, top_probabilities)
        if any(prediction["probability"] is None for prediction in predictions):
            print(f"warning: {path}: the model's probabilities are not finite (NaN or Inf).",
                  file=sys.stderr)
        if _JSON.value:
            print(json.dumps({"image": path, "predictions": predictions}, allow_nan=False))
        else:
            _print_table(path, predictions)


def run():
    """Console script `keras-vit-predict`."""
    cli.run(main)


if __name__ == "__main__":
    run()
