r"""Top-5 classes of images.

    python tools/predict.py --checkpoint=/tmp/run cat.jpg dog.png
    python tools/predict.py --checkpoint=ViT-B_16.npz --image_size=384 --json photo.jpg

Class names come from the model directory (class_names.json), from --labels, or, for a
1000-class model, the ImageNet names shipped with keras_vit. Images are preprocessed as in
evaluation (pipelines.preprocess_for_eval).
"""

import json

from absl import app, flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
from keras_vit import class_names as class_names_lib, inference, load_classifier
from keras_vit import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A .keras file, an .npz checkpoint or a training model directory.",
    required=True)
_LABELS = flags.DEFINE_string("labels", None, "Class names: JSON list or one name per line.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Only for .npz: input side in pixels (default: the checkpoint's).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "How many classes to list per image.")
_CENTRAL_CROP = flags.DEFINE_float(
    "central_crop_fraction", None, "Keep this central fraction of each side before resizing.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per image instead of a table.")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give one or more image files: predict.py --checkpoint=PATH IMAGE...")
    model, class_names = load_classifier(
        _CHECKPOINT.value, image_size=_IMAGE_SIZE.value, class_names_path=_LABELS.value)
    class_names = class_names_lib.resolve_class_names(int(model.output_shape[-1]), class_names)
    images = inference.load_images(paths, int(model.input_shape[1]), _CENTRAL_CROP.value)
    indices, probabilities = inference.top_k_predictions(
        inference.predict_logits(model, images), _TOP_K.value)
    for path, top_indices, top_probabilities in zip(paths, indices, probabilities):
        predictions = [
            {"class": class_names[i], "index": int(i), "probability": float(p)}
            for i, p in zip(top_indices, top_probabilities)
        ]
        if _JSON.value:
            print(json.dumps({"image": path, "predictions": predictions}))
            continue
        print(path)
        for rank, prediction in enumerate(predictions, 1):
            print(f"  {rank}. {prediction['probability']:.4f}  {prediction['class']} "
                  f"({prediction['index']})")


def run():
    """Console script `keras-vit-predict`."""
    cli.run(main)


if __name__ == "__main__":
    run()
