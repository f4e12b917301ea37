"""Random erasing (Zhong et al. 2017) with timm's `RandomErasing` semantics, mode "pixel".

Follows timm `timm/data/random_erasing.py` (huggingface/pytorch-image-models),
`RandomErasing(probability=p, mode="pixel", count=1)` with its defaults `min_area=0.02`,
`max_area=1/3`, `min_aspect=0.3` (log aspect ratio uniform in `(log 0.3, log 1/0.3)`) and 10
attempts: per image, with probability p, the first attempted box that fits strictly inside the
image (`w < img_w and h < img_h`) is filled with per-pixel, per-channel noise.

Where the noise lives: timm erases the NORMALISED tensor with N(0, 1) noise. This pipeline emits
[0, 255] pixels and the model normalises them (`(x - mean) / std`), so the erased pixels are
`mean + std * N(0, 1)` (not clipped to [0, 255]): after the model's normalisation they are
exactly timm's N(0, 1) noise. Pass the model's normalisation in pixel units (ViT's default:
mean = std = 127.5).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from pipelines.errors import UserError

#: timm RandomErasing defaults.
MIN_AREA = 0.02
MAX_AREA = 1.0 / 3.0
MIN_ASPECT = 0.3
ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class ErasingSettings:
    """`build_dataset(random_erase=, erase_mean=, erase_std=)`, resolved."""

    probability: float = 0.0  # per image; 0 = off
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)  # pixel units, per channel
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)

    @property
    def enabled(self) -> bool:
        return self.probability > 0

    @classmethod
    def from_args(cls, probability, mean, std) -> ErasingSettings:
        """Checked settings from `build_dataset`'s arguments (mean/std: 3 numbers each).

        Raises:
            UserError: see `check`.
        """
        def triple(name, values):
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                values = None
            if values is None or len(values) != 3:
                raise UserError(
                    f"{name} must hold 3 numbers (one per RGB channel, in pixel units 0..255: "
                    f"the model's input normalisation), got {values!r}.")
            return values

        return cls(float(probability), triple("erase_mean", mean), triple("erase_std", std)).check()

    def check(self) -> ErasingSettings:
        """UserError for a probability outside [0, 1] or a mean/std not of 3 (std > 0) values."""
        if not 0.0 <= self.probability <= 1.0:
            raise UserError(
                f"random_erase must be a probability in [0, 1] (0 = off), got "
                f"{self.probability!r}.")
        for name, values in (("erase_mean", self.mean), ("erase_std", self.std)):
            if len(tuple(values)) != 3:
                raise UserError(
                    f"{name} must hold 3 values (one per RGB channel, in pixel units "
                    f"0..255, the model's normalisation), got {values!r}.")
        if not all(s > 0 for s in self.std):
            raise UserError(f"erase_std must be > 0 per channel, got {self.std!r}.")
        return self


def sample_box(height, width, seed):
    """timm's box: `(top, left, h, w)` int32 scalars; `h = w = 0` when no attempt fits.

    Draws all 10 attempts at once and keeps the first that fits, which gives timm's boxes in
    distribution: target area uniform in `[MIN_AREA, MAX_AREA] * area`, aspect ratio log-uniform
    in `[MIN_ASPECT, 1 / MIN_ASPECT]`, `h = round(sqrt(area * aspect))`,
    `w = round(sqrt(area / aspect))` (float64, round half to even as Python's `round`), kept if
    `h < height and w < width`; `top` uniform in `[0, height - h]`, `left` in `[0, width - w]`.

    Args:
        height, width: int32 scalars, the image size.
        seed: int64 `(2,)` stateless seed.
    """
    area_seed, aspect_seed, offset_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    img_h = tf.cast(height, tf.float64)
    img_w = tf.cast(width, tf.float64)
    target_area = img_h * img_w * tf.random.stateless_uniform(
        [ATTEMPTS], area_seed, MIN_AREA, MAX_AREA, dtype=tf.float64)
    aspect = tf.exp(tf.random.stateless_uniform(
        [ATTEMPTS], aspect_seed, math.log(MIN_ASPECT), math.log(1.0 / MIN_ASPECT),
        dtype=tf.float64))
    h = tf.round(tf.sqrt(target_area * aspect))
    w = tf.round(tf.sqrt(target_area / aspect))
    fits = (h < img_h) & (w < img_w)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(fits)
    h = tf.where(found, tf.gather(h, first), 0.0)
    w = tf.where(found, tf.gather(w, first), 0.0)
    # random.randint(0, img_h - h) includes both ends.
    u = tf.random.stateless_uniform([2], offset_seed, dtype=tf.float64)
    top = tf.minimum(tf.floor(u[0] * (img_h - h + 1.0)), img_h - h)
    left = tf.minimum(tf.floor(u[1] * (img_w - w + 1.0)), img_w - w)
    return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def _erase_box(image, box, seed, settings: ErasingSettings):
    """`image` with the box `(top, left, h, w)` replaced by `mean + std * N(0, 1)` noise.

    The noise is drawn only for the box (`(h, w, 3)`), and the image is rebuilt from slices
    around it: one copy of the image rather than full-size masks.
    """
    top, left, h, w = box
    noise = tf.random.stateless_normal(tf.stack([h, w, 3]), seed, dtype=tf.float32)
    noise = noise * tf.constant(settings.std, tf.float32) + tf.constant(settings.mean, tf.float32)
    band = image[top:top + h]
    band = tf.concat([band[:, :left], noise, band[:, left + w:]], axis=1)
    return tf.concat([image[:top], band, image[top + h:]], axis=0)


def random_erase(image, seed, settings: ErasingSettings):
    """timm's `RandomErasing(mode="pixel", count=1)` of one image.

    Args:
        image: float32 `(height, width, 3)` in pixel units.
        seed: int64 `(2,)`, this image's stateless seed.
        settings: probability and the noise's per-channel mean and std (pixel units).

    Returns:
        float32 `(height, width, 3)`: unchanged with probability `1 - probability` or when no
        attempt fits; else one box of it replaced by per-pixel noise.
    """
    apply_seed, box_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    erase = tf.random.stateless_uniform([], apply_seed, dtype=tf.float64) < settings.probability
    shape = tf.shape(image)

    def erased():
        box = sample_box(shape[0], shape[1], box_seed)
        return _erase_box(image, box, noise_seed, settings)

    out = tf.cond(erase, erased, lambda: image)
    out.set_shape(image.shape)
    return out
