"""Training augmentation: Inception-style random-resized crop, flip, RandAugment, mixup.

Randomness comes from stateless ops fed with per-example seeds, so a dataset built with a
fixed seed gives the same crops and flips on every run, whatever the parallelism.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pipelines import preprocess
from pipelines.errors import UserError

#: Inception crop parameters (Szegedy et al. 2015), as used by the ViT paper and big_vision.
AREA_RANGE = (0.05, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def _crop_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Samples `[offset_y, offset_x, height, width]` (int32) inside an image of `shape` (h, w, c)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_and_random_crop(
    image_bytes: tf.Tensor, seed: tf.Tensor, context: tf.Tensor | str = ""
) -> tf.Tensor:
    """Decodes a random Inception crop of an encoded image.

    For JPEG only the crop window is decoded (`decode_and_crop_jpeg`), which is what keeps the
    training pipeline as fast as plain decoding. Other formats are decoded whole, then cropped.

    Args:
        image_bytes: scalar string tensor.
        seed: int32/int64 `(2,)` stateless seed.
        context: string included in error messages (the shard file).

    Returns:
        uint8 `(crop_h, crop_w, 3)`.
    """

    def jpeg():
        window = _crop_window(tf.image.extract_jpeg_shape(image_bytes), seed)
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        checked = preprocess.check_decodable(image_bytes, context)
        image = tf.io.decode_image(checked, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        window = _crop_window(tf.shape(image), seed)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def random_flip_decision(seed: tf.Tensor) -> tf.Tensor:
    """Scalar bool: flip this image? True with probability 1/2.

    The same decision as `tf.image.stateless_random_flip_left_right(image, seed)` makes.
    """
    return tf.less(tf.random.stateless_uniform([], seed, minval=0.0, maxval=1.0), 0.5)


def flip_left_right_if(image: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """`image` (h, w, c) mirrored left-right where the scalar bool `flip` is true."""
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def parse_randaugment(spec: str | tuple | None) -> tuple[int, float] | None:
    """`"2,15"` (num_layers, magnitude) -> `(2, 15.0)`; None -> None."""
    if spec is None or spec == "" or spec == "none":
        return None
    if isinstance(spec, str):
        parts = spec.split(",")
    else:
        parts = list(spec)
    if len(parts) != 2:
        raise UserError(
            f"randaugment must be 'num_layers,magnitude' such as '2,15'; got {spec!r}."
        )
    return int(parts[0]), float(parts[1])


def make_randaugment(spec: str | tuple | None, seed: int | None = None):
    """`keras.layers.RandAugment` for images in [0, 255], or None.

    The magnitude uses the 0..30 scale of the AugReg paper / big_vision configs
    (`randaug(2, 15)`); Keras' `factor` is `magnitude / 30` (so 15 -> Keras' default 0.5).

    Args:
        spec: `"num_layers,magnitude"` such as `"2,15"`, a pair, or None / `""` / `"none"`.
        seed: Keras' seed of the layer.

    Returns:
        The layer, or None when `spec` asks for none.

    Raises:
        UserError: `spec` is not two comma-separated numbers.
    """
    parsed = parse_randaugment(spec)
    if parsed is None:
        return None
    num_layers, magnitude = parsed
    return keras.layers.RandAugment(
        value_range=(0, 255), num_ops=num_layers, factor=min(magnitude / 30.0, 1.0), seed=seed
    )


def make_mixup(alpha: float, num_classes: int, seed: int | None = None):
    """Mixup of a whole batch, with `keras.layers.MixUp`.

    Args:
        alpha: the Beta distribution's parameter of the mixing weights.
        num_classes: the length of the soft labels.
        seed: Keras' seed of the mixing weights and partners.

    Returns:
        `fn(images float32 (batch, h, w, 3), labels int32 (batch,)) -> (images, soft labels
        float32 (batch, num_classes))`; each soft label sums to 1.
    """
    layer = keras.layers.MixUp(alpha=alpha, seed=seed)

    def mix(images, labels):
        one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
        out = layer({"images": images, "labels": one_hot}, training=True)
        return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

    return mix
