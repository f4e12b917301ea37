"""Image decoding and the one evaluation preprocessing function.

`preprocess_for_eval` is used by the eval input pipeline and by the serving signature, so the
model sees the same pixels at evaluation and in production. Everything here is pure TF ops.
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.errors import UserError

# First bytes of each format `tf.io.decode_image` understands.
_MAGIC = {
    "jpeg": b"\xff\xd8\xff",
    "png": b"\x89PNG\r\n\x1a\n",
    "gif": b"GIF8",
    "bmp": b"BM",
}

NOT_AN_IMAGE = "input is not a decodable image"


def sniff_format(data: bytes) -> str | None:
    """Python: the image format of encoded bytes from their magic number, or None."""
    for name, magic in _MAGIC.items():
        if data.startswith(magic):
            return name
    return None


def is_decodable_format(image_bytes: tf.Tensor) -> tf.Tensor:
    """Scalar bool tensor: do the bytes start with a JPEG, PNG, GIF or BMP signature?"""
    checks = [
        tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic) for magic in _MAGIC.values()
    ]
    return tf.reduce_any(tf.stack(checks))


def check_decodable(image_bytes: tf.Tensor, context: tf.Tensor | str = "") -> tf.Tensor:
    """Asserts that encoded bytes look like an image (by their magic number).

    Args:
        image_bytes: scalar string tensor.
        context: string included in the error message (e.g. the shard file).

    Returns:
        `image_bytes`, with the assertion as a control dependency.

    Raises:
        tf.errors.InvalidArgumentError: (when run) a message that starts with "input is not a
            decodable image" and names `context` and the first bytes.
    """
    ok = is_decodable_format(image_bytes)
    assertion = tf.debugging.Assert(
        ok,
        [
            f"{NOT_AN_IMAGE}: expected JPEG, PNG, GIF or BMP bytes; source:",
            context,
            "first bytes:",
            tf.strings.substr(image_bytes, 0, 8),
        ],
    )
    with tf.control_dependencies([assertion]):
        return tf.identity(image_bytes)


def decode_rgb(image_bytes: tf.Tensor, context: tf.Tensor | str = "") -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 `(height, width, 3)`; grayscale is replicated."""
    image_bytes = check_decodable(image_bytes, context)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize of `(h, w, 3)` to float32 `(image_size, image_size, 3)` in [0, 255]."""
    # Bilinear weights are a convex combination, so uint8 input stays within [0, 255].
    # Casting first gives bit-identical output, and TF's float kernel is faster than its uint8
    # one (see docs/data.md, 'Benchmark').
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bilinear")
    image.set_shape([image_size, image_size, 3])
    return image


def decode_for_eval(
    image_bytes: tf.Tensor,
    central_crop_fraction: float | None = None,
    *,
    context: tf.Tensor | str = "",
) -> tf.Tensor:
    """The decoding half of `preprocess_for_eval`: uint8 `(height, width, 3)` before the resize.

    The input pipeline runs it before skipping bad records, and `resize` after (fused with the
    batching); `preprocess_for_eval(b, s, f)` is exactly `resize(decode_for_eval(b, f), s)`.

    Args:
        image_bytes: scalar string tensor of encoded image bytes.
        central_crop_fraction: None for the whole image, else a fraction in (0, 1].
        context: optional string (e.g. a file name) included in error messages.

    Raises:
        UserError: `central_crop_fraction` is outside (0, 1].
    """
    image = decode_rgb(image_bytes, context)
    if central_crop_fraction is not None:
        if not 0.0 < central_crop_fraction <= 1.0:
            raise UserError(
                f"central_crop_fraction must be in (0, 1], got {central_crop_fraction}."
            )
        image = tf.image.central_crop(image, central_crop_fraction)
    return image


def preprocess_for_eval(
    image_bytes: tf.Tensor,
    image_size: int,
    central_crop_fraction: float | None = None,
    *,
    context: tf.Tensor | str = "",
) -> tf.Tensor:
    """THE evaluation preprocessing: encoded image -> float32 `(image_size, image_size, 3)` in [0, 255].

    Decodes any JPEG/PNG/GIF/BMP (first frame of a GIF, grayscale replicated to RGB), optionally
    keeps the central `central_crop_fraction` of each side (e.g. 0.875), then resizes bilinearly
    to a square (the aspect ratio is not kept, as in the ViT paper's fine-tuning evaluation).

    Pure TF ops: usable in `tf.data`, `tf.function` and, via `tf.map_fn`, a serving signature.

    Args:
        image_bytes: scalar string tensor of encoded image bytes.
        image_size: output side in pixels.
        central_crop_fraction: None for the whole image, else a fraction in (0, 1].
        context: optional string (e.g. a file name) included in error messages.

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: (when run) "input is not a decodable image ..." for bytes
            that are not JPEG/PNG/GIF/BMP.
        UserError: `central_crop_fraction` is outside (0, 1].
    """
    return resize(decode_for_eval(image_bytes, central_crop_fraction, context=context), image_size)
