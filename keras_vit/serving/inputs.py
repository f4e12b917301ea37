"""The serving signatures' inputs, checked and prepared in the graph.

Every request is validated before any kernel that could abort the process sees it: TF Serving
feeds the signature's tensors to the session without checking them against the signature's
shape, and a mis-ranked tensor reaching Conv2D fails a CHECK in TensorFlow and kills the
server. A bad request fails with INVALID_ARGUMENT naming the signature, the input and, for a
batch, the element. Used by `keras_vit.serving.export.build_archive`.
"""

from __future__ import annotations

import tensorflow as tf

import pipelines
from keras_vit.serving.signatures import (
    IMAGE_TENSOR_INPUT,
    IMAGE_TENSOR_SIGNATURE,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    TF_EXAMPLE_INPUT,
    TF_EXAMPLE_SIGNATURE,
)
from pipelines import preprocess, records


def decoder(image_size, central_crop_fraction, max_image_pixels):
    """(string (batch,) encoded images, input name) -> float32 (batch, size, size, 3), each by
    `pipelines.preprocess_for_eval`; an error names the image as `<input name>[i]`."""

    def decode(image_bytes, input_name):
        def preprocess_one(args):
            one_image, index = args
            return pipelines.preprocess_for_eval(
                one_image, image_size, central_crop_fraction,
                context=tf.strings.format(input_name + "[{}]", index),
                max_image_pixels=max_image_pixels,
            )

        indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
        return tf.map_fn(
            preprocess_one,
            (image_bytes, indices),
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )

    return decode


def _runtime_shape(tensor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(int32 rank, int32 shape) of `tensor` as fed, never the static ones the signature declares.

    `tf.shape`/`tf.rank`/`tf.size` return constants when the traced shape is known, so a check
    written with them would vanish from the graph; raw Rank and Shape ops run on what is fed.
    """
    return tf.raw_ops.Rank(input=tensor), tf.raw_ops.Shape(input=tensor, out_type=tf.int32)


def checked_rank(tensor: tf.Tensor, rank: int, message: str) -> tf.Tensor:
    """`tensor` after an in-graph assertion that it has `rank` dimensions."""
    actual_rank, shape = _runtime_shape(tensor)
    assertion = tf.debugging.Assert(
        tf.equal(actual_rank, rank), [message + "; got shape", shape], summarize=8)
    with tf.control_dependencies([assertion]):
        return tf.identity(tensor)


def checked_pixels(images: tf.Tensor, image_size: int, patch_size: int | None = None):
    """`images` after in-graph checks of shape (batch, size, size, 3), or with `patch_size` (a
    dynamic-size model) (batch, height, width, 3) of positive multiples of it, and finite values.

    The shape check runs before the finiteness check and both before the model, so no kernel
    sees a tensor it could abort on. The dtype is checked by TensorFlow itself when fed.
    """
    name = f"{PIXELS_SIGNATURE}: input `{PIXELS_INPUT}`"
    rank, shape = _runtime_shape(images)
    # Padded, so that a tensor of any rank compares element by element without failing.
    padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
    if patch_size is None:
        expected = f"(batch, {image_size}, {image_size}, 3)"
        sides_ok = tf.reduce_all(tf.equal(padded[1:3], [image_size, image_size]))
    else:
        expected = (f"(batch, height, width, 3), height and width positive multiples of the "
                    f"patch size {patch_size},")
        sides_ok = tf.reduce_all(tf.logical_and(padded[1:3] > 0,
                                                tf.equal(padded[1:3] % patch_size, 0)))
    ok = tf.logical_and(tf.equal(rank, 4), tf.logical_and(sides_ok, tf.equal(padded[3], 3)))
    assertion = tf.debugging.Assert(
        ok, [f"{name} must be float32 {expected} RGB pixels in [0, 255]; got shape", shape],
        summarize=8)
    with tf.control_dependencies([assertion]):
        images = tf.identity(images)
    return tf.debugging.assert_all_finite(
        images, f"{name} holds NaN or Inf pixels; send RGB values in [0, 255]")


def checked_image_tensor(image_tensor: tf.Tensor, max_image_pixels: int | None) -> tf.Tensor:
    """`image_tensor` after in-graph checks of shape (batch, height, width, 3) with height and
    width at least 1 (any, for an empty batch) and, with a cap, height x width at most it.

    The dtype (uint8) is checked by TensorFlow itself when fed.
    """
    name = f"{IMAGE_TENSOR_SIGNATURE}: input `{IMAGE_TENSOR_INPUT}`"
    rank, shape = _runtime_shape(image_tensor)
    padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
    not_empty = tf.logical_and(padded[1] >= 1, padded[2] >= 1)
    ok = tf.logical_and(
        tf.logical_and(tf.equal(rank, 4), tf.equal(padded[3], 3)),
        tf.logical_or(tf.equal(padded[0], 0), not_empty))
    checks = [tf.debugging.Assert(
        ok, [f"{name} must be uint8 (batch, height, width, 3) RGB pixels, height and width at "
             "least 1; got shape", shape], summarize=8)]
    if max_image_pixels is not None:
        with tf.control_dependencies(checks):
            pixels = tf.cast(padded[1], tf.int64) * tf.cast(padded[2], tf.int64)
            checks.append(tf.debugging.Assert(
                pixels <= max_image_pixels,
                [f"{name}: {preprocess.IMAGE_TOO_LARGE}: height x width more than the "
                 f"{max_image_pixels} pixels allowed (max_image_pixels); got shape", shape],
                summarize=8))
    with tf.control_dependencies(checks):
        return tf.identity(image_tensor)


def cropped_and_resized(image_tensor, image_size, central_crop_fraction):
    """uint8 (batch, height, width, 3) -> float32 (batch, size, size, 3): each image cropped and
    resized by the ops `pipelines.preprocess_for_eval` applies after decoding."""

    def crop_and_resize(image):
        if central_crop_fraction is not None:
            image = tf.image.central_crop(image, central_crop_fraction)
        return preprocess.resize(image, image_size)

    return tf.map_fn(
        crop_and_resize, image_tensor,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def _first_false(condition: tf.Tensor) -> tf.Tensor:
    """int64 index of the first False of a bool vector (its length if none)."""
    return tf.argmin(tf.concat([tf.cast(condition, tf.int32), [1]], 0), output_type=tf.int64)


def _assert_each(condition, template, checks=()):
    """An assertion that `condition` (bool (batch,)) holds, its message `template` formatted
    with the first failing index; runs after `checks`."""
    with tf.control_dependencies(list(checks)):
        message = tf.strings.format(template, _first_false(condition))
        return tf.debugging.Assert(tf.reduce_all(condition), [message])


def parsed_image_bytes(tf_examples: tf.Tensor) -> tf.Tensor:
    """string (batch,) serialized Examples -> string (batch,) their `image/encoded` bytes.

    Checked in the graph, each failure naming the input and the element: a vector; each
    element empty or starting as a serialized Example does (0x0a, its field 1, `features`,
    first), so that text, JSON or image bytes sent here by mistake are named; an
    `image/encoded` value present. A proto corrupt past its first byte fails in
    ParseExampleV2 itself ("Could not parse example input"), in the op named after the input:
    a failed parse cannot be caught in a graph except by tf.data, which costs ~10 ms a request.
    """
    name = f"{TF_EXAMPLE_SIGNATURE}: input `{TF_EXAMPLE_INPUT}`"
    tf_examples = checked_rank(
        tf_examples, 1, f"{name} must be a string vector (batch,) of serialized tf.train.Example")
    starts_as_example = tf.logical_or(
        tf.equal(tf.strings.length(tf_examples), 0),
        tf.equal(tf.strings.substr(tf_examples, 0, 1), b"\x0a"))
    looks_right = _assert_each(
        starts_as_example,
        f"{name}: {TF_EXAMPLE_INPUT}" + "[{}] is not a serialized tf.train.Example")
    feature_spec = {records.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value="")}
    with tf.control_dependencies([looks_right]):
        image_bytes = tf.io.parse_example(
            tf_examples, feature_spec, name=f"{TF_EXAMPLE_SIGNATURE}_{TF_EXAMPLE_INPUT}",
        )[records.IMAGE_ENCODED]
    has_image = _assert_each(
        tf.strings.length(image_bytes) > 0,
        f"{name}: {TF_EXAMPLE_INPUT}" + "[{}] has no `" + records.IMAGE_ENCODED
        + "` bytes (the encoded image)")
    with tf.control_dependencies([has_image]):
        return tf.identity(image_bytes)
