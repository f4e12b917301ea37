"""One way to open a trained classifier, whatever form it was saved in.

The command lines (evaluate, predict, export, visualize) accept a `.keras` file, a training
model directory, or any checkpoint `keras_vit.from_checkpoint` reads (a Google, keras_vit or
big_vision `.npz`, a timm or Hugging Face folder, a `.safetensors` file, a registry name); this
module turns any of them into a model and its class names.

A training model directory (written by tools/train.py) holds:
    model.keras          the final model
    class_names.json     a JSON list of the class names, index = label
    results.json         final metrics

Every form is checked for NaN and Inf weights (a diverged run), which are refused unless
`allow_non_finite=True`.
"""

import os
import tempfile
import zipfile

import keras

from keras_vit.checkpoints import CheckpointError, build_model, check_finite
from keras_vit.class_names import CLASS_NAMES_FILENAME, read_class_names
from keras_vit.sources import read_checkpoint
from pipelines.errors import MissingFileError, UserError

MODEL_FILENAME = "model.keras"
# The members `keras.Model.save` writes into a .keras archive.
_KERAS_ARCHIVE_MEMBERS = ("config.json", "model.weights.h5")


def load_classifier(path, *, image_size=None, num_classes=None, class_names_path=None,
                    allow_non_finite=False):
    """Opens a classifier saved as a .keras file, a model directory or any checkpoint.

    Args:
        path: `.keras` file, a directory holding `model.keras`, or a checkpoint (file, folder
            or registry name) as `keras_vit.from_checkpoint` takes it.
        image_size: only for checkpoints: the input size (position embeddings are resampled).
        num_classes: only for checkpoints: attach a new zero head of this size.
        class_names_path: a JSON list or one-name-per-line file; overrides the names found
            next to the model or in the checkpoint (Hugging Face's id2label, timm's label names).
        allow_non_finite: load weights holding NaN or Inf instead of refusing them.

    Returns:
        (model, class_names): a `keras.Model` taking float32 [0, 255] images and returning
        logits, and a list of class names, or None when none is known.

    Raises:
        MissingFileError: `path` (or the directory's model.keras) does not exist.
        CheckpointError: the file is not a readable model or checkpoint, or its weights hold
            NaN or Inf (each such weight is named).
        UserError: the class names do not match the head.
    """
    if _is_remote(path):
        with tempfile.TemporaryDirectory() as local:
            return load_classifier(
                _local_copy(path, local), image_size=image_size, num_classes=num_classes,
                class_names_path=class_names_path, allow_non_finite=allow_non_finite)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MODEL_FILENAME)):
        model, class_names = _load_keras(os.path.join(path, MODEL_FILENAME), allow_non_finite)
    elif str(path).endswith(".keras"):
        if not os.path.exists(path):
            raise MissingFileError(f"Model file {path} does not exist.")
        model, class_names = _load_keras(path, allow_non_finite)
    else:
        model, class_names = _load_checkpoint(path, image_size, num_classes, allow_non_finite)
    if class_names_path:
        class_names = read_class_names(class_names_path)
    num_outputs = model.output_shape[-1]
    if class_names is not None and len(class_names) != num_outputs:
        raise UserError(
            f"{len(class_names)} class names for a model with {num_outputs} outputs "
            f"({class_names_path or path}); the names must match the head."
        )
    return model, class_names


def _is_remote(path):
    """A path of another file system of `tf.io.gfile` (gs://, s3://, ram://, ...)."""
    return "://" in str(path) and not str(path).startswith(("http://", "https://"))


def _local_copy(path, local_dir):
    """Copies a remote file, or a remote folder's files (not its subfolders: a training model
    directory's model.keras, class_names.json and results.json, a checkpoint folder's files),
    into `local_dir` with `tf.io.gfile`; returns the local path to load.

    Raises:
        MissingFileError: `path` does not exist.
    """
    import tensorflow as tf  # Here: the model code imports no TensorFlow (JAX hosts lack it).

    if not tf.io.gfile.exists(path):
        raise MissingFileError(f"{path} does not exist.")
    name = os.path.basename(str(path).rstrip("/")) or "model"
    if not tf.io.gfile.isdir(path):
        target = os.path.join(local_dir, name)
        tf.io.gfile.copy(path, target)
        return target
    target = os.path.join(local_dir, name)
    os.makedirs(target)
    for entry in tf.io.gfile.listdir(path):
        source = os.path.join(str(path), entry.rstrip("/"))
        if not tf.io.gfile.isdir(source):
            tf.io.gfile.copy(source, os.path.join(target, entry))
    return target


def _load_checkpoint(path, image_size, num_classes, allow_non_finite):
    """A checkpoint's model (`from_checkpoint`) and the class names it carries, if any."""
    converted = read_checkpoint(path, image_size=image_size)
    model = build_model(converted.arrays, converted.source, options=converted.options,
                        image_size=image_size, num_classes=num_classes,
                        allow_non_finite=allow_non_finite)
    new_head = num_classes is not None and converted.class_names is not None and (
        num_classes != len(converted.class_names))
    return model, None if new_head else converted.class_names


def _load_keras(model_path, allow_non_finite):
    """A .keras file's model, with its weights checked, and the class names beside it."""
    _check_keras_archive(model_path)
    try:
        # safe_mode stays on: a .keras file with Lambda layers is refused, not executed.
        model = keras.models.load_model(model_path)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointError(
            f"{model_path} is not a readable .keras archive (truncated or corrupt: {error}); "
            "save or download it again."
        ) from error
    except (ValueError, TypeError) as error:
        # Keras's reason: a layer not registered here, a Lambda refused by safe_mode, ...;
        # its first line only, as the rest can be the whole model config.
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
        raise CheckpointError(
            f"{model_path} could not be rebuilt as a Keras model: {reason} Expected a model "
            "saved by keras_vit (create_model, from_npz or tools/train.py)."
        ) from error
    check_finite(((variable.path, variable.numpy()) for variable in model.weights), model_path,
                 allow_non_finite=allow_non_finite)
    names_path = os.path.join(os.path.dirname(model_path), CLASS_NAMES_FILENAME)
    class_names = read_class_names(names_path) if os.path.exists(names_path) else None
    return model, class_names


def _check_keras_archive(model_path):
    """Raises a CheckpointError naming `model_path` unless it is a zip holding a Keras model.

    Keras itself reports a truncated archive as "File not found".
    """
    try:
        with zipfile.ZipFile(model_path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CheckpointError(
            f"{model_path} is not a readable .keras archive (truncated or corrupt: {error}); "
            "expected a zip file as keras.Model.save writes it. Save or download it again."
        ) from error
    missing = [name for name in _KERAS_ARCHIVE_MEMBERS if name not in members]
    if missing:
        raise CheckpointError(
            f"{model_path} is a zip file but not a .keras model archive: it lacks {missing} "
            f"(holds {sorted(members)[:8]}). Expected a file written by keras.Model.save."
        )
