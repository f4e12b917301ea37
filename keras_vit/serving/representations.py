"""The graphs of the `features` and `explain` signatures: what a ViT represents and where it
looks, computed in TensorFlow from the classifier's own layers (no second implementation).

    features  image_bytes -> features            float32, keras_vit.feature_extractor's output:
                             pre_logits (batch, D), tokens (batch, N, D), spatial (batch, gh, gw, D)
    explain   image_bytes -> probabilities, classes, scores, labels   as serving_default
                             attention_rollout   float32 (batch, gh, gw) in [0, 1]
                             heatmap             float32 (batch, S, S) in [0, 1]

Both decode their images as serving_default does (`pipelines.preprocess_for_eval`, to the
model's built size S); `export.build_archive` adds the input checks and the decoding.

`explain` is `keras_vit.analysis`'s rollout (`attention_rollout`, then `rollout_map`), what
`tools/visualize.py attention` draws, written in TF ops on the attention maps of the same model
pass that gives the logits (`keras_vit.model.attention_model`). Its `heatmap` is the rollout
resized to the S x S input by `tf.image.resize` (bilinear, half-pixel centres):
`scipy.ndimage.zoom(rollout, S / g, order=1, grid_mode=True, mode="nearest")` in NumPy.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from keras_vit import analysis, layers
from keras_vit.features import OUTPUTS as FEATURE_OUTPUTS
from keras_vit.features import feature_extractor
from keras_vit.model import attention_model
from keras_vit.serving.signatures import EXPLAIN_OUTPUTS, FEATURES_OUTPUT

DEFAULT_FEATURES_OUTPUT = "pre_logits"
DEFAULT_RESIDUAL_WEIGHT = 0.5  # the paper's w, as tools/visualize.py --residual_weight


def _export_error(message):
    from keras_vit.serving.export import ExportError  # export imports this module

    return ExportError(message)


@dataclasses.dataclass(frozen=True)
class FeatureOptions:
    """What the `features` signature returns: `keras_vit.feature_extractor(model,
    blocks=block, output=output, norm=norm)` on the decoded images.

    Attributes:
        output: "pre_logits" (the pooled features the head reads, (batch, D)), "tokens"
            (a block's patch tokens (batch, N, D), row-major) or "spatial" (the same as a map
            (batch, S/P, S/P, D)).
        block: tokens and spatial: one encoder block's index (negative counts from the end);
            None: the last block. pre_logits takes none.
        norm: tokens and spatial: through the encoder's final LayerNorm.
    """

    output: str = DEFAULT_FEATURES_OUTPUT
    block: int | None = None
    norm: bool = False

    def __post_init__(self):
        if self.output not in FEATURE_OUTPUTS:
            raise _export_error(f"The features signature's output is one of "
                                f"{', '.join(FEATURE_OUTPUTS)}; got {self.output!r}.")
        if self.output == "pre_logits" and (self.block is not None or self.norm):
            raise _export_error(
                f"The features signature's output 'pre_logits' is the head's input, after the "
                f"model's own last block, pooling and norm: it takes no block or norm (got "
                f"block={self.block!r}, norm={self.norm!r}). Use output 'tokens' or 'spatial' "
                "for one block's features.")


@dataclasses.dataclass(frozen=True)
class ExplainOptions:
    """How the `explain` signature rolls attention out (`analysis.attention_rollout`).

    Attributes:
        residual_weight: w in [0, 1], the identity's weight mixed into each block's
            head-averaged attention to model the residual connection (0.5 in Abnar & Zuidema).
    """

    residual_weight: float = DEFAULT_RESIDUAL_WEIGHT

    def __post_init__(self):
        weight = self.residual_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                0.0 <= weight <= 1.0):
            raise _export_error(
                f"The explain signature's residual_weight is a number in [0, 1] (0.5 in the "
                f"rollout paper, as tools/visualize.py); got {weight!r}.")


def on_nonempty_batch(function, images):
    """`function(images)`'s outputs, each (batch, ...), run on one blank image for a batch of 0.

    TensorFlow's oneDNN Conv2D mis-shapes a batch of 0 images (the patch embedding then fails
    to add the position embeddings), so an empty batch runs the model on one blank image and
    keeps 0 rows of its outputs. The model call stays outside the tf.cond, which only picks
    its input.

    Args:
        function: float32 (n, h, w, 3) -> {name: tensor (n, ...)}.
        images: float32 (batch, h, w, 3); h and w static where known, and kept so: a dynamic-size
            model at its built size must not see an unknown size (it would resample).
    """
    num_images = tf.shape(images)[0]
    blank_shape = [1] + [tf.shape(images)[axis] if side is None else side
                         for axis, side in enumerate(images.shape[1:], 1)]
    batch = tf.cond(num_images > 0, lambda: images,
                    lambda: tf.zeros(blank_shape, images.dtype))
    return {name: value[:num_images] for name, value in function(batch).items()}


def feature_model(model, options: FeatureOptions):
    """`keras_vit.feature_extractor` of `model` for `options`; an ExportError for a model it
    cannot read, or a block out of range."""
    try:
        return feature_extractor(model, blocks=options.block, output=options.output,
                                 norm=options.norm)
    except ValueError as error:
        raise _export_error(f"The features signature cannot be built: {error}") from error


def features_function(model, options: FeatureOptions):
    """images float32 (batch, S, S, 3) in [0, 255] -> {"features": float32 (batch, ...)}."""
    extractor = feature_model(model, options)

    def features(images):
        return {FEATURES_OUTPUT: tf.cast(extractor(images, training=False), tf.float32)}

    return lambda images: on_nonempty_batch(features, images)


def rollout_geometry(model):
    """(grid (gh, gw), num_prefix_tokens) of `model` as `analysis.model_geometry` reads them;
    an ExportError when the sequence holds tokens the position embedding does not count (a
    patch-only position embedding with class or register tokens), which the rollout map of
    `keras_vit.analysis` cannot place."""
    grid, _, num_prefix_tokens = analysis.model_geometry(model)
    prepended = sum(layer.num_tokens for layer in model.layers
                    if isinstance(layer, layers.ClassToken))
    if prepended != num_prefix_tokens:
        raise _export_error(
            f"The explain signature's rollout map reads the position embedding's "
            f"{num_prefix_tokens} prefix token(s), as keras_vit.analysis.rollout_map does, but "
            f"{model.name!r} prepends {prepended} token(s) (class, distillation, register) to "
            "the patches: a position embedding of the patches only. Export without explain.")
    return tuple(grid), num_prefix_tokens


def attention_rollout(attention, residual_weight):
    """`analysis.attention_rollout` in TF ops: (B, L, H, T, T) float32 -> (B, T, T).

    Per block the heads are averaged, the identity mixed in with weight w and the rows
    renormalised; the blocks are chained last to first, R = Ã_L ... Ã_1.
    """
    mixed = tf.reduce_mean(attention, axis=2)  # (B, L, T, T)
    identity = tf.eye(tf.shape(mixed)[-1], dtype=mixed.dtype)
    mixed = (1.0 - residual_weight) * mixed + residual_weight * identity
    mixed = mixed / tf.reduce_sum(mixed, axis=-1, keepdims=True)
    rollout = tf.broadcast_to(identity, tf.shape(mixed[:, 0]))
    for block in range(attention.shape[1]):  # the number of blocks is static
        rollout = tf.linalg.matmul(mixed[:, block], rollout)
    return rollout


def rollout_map(rollout, grid, num_prefix_tokens):
    """`analysis.rollout_map` in TF ops: (B, T, T) -> (B, gh, gw), each image's peak 1.

    With prefix tokens the class token's row (row 0), else the mean of every token's row.
    """
    if num_prefix_tokens:
        relevance = rollout[:, 0, num_prefix_tokens:]
    else:
        relevance = tf.reduce_mean(rollout, axis=1)
    relevance = tf.reshape(relevance, [-1, grid[0], grid[1]])
    peak = tf.reduce_max(relevance, axis=[1, 2], keepdims=True)
    return relevance / tf.where(peak > 0, peak, tf.ones_like(peak))


def heatmap(maps, image_size):
    """(B, gh, gw) -> (B, S, S): bilinear with half-pixel centres, the edges held (TF's
    `resize`), as an overlay on the S x S input is drawn."""
    return tf.image.resize(maps[..., tf.newaxis], [image_size, image_size],
                           method="bilinear")[..., 0]


def explain_function(model, top_k_outputs, options: ExplainOptions, image_size: int):
    """images float32 (batch, S, S, 3) -> serving_default's outputs and the rollout's.

    Args:
        model: the classifier (logits out), as `export.build_archive` takes it.
        top_k_outputs: logits float32 (batch, K) -> {probabilities, classes, scores, labels},
            the other signatures' own.
        options: the rollout's residual weight.
        image_size: S, the model's built side.
    """
    grid, num_prefix_tokens = rollout_geometry(model)
    with_attention = attention_model(model)
    weight = float(options.residual_weight)

    def explain(images):
        outputs = with_attention(images, training=False)
        attention = tf.cast(outputs["attention"], tf.float32)
        maps = rollout_map(attention_rollout(attention, weight), grid, num_prefix_tokens)
        return {**top_k_outputs(tf.cast(outputs["logits"], tf.float32)),
                **dict(zip(EXPLAIN_OUTPUTS, (maps, heatmap(maps, image_size))))}

    return lambda images: on_nonempty_batch(explain, images)
