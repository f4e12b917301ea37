"""Predicting on image files: read and preprocess them as evaluation does, run the model,
rank the classes.

    images = load_images(["cat.jpg"], image_size=224)        # (1, 224, 224, 3) in [0, 255]
    indices, probabilities = top_k_predictions(predict_logits(model, images), k=5)
"""

import re

import numpy as np
import tensorflow as tf

import pipelines
from keras_vit.model import built_image_size
from pipelines.errors import MissingFileError, UserError
from pipelines.preprocess import sniff_format


def softmax(logits):
    """Softmax over the last axis, in float64. (..., num_classes) -> (..., num_classes)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k_predictions(logits, k=5):
    """The k most probable classes of each example, most probable first.

    Args:
        logits: (batch, num_classes).
        k: how many, at least 1; clipped to num_classes.

    Returns:
        (indices (batch, k) int64, probabilities (batch, k) float64): softmax probabilities;
        ties go to the lower class index.
    """
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    probabilities = softmax(logits)
    k = min(int(k), probabilities.shape[-1])
    # A stable sort of the negated probabilities keeps equal ones in index order.
    indices = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return indices.astype(np.int64), np.take_along_axis(probabilities, indices, axis=-1)


def eval_crop_fraction(model, requested=None):
    """The central crop fraction to evaluate `model` with: `requested` where given, else the
    one recorded with the model's checkpoint (timm's crop_pct, `layers.PixelNormalization`),
    else None (the whole image)."""
    if requested is not None:
        return requested
    rescale = next((layer for layer in model.layers if layer.name == "rescale"), None)
    return getattr(rescale, "eval_crop_fraction", None)


def input_image_size(model, requested=None, flag="--image_size"):
    """The square side in pixels to feed `model`: its input's, or for a dynamic-size model
    (`create_model(dynamic_image_size=True)`, input (B, None, None, 3)) `requested` where
    given, else the size its position embedding was built for.

    Raises:
        UserError: a fixed-size model that is not square, or another `requested` size (only a
            checkpoint can be resampled, when it is loaded); a dynamic model and a size that is
            not a positive multiple of its patch; a dynamic model built for a non-square size
            and no request.
    """
    height, width = model.input_shape[1:3]
    if height is not None:
        if height != width:
            raise UserError(f"The model takes {height}x{width} images; the tools read square "
                            "ones (the evaluation preprocessing resizes to a square).")
        if requested and requested != height:
            raise UserError(
                f"{flag}={requested} but the model takes {height}x{width} images; a saved Keras "
                "model of fixed size cannot change it (a checkpoint is resampled when loaded; a "
                "model built with dynamic_image_size=True takes any multiple of its patch).")
        return int(height)
    patch_size = int(model.get_layer("patch_embedding").patch_size)
    if requested:
        if requested % patch_size:
            nearest = max(1, requested // patch_size) * patch_size
            raise UserError(f"{flag}={requested} is not a multiple of the model's patch size "
                            f"{patch_size}: pass e.g. {nearest}.")
        return int(requested)
    built_height, built_width = built_image_size(model)
    if built_height != built_width:
        raise UserError(f"The model was built for {built_height}x{built_width} images; pass "
                        f"{flag} for the square size to evaluate it at.")
    return int(built_height)


def load_images(paths, image_size, central_crop_fraction=None):
    """Reads image files and preprocesses them as evaluation does (`pipelines.preprocess_for_eval`).

    Args:
        paths: image files (JPEG, PNG, GIF or BMP).
        image_size: output side in pixels.
        central_crop_fraction: optional, see `pipelines.preprocess_for_eval`.

    Returns:
        float32 (len(paths), image_size, image_size, 3) in [0, 255].

    Raises:
        MissingFileError: a path does not exist.
        UserError: a path is a directory, or a file is not a decodable image.
    """
    images = []
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise MissingFileError(f"Image file {path} does not exist.")
        if tf.io.gfile.isdir(path):
            raise UserError(f"{path} is a directory; expected an image file.")
        with tf.io.gfile.GFile(path, "rb") as stream:
            data = stream.read()
        try:
            image = pipelines.preprocess_for_eval(
                tf.constant(data), image_size, central_crop_fraction, context=path
            )
        except tf.errors.InvalidArgumentError as error:
            image_format = sniff_format(data)
            if image_format is None:
                raise UserError(
                    f"{path} is not a decodable image: expected JPEG, PNG, GIF or BMP bytes, "
                    f"found {data[:8]!r}..."
                ) from None
            # The decoder's own reason, without TensorFlow's "{{function_node ...}}" and
            # "[Op:DecodeImage]" wrapping.
            reason = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", error.message.splitlines()[0]).strip()
            raise UserError(
                f"{path} starts like a {image_format.upper()} file but could not be decoded (is "
                f"it truncated or corrupt?): {reason[:200]}"
            ) from None
        images.append(image.numpy())
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)


def predict_logits(model, images, batch_size=32):
    """Logits (N, num_classes) float32 of images (N, H, W, 3) in [0, 255], in batches."""
    return np.asarray(model.predict(np.asarray(images, np.float32), batch_size=batch_size,
                                    verbose=0), dtype=np.float32)
