"""Class names: reading, writing, and the names a head gets when none are known.

The one home of class-name handling. A training model directory keeps them in
`class_names.json` (a JSON list, index = label); users may also pass a text file with one name
per line. A head without known names gets ImageNet's 1000 names when it has 1000 outputs, else
`fallback_class_names`: the same labels in evaluation reports, training model directories and
the SavedModel's `labels` output.
"""

import importlib.resources
import json
import os

from pipelines.errors import MissingFileError, UserError

CLASS_NAMES_FILENAME = "class_names.json"
IMAGENET_CLASS_NAMES = "imagenet_class_names.json"


def fallback_class_names(num_classes):
    """["class_0", ..., "class_{K-1}"]: the names of a head whose classes have none."""
    return [f"class_{index}" for index in range(num_classes)]


def imagenet_class_names():
    """The 1000 ImageNet-1k class names in label order (index 0 = "tench"), shipped with
    the package (from Keras's imagenet_class_index.json)."""
    text = importlib.resources.files("keras_vit").joinpath("data", IMAGENET_CLASS_NAMES).read_text(
        encoding="utf-8"
    )
    return json.loads(text)


def resolve_class_names(num_classes, class_names=None):
    """Names for a `num_classes`-way head: the given ones, else ImageNet's for 1000 classes,
    else `fallback_class_names`. Raises UserError when the given names do not match the head."""
    if class_names is not None:
        if len(class_names) != num_classes:
            raise UserError(
                f"{len(class_names)} class names for a model with {num_classes} outputs; pass a "
                "labels file with one name per output."
            )
        return list(class_names)
    if num_classes == 1000:
        return imagenet_class_names()
    return fallback_class_names(num_classes)


def read_class_names(path):
    """Reads class names from a JSON list or a text file with one name per line.

    Raises:
        MissingFileError: `path` does not exist.
        UserError: the file is not UTF-8 text, or a .json file is not a JSON list of strings;
            the message names the file.
    """
    import tensorflow as tf  # Here: the model code imports no TensorFlow (JAX hosts lack it).

    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise MissingFileError(f"Class-names file {path} does not exist.")
    try:
        with tf.io.gfile.GFile(path, "rb") as stream:
            text = stream.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}): expected class "
            "names as a JSON list or one name per line, saved as UTF-8."
        ) from error
    if path.endswith(".json"):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column "
                f"{error.colno}): expected a JSON list of class-name strings."
            ) from error
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise UserError(f"{path} must hold a JSON list of class-name strings.")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_class_names(class_names, directory):
    """Writes `directory/class_names.json`; returns its path."""
    import tensorflow as tf  # Here, as in read_class_names.

    path = os.path.join(directory, CLASS_NAMES_FILENAME)
    with tf.io.gfile.GFile(path, "w") as stream:  # any file system: gs://, ...
        stream.write(json.dumps(list(class_names), indent=1))
    return path
