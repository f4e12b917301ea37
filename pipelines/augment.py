"""Training augmentation: Inception-style random-resized crop, flip, RandAugment.

Randomness comes from stateless ops fed with per-example seeds, so a dataset built with a
fixed seed gives the same crops, flips and RandAugment draws on every run, whatever the
parallelism. Batch mixing
(mixup, CutMix) lives in `pipelines.mixing`, random erasing in `pipelines.erasing`.

Two rules sample the crop window (`CROP_SAMPLERS`):
* `"tensorflow"`: `tf.image.sample_distorted_bounding_box` as Google's ViT code and big_vision
  use it: an aspect ratio uniform in its range, then a height uniform between the heights that
  give the area range (so small areas are drawn more often than their share of the range).
* `"torchvision"`: torchvision's `RandomResizedCrop.get_params` (pytorch/vision,
  torchvision/transforms/transforms.py), which timm and DeiT use: the area uniform in
  `area_range * image area`, the log aspect ratio uniform, 10 attempts, else a central crop.
"""

from __future__ import annotations

import functools
import math
import threading

import keras
import tensorflow as tf

from pipelines import preprocess
from pipelines.errors import UserError

#: Inception crop parameters (Szegedy et al. 2015), as used by the ViT paper and big_vision.
AREA_RANGE = (0.05, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
#: `build_dataset(crop_sampler=...)`: the rule that samples the Inception crop window.
CROP_SAMPLERS = ("tensorflow", "torchvision")
#: Windows tried before the fallback (both TensorFlow's op and torchvision use 10).
CROP_ATTEMPTS = 10


def tensorflow_crop_window(shape, seed, area_range=AREA_RANGE,
                           ratio_range=ASPECT_RATIO_RANGE) -> tf.Tensor:
    """`sample_distorted_bounding_box`'s window: `[offset_y, offset_x, height, width]` (int32).

    Args:
        shape: int32 `(3,)`, the image's `(height, width, channels)`.
        seed: int32/int64 `(2,)` stateless seed.
        area_range: `(min, max)` fraction of the image area the window covers.
        ratio_range: `(min, max)` width / height of the window.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio_range,
        area_range=area_range,
        max_attempts=CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def _central_fallback(height, width, ratio_range):
    """torchvision's fallback: the whole image, its aspect ratio clamped to `ratio_range`.

    Args:
        height, width: float64 scalars, the image's size.

    Returns:
        float64 `(h, w)` of the central crop.
    """
    in_ratio = width / height
    low, high = min(ratio_range), max(ratio_range)
    # torchvision: w = width, h = round(w / min(ratio)) when too tall; h = height,
    # w = round(h * max(ratio)) when too wide; else the whole image.
    h = tf.where(in_ratio < low, tf.round(width / low), height)
    w = tf.where(in_ratio > high, tf.round(height * high), width)
    return h, w


def torchvision_crop_window(shape, seed, area_range=AREA_RANGE,
                            ratio_range=ASPECT_RATIO_RANGE) -> tf.Tensor:
    """torchvision's `RandomResizedCrop.get_params`: `[offset_y, offset_x, height, width]` int32.

    All 10 attempts are drawn at once and the first that fits is kept, which gives the windows
    torchvision's loop gives (same distribution, not the same random numbers). The sizes are
    computed in float64 and rounded half-to-even, as Python's `round` in torchvision does.

    Args:
        shape: int32 `(3,)`, the image's `(height, width, channels)`.
        seed: int32/int64 `(2,)` stateless seed.
        area_range: torchvision's `scale`: `(min, max)` fraction of the image area.
        ratio_range: torchvision's `ratio`: `(min, max)` width / height.
    """
    height = tf.cast(shape[0], tf.float64)
    width = tf.cast(shape[1], tf.float64)
    area_seed, ratio_seed, offset_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    scale = tf.random.stateless_uniform([CROP_ATTEMPTS], area_seed, area_range[0],
                                        area_range[1], dtype=tf.float64)
    log_ratio = tf.random.stateless_uniform(
        [CROP_ATTEMPTS], ratio_seed, math.log(ratio_range[0]), math.log(ratio_range[1]),
        dtype=tf.float64)
    target_area = height * width * scale
    aspect = tf.exp(log_ratio)
    w = tf.round(tf.sqrt(target_area * aspect))
    h = tf.round(tf.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(fits)
    fallback_h, fallback_w = _central_fallback(height, width, ratio_range)
    h = tf.where(found, tf.gather(h, first), fallback_h)
    w = tf.where(found, tf.gather(w, first), fallback_w)
    # torch.randint(0, height - h + 1): uniform over the offsets that keep the window inside.
    u = tf.random.stateless_uniform([2], offset_seed, dtype=tf.float64)
    top = tf.minimum(tf.floor(u[0] * (height - h + 1.0)), height - h)
    left = tf.minimum(tf.floor(u[1] * (width - w + 1.0)), width - w)
    top = tf.where(found, top, tf.floor((height - h) / 2.0))
    left = tf.where(found, left, tf.floor((width - w) / 2.0))
    return tf.cast(tf.stack([top, left, h, w]), tf.int32)


def check_crop_settings(crop_sampler: str, area_range) -> tuple[float, float]:
    """UserError unless `crop_sampler` is one of CROP_SAMPLERS and `0 < min <= max <= 1`.

    Returns:
        `area_range` as a pair of floats.
    """
    if crop_sampler not in CROP_SAMPLERS:
        raise UserError(f"crop_sampler must be one of {CROP_SAMPLERS}, got {crop_sampler!r}.")
    try:
        low, high = (float(v) for v in area_range)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0.0 < low <= high <= 1.0:
        raise UserError(
            f"crop_area_range must be (min, max) fractions of the image area with "
            f"0 < min <= max <= 1, got {area_range!r}; the Inception crop uses "
            f"{AREA_RANGE}, torchvision/timm/DeiT (0.08, 1.0).")
    return low, high


def crop_window_sampler(crop_sampler: str = "tensorflow", area_range=AREA_RANGE):
    """`fn(shape int32 (3,), seed (2,)) -> int32 [offset_y, offset_x, height, width]`.

    Raises:
        UserError: an unknown `crop_sampler` or an `area_range` outside (0, 1].
    """
    area_range = check_crop_settings(crop_sampler, area_range)
    window = tensorflow_crop_window if crop_sampler == "tensorflow" else torchvision_crop_window
    return functools.partial(window, area_range=area_range, ratio_range=ASPECT_RATIO_RANGE)


def decode_and_random_crop(
    image_bytes: tf.Tensor, seed: tf.Tensor, context: tf.Tensor | str = "", *,
    crop_sampler: str = "tensorflow", area_range=AREA_RANGE,
) -> tf.Tensor:
    """Decodes a random Inception crop of an encoded image.

    For JPEG only the crop window is decoded (`decode_and_crop_jpeg`), which is what keeps the
    training pipeline as fast as plain decoding. Other formats are decoded whole, then cropped.

    Args:
        image_bytes: scalar string tensor.
        seed: int32/int64 `(2,)` stateless seed.
        context: string included in error messages (the shard file).
        crop_sampler: one of CROP_SAMPLERS, the rule that samples the window.
        area_range: `(min, max)` fraction of the image area the window covers.

    Returns:
        uint8 `(crop_h, crop_w, 3)`.
    """
    sample_window = crop_window_sampler(crop_sampler, area_range)

    def jpeg():
        window = sample_window(tf.image.extract_jpeg_shape(image_bytes), seed)
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        checked = preprocess.check_decodable(image_bytes, context)
        image = tf.io.decode_image(checked, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        window = sample_window(tf.shape(image), seed)
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


class _RecordSeeds(keras.random.SeedGenerator):
    """Keras's seed-generator interface over one record's seed.

    Keras's random ops take an int or a `SeedGenerator` and call its `next()` once per draw. A
    real generator is a variable that parallel map calls advance in whatever order they run, so
    a record's draws depend on the records before it; here the n-th draw of the traced
    augmentation is `stateless_fold_in(seed, n)`, a function of the record's seed alone.
    `SeedGenerator.__init__` is not called: it would create that variable.
    """

    def __init__(self, seed: tf.Tensor):
        self._record_seed = seed
        self._draws = 0  # counted while the map function is traced: one number per call site

    def next(self, ordered=True):
        del ordered
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._record_seed, self._draws)


class RecordSeededRandAugment(keras.layers.RandAugment):
    """`keras.layers.RandAugment` (its ops, magnitudes and choice of ops) drawing from a seed
    per record (`augment`), so that a seeded pipeline augments each record the same way on
    every run, whatever the parallelism, and a resumed run (`skip_examples`) goes on with the
    draws an uninterrupted one would make. Called as a layer, it is Keras's own."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The record's seeds while `augment` traces. Not a layer attribute of its own: Keras
        # tracks a SeedGenerator set on a layer, and refuses one once the layer is built.
        self._tracing = threading.local()

    def _get_seed_generator(self, backend=None):
        # Keras's RandAugment draws from this for its op choice and hands it to every op.
        record_seeds = getattr(self._tracing, "record_seeds", None)
        if record_seeds is not None:
            return record_seeds
        return super()._get_seed_generator(backend)

    def augment(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """`image` (h, w, 3) in [0, 255], RandAugment-ed with draws from `seed` (int64 (2,))."""
        self._tracing.record_seeds = _RecordSeeds(seed)
        try:
            return self(image, training=True)
        finally:
            self._tracing.record_seeds = None


def make_randaugment(spec: str | tuple | None) -> RecordSeededRandAugment | None:
    """RandAugment for images in [0, 255] (`RecordSeededRandAugment`), or None.

    The magnitude uses the 0..30 scale of the AugReg paper / big_vision configs
    (`randaug(2, 15)`); Keras' `factor` is `magnitude / 30` (so 15 -> Keras' default 0.5).

    Args:
        spec: `"num_layers,magnitude"` such as `"2,15"`, a pair, or None / `""` / `"none"`.

    Returns:
        The layer, or None when `spec` asks for none.

    Raises:
        UserError: `spec` is not two comma-separated numbers.
    """
    parsed = parse_randaugment(spec)
    if parsed is None:
        return None
    num_layers, magnitude = parsed
    return RecordSeededRandAugment(
        value_range=(0, 255), num_ops=num_layers, factor=min(magnitude / 30.0, 1.0)
    )
