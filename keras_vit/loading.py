"""One way to open a trained classifier, whatever form it was saved in.

The command lines (evaluate, predict, export, visualize) accept a `.keras` file, a Google or
keras_vit `.npz` checkpoint, or a training model directory; this module turns any of them into
a model and its class names.

A training model directory (written by tools/train.py) holds:
    model.keras          the final model
    class_names.json     a JSON list of the class names, index = label
    results.json         final metrics
"""

import os

import keras

from keras_vit.checkpoints import from_npz
from keras_vit.class_names import CLASS_NAMES_FILENAME, read_class_names
from pipelines.errors import MissingFileError, UserError

MODEL_FILENAME = "model.keras"


def load_classifier(path, *, image_size=None, num_classes=None, class_names_path=None):
    """Opens a classifier saved as a .keras file, an .npz checkpoint or a model directory.

    Args:
        path: `.keras` file, `.npz` checkpoint, or a directory holding `model.keras`.
        image_size: only for .npz: the input size (position embeddings are resampled).
        num_classes: only for .npz: attach a new zero head of this size.
        class_names_path: a JSON list or one-name-per-line file; overrides the names found
            next to the model.

    Returns:
        (model, class_names): a `keras.Model` taking float32 [0, 255] images and returning
        logits, and a list of class names, or None when none is known.
    """
    class_names = None
    if os.path.isdir(path):
        model_path = os.path.join(path, MODEL_FILENAME)
        if not os.path.exists(model_path):
            raise MissingFileError(
                f"{path} is a directory without {MODEL_FILENAME}: expected a model directory "
                "written by tools/train.py, or pass a .keras or .npz file."
            )
        model = keras.models.load_model(model_path)
        names_path = os.path.join(path, CLASS_NAMES_FILENAME)
        if os.path.exists(names_path):
            class_names = read_class_names(names_path)
    elif path.endswith(".keras"):
        if not os.path.exists(path):
            raise MissingFileError(f"Model file {path} does not exist.")
        model = keras.models.load_model(path)
        names_path = os.path.join(os.path.dirname(path), CLASS_NAMES_FILENAME)
        if os.path.exists(names_path):
            class_names = read_class_names(names_path)
    elif path.endswith(".npz"):
        model = from_npz(path, image_size=image_size, num_classes=num_classes)
    else:
        raise UserError(
            f"Cannot tell what {path} is: expected a .keras file, an .npz checkpoint or a "
            "model directory holding model.keras."
        )
    if class_names_path:
        class_names = read_class_names(class_names_path)
    num_outputs = model.output_shape[-1]
    if class_names is not None and len(class_names) != num_outputs:
        raise UserError(
            f"{len(class_names)} class names for a model with {num_outputs} outputs "
            f"({class_names_path or path}); the names must match the head."
        )
    return model, class_names
