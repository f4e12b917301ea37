"""Batch mixing: mixup and CutMix with timm's `Mixup` semantics, mode "batch".

Follows timm `timm/data/mixup.py` (huggingface/pytorch-image-models): `Mixup._params_per_batch`
draws whether to mix (probability `prob`), CutMix or mixup (`switch_prob` when both alphas are
> 0) and `lam ~ Beta(alpha, alpha)`; `Mixup._mix_batch` mixes the batch with its reverse
(`x.flip(0)`: example i with example batch-1-i); `rand_bbox` places the CutMix box and
`cutmix_bbox_and_lam(correct_lam=True)` sets lam to 1 - the box's real (clipped) area fraction;
`mixup_target` mixes the one-hot labels with the same lam.

Label smoothing is left to the loss: `keras_vit`'s `ClassificationLoss` smooths dense labels
linearly (`y * (1 - eps) + eps / K`), and a linear map commutes with the mixing
(`lam * y1 + (1 - lam) * y2` then smoothed equals `lam * smooth(y1) + (1 - lam) * smooth(y2)`),
so smoothing after mixing equals timm's `mixup_target(..., smoothing=eps)` for the softmax loss
(the sigmoid loss smooths towards 1/2, Keras's convention, equally linear).

Randomness is stateless: the draws of a batch come from `(seed, batch index)`, the index
counting the batches of the stream from the start of the run, so a seeded pipeline mixes the
same way on every run and a resumed run (`skip_examples`) continues the same draws.
"""

from __future__ import annotations

import dataclasses
import random

import tensorflow as tf

from pipelines.errors import UserError

#: Second seed word of the mixing draws: keeps them apart from the per-record seeds.
_MIXING_STREAM = 0x6D6978


@dataclasses.dataclass(frozen=True)
class MixingSettings:
    """timm's `Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode="batch")` arguments."""

    mixup_alpha: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = no mixup
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) of CutMix; 0 = no CutMix
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # CutMix instead of mixup, when both alphas are > 0

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def check(self) -> MixingSettings:
        """UserError for an alpha below 0 or a probability outside [0, 1]; returns self."""
        for name, value in (("mixup_alpha", self.mixup_alpha),
                            ("cutmix_alpha", self.cutmix_alpha)):
            if not value >= 0:
                raise UserError(f"{name} must be >= 0 (0 = off), got {value!r}.")
        for name, value in (("mixup_prob", self.prob), ("mixup_switch_prob", self.switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be a probability in [0, 1], got {value!r}.")
        return self


def _beta(alpha, seed):
    """One float64 draw of Beta(alpha, alpha), as `X / (X + Y)` of two Gamma(alpha) draws.

    float64 keeps `X + Y` from underflowing to 0 for small alphas (timm's mixup uses 0.2-0.8).
    """
    draws = tf.random.stateless_gamma([2], seed, alpha=tf.constant(alpha, tf.float64),
                                      dtype=tf.float64)
    return draws[0] / (draws[0] + draws[1])


def batch_params(settings: MixingSettings, seed):
    """timm's `Mixup._params_per_batch`: `(lam float64 scalar, use_cutmix bool scalar)`.

    lam is 1 (no mixing) with probability `1 - prob`; the CutMix lam is not yet corrected.

    Args:
        settings: which mixes are on, and their probabilities.
        seed: int64 `(2,)`, the stateless seed of this batch.
    """
    apply_seed, switch_seed, mixup_seed, cutmix_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    uniform = lambda s: tf.random.stateless_uniform([], s, dtype=tf.float64)  # noqa: E731
    if settings.mixup_alpha > 0 and settings.cutmix_alpha > 0:
        use_cutmix = uniform(switch_seed) < settings.switch_prob
    else:
        use_cutmix = tf.constant(settings.cutmix_alpha > 0)
    lam_mixup = _beta(settings.mixup_alpha, mixup_seed) if settings.mixup_alpha > 0 else 1.0
    lam_cutmix = _beta(settings.cutmix_alpha, cutmix_seed) if settings.cutmix_alpha > 0 else 1.0
    lam = tf.where(use_cutmix, tf.cast(lam_cutmix, tf.float64), tf.cast(lam_mixup, tf.float64))
    applied = uniform(apply_seed) < settings.prob
    return tf.where(applied, lam, tf.constant(1.0, tf.float64)), use_cutmix


def rand_bbox(height, width, lam, seed):
    """timm's `rand_bbox` (margin 0): the CutMix box `(y_low, y_high, x_low, x_high)` int32.

    A box of `int(side * sqrt(1 - lam))` per side centred on a uniform pixel, clipped to the
    image (so its area can be smaller than `1 - lam`; `mix_batch` then corrects lam to the
    real area, as timm's `cutmix_bbox_and_lam(correct_lam=True)`).

    Args:
        height, width: Python ints, the image size.
        lam: float64 scalar in [0, 1].
        seed: int64 `(2,)`.
    """
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.floor(height * ratio), tf.int32)
    cut_w = tf.cast(tf.floor(width * ratio), tf.int32)
    # np.random.randint(0, side): uniform over [0, side).
    centre = tf.random.stateless_uniform([2], seed, dtype=tf.float64)
    cy = tf.minimum(tf.cast(tf.floor(centre[0] * height), tf.int32), height - 1)
    cx = tf.minimum(tf.cast(tf.floor(centre[1] * width), tf.int32), width - 1)
    y_low = tf.clip_by_value(cy - cut_h // 2, 0, height)
    y_high = tf.clip_by_value(cy + cut_h // 2, 0, height)
    x_low = tf.clip_by_value(cx - cut_w // 2, 0, width)
    x_high = tf.clip_by_value(cx + cut_w // 2, 0, width)
    return y_low, y_high, x_low, x_high


def paste_box(images, partners, box):
    """`images` (batch, H, W, C) with the box `(y_low, y_high, x_low, x_high)` of `partners`.

    Built from slices around the box (one copy of the batch; a broadcast mask and `tf.where`
    cost about twice as much).
    """
    y_low, y_high, x_low, x_high = box
    band = images[:, y_low:y_high]
    band = tf.concat([band[:, :, :x_low], partners[:, y_low:y_high, x_low:x_high],
                      band[:, :, x_high:]], axis=2)
    return tf.concat([images[:, :y_low], band, images[:, y_high:]], axis=1)


def mix_batch(images, labels, seed, *, settings: MixingSettings, num_classes: int):
    """timm's `Mixup(mode="batch", correct_lam=True)` of one batch.

    Args:
        images: float32 `(batch, height, width, 3)` with a static height and width.
        labels: int32 `(batch,)` class indices in `[0, num_classes)`.
        seed: int64 `(2,)`, the stateless seed of this batch.
        settings: the mixing arguments.
        num_classes: K.

    Returns:
        `(images float32 (batch, height, width, 3), labels float32 (batch, K))`; each label row
        sums to 1: `lam` on the example's class and `1 - lam` on its partner's (example
        batch-1-i), with lam the mixup weight or 1 - the CutMix box's area fraction.
    """
    height, width = int(images.shape[1]), int(images.shape[2])
    params_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    lam, use_cutmix = batch_params(settings, params_seed)
    partners = tf.reverse(images, [0])

    def cutmix():
        box = rand_bbox(height, width, lam, box_seed)
        box_area = tf.cast((box[1] - box[0]) * (box[3] - box[2]), tf.float64)
        corrected = 1.0 - box_area / float(height * width)
        return paste_box(images, partners, box), corrected

    def mixup():
        weight = tf.cast(lam, tf.float32)
        return images * weight + partners * (1.0 - weight), lam

    mixed, lam = tf.cond(use_cutmix, cutmix, mixup)
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float64)
    targets = one_hot * lam + tf.reverse(one_hot, [0]) * (1.0 - lam)
    return mixed, tf.cast(targets, tf.float32)


def batch_seed(seed: int, batch_index, pipeline: int = 0):
    """int64 `(2,)`: the stateless seed of batch `batch_index` (int64 scalar) of the stream of
    input pipeline `pipeline` (each worker's batches get their own draws, as timm's per-rank
    seeds give them)."""
    base = tf.constant([int(seed), _MIXING_STREAM + int(pipeline)], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(batch_index, tf.int64))


def mix_dataset(ds: tf.data.Dataset, settings: MixingSettings, num_classes: int,
                seed: int | None, first_batch: int = 0, pipeline: int = 0) -> tf.data.Dataset:
    """Mixes every batch of `ds` (`(images, int labels)` with a static image size).

    Args:
        ds: batches `(float32 (batch, H, W, 3), int32 (batch,))`.
        settings: the mixing arguments (`settings.enabled`).
        num_classes: K, the length of the soft labels.
        seed: base seed; None draws one (a different mixing on each run).
        first_batch: the index of the first batch of `ds` in the run's stream (a resumed run
            starts at `skip_examples // batch_size`).
        pipeline: the input pipeline's id (`input_context.input_pipeline_id`), so that workers
            sharing `seed` still draw differently.

    Returns:
        Batches `(float32 (batch, H, W, 3), float32 (batch, K))`.
    """

    if seed is None:  # an unseeded pipeline mixes differently on each run
        seed = random.SystemRandom().randrange(2**31)

    def mix(index, batch):
        images, labels = batch
        return mix_batch(images, labels, batch_seed(seed, index, pipeline), settings=settings,
                         num_classes=num_classes)

    return ds.enumerate(start=first_batch).map(mix, num_parallel_calls=tf.data.AUTOTUNE)
