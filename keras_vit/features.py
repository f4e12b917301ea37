"""Intermediate representations of a ViT: the encoder blocks' tokens, their patch maps, and the
pooled features the head reads, as a `keras.Model` sharing the classifier's weights.

The behaviour users know is timm's `VisionTransformer.forward_intermediates`
(huggingface/pytorch-image-models `timm/models/vision_transformer.py`): run the blocks, keep
the chosen ones' outputs, optionally through the final norm, split off the prefix (class,
distillation, register) tokens, and reshape the patch tokens to their grid ("NCHW" there,
(B, H/P, W/P, D) here, channels last as Keras is). Two differences, both said in
`feature_extractor`'s docstring: an int `blocks` is one block's index (timm: the last n), and
`norm=True` on a model that normalises after pooling applies its `fc_norm` (timm: nothing).
"""

import operator

import keras
from keras import ops

from keras_vit import layers

OUTPUTS = ("tokens", "spatial", "pre_logits")


def feature_extractor(model, *, blocks=None, output="tokens", norm=False,
                      include_prefix_tokens=False):
    """A model sharing `model`'s weights (no copies) that outputs its representations.

    Args:
        model: a ViT `create_model` (or `from_checkpoint`, `from_npz`) built, with any
            pooling and token options.
        blocks: which encoder blocks' outputs: an index (negative counts from the end, as
            Python's), a list of them, or None for the last block. The output is one tensor
            for an index or None, a list (in the order given) for a list.
        output: "tokens", each block's token sequence (B, N, D), the N patch tokens in
            row-major patch order; "spatial", the same patch tokens as a map
            (B, height / P, width / P, D), row r column c being the patch at that place;
            "pre_logits", the pooled features the head reads, (B, D) or
            (B, representation_size), after the model's own final norm (a distillation
            token's model: the mean of the class and distillation features, as timm's
            `forward_head(pre_logits=True)` and `create_model(include_top=False)`).
        norm: apply the encoder's final LayerNorm (Eq. 4's LN) to each block's tokens, as
            timm's `forward_intermediates(norm=True)`. A model that normalises after pooling
            (`norm_after_pooling`, timm's `fc_norm`) has no encoder norm: its `fc_norm` is
            applied to every token instead (timm would apply nothing), so that the last
            block's normalised tokens are what the pooling of such a model averages.
        include_prefix_tokens: with output="tokens", keep the class, distillation and
            register tokens before the patches: (B, prefix + N, D).

    Returns:
        A `keras.Model` with the same image input as `model` ((B, height, width, 3) pixels in
        [0, 255]) and float32 outputs. The blocks are `model`'s own layer objects called again,
        every token through every block: a model built with `class_token_only` (whose last
        block computes the class token alone) still gives every token here.

    Raises:
        ValueError: `model` is not a ViT `create_model` built, a block index is out of range
            or repeated, `output` is unknown, or the arguments do not go together.
    """
    encoder = _encoder(model)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}.")
    if output == "pre_logits":
        if blocks is not None or norm or include_prefix_tokens:
            raise ValueError(
                "output='pre_logits' is the head's input, after the model's own pooling and "
                f"norm; it takes no blocks, norm or include_prefix_tokens (got blocks={blocks!r},"
                f" norm={norm!r}, include_prefix_tokens={include_prefix_tokens!r}). Use "
                "output='tokens' for block outputs.")
        return _pre_logits_model(model, encoder)
    if output == "spatial" and include_prefix_tokens:
        raise ValueError("output='spatial' maps the patch tokens only, the prefix tokens have "
                         "no place on the grid; use output='tokens' with "
                         "include_prefix_tokens=True for them.")
    indices, single = _block_indices(blocks, encoder.num_layers)
    num_prefix_tokens = _num_prefix_tokens(model)
    if output == "spatial":
        _check_patch_grid(model, encoder, num_prefix_tokens)
    images, taken = _run_blocks(model, encoder, max(indices) + 1)
    final_norm = _final_norm(model, encoder) if norm else None
    outputs = []
    for index in indices:
        tokens = taken[index] if final_norm is None else final_norm(taken[index])
        if not include_prefix_tokens:
            tokens = PatchTokens(num_prefix_tokens, name=f"block_{index}_patch_tokens")(tokens)
        if output == "spatial":
            patch_size = model.get_layer("patch_embedding").patch_size
            tokens = PatchGrid(patch_size, name=f"block_{index}_grid")([tokens, images])
        outputs.append(_float32(tokens, f"block_{index}_{output}"))
    return keras.Model(images, outputs[0] if single else outputs,
                       name=f"{model.name}_{output}_features")


def _encoder(model):
    """`model`'s `layers.Encoder`, or an error saying what a feature extractor needs."""
    names = {layer.name for layer in model.layers}
    encoder = model.get_layer("encoder") if "encoder" in names else None
    if not isinstance(encoder, layers.Encoder) or "patch_embedding" not in names:
        raise ValueError(
            f"feature_extractor needs a ViT built by keras_vit.create_model (or "
            f"from_checkpoint / from_npz), with layers 'patch_embedding' and 'encoder'; "
            f"{model.name!r} has {sorted(names)}.")
    return encoder


def _block_indices(blocks, num_layers):
    """`blocks` -> (non-negative indices in the order given, whether one was asked for)."""
    single = blocks is None or not isinstance(blocks, (list, tuple))
    requested = [-1] if blocks is None else [blocks] if single else list(blocks)
    if not requested:
        raise ValueError("blocks is an empty list; give at least one block index, or None "
                         "for the last block.")
    indices = []
    for block in requested:
        try:
            if isinstance(block, bool):
                raise TypeError
            index = operator.index(block)
        except TypeError:
            raise ValueError(f"blocks holds {block!r}; block indices are integers.") from None
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"block index {index} is out of range: the model has {num_layers} encoder "
                f"blocks, indices 0 to {num_layers - 1} (or -{num_layers} to -1 from the end).")
        index %= num_layers
        if index in indices:
            raise ValueError(f"blocks names block {index} twice ({requested!r}); each output "
                             "is one block, list each once.")
        indices.append(index)
    return indices, single


def _num_prefix_tokens(model):
    """Class, distillation and register tokens before the patches (`model._embed`'s order)."""
    names = {layer.name: layer for layer in model.layers}
    registers = names.get("register_tokens")
    return (("class_token" in names) + ("distillation_token" in names)
            + (registers.num_tokens if registers is not None else 0))


def _check_patch_grid(model, encoder, num_prefix_tokens):
    """The patch tokens must fill the image's (height / P, width / P) grid to be a map."""
    patch_size = model.get_layer("patch_embedding").patch_size
    height, width = model.input_shape[1:3]
    num_tokens = encoder.input.shape[1]
    if None in (height, width, num_tokens):
        return  # A model taking any size: the grid is the image's, at call time.
    if height % patch_size or width % patch_size or (
            num_tokens - num_prefix_tokens != (height // patch_size) * (width // patch_size)):
        raise ValueError(
            f"output='spatial' needs the patch tokens to fill the image's patch grid: "
            f"{height}x{width} images with {patch_size}-pixel patches make a "
            f"{height // patch_size}x{width // patch_size} grid, but the encoder reads "
            f"{num_tokens - num_prefix_tokens} patch tokens. Use output='tokens'.")


def _run_blocks(model, encoder, num_blocks):
    """A new image input and the outputs of the first `num_blocks` blocks on it, every token.

    The embedding is `model`'s own layers (a sub-model from its input to the encoder's);
    the blocks after the last one asked for are not run (timm's `stop_early`).
    """
    embedding = keras.Model(model.inputs, encoder.input, name="embedding")
    images = keras.Input(model.input_shape[1:], name="images")
    x = embedding(images)
    taken = []
    for block in encoder.blocks[:num_blocks]:
        # Every block with every token: class_token_only is the encoder's shortcut, not theirs.
        x = block(x)
        taken.append(x)
    return images, taken


def _final_norm(model, encoder):
    """The encoder's final LayerNorm, or the `fc_norm` of a model that normalises after
    pooling (a LayerNorm over D: it normalises every token alike)."""
    if encoder.norm is not None:
        return encoder.norm
    return model.get_layer("fc_norm")


def _pre_logits_model(model, encoder):
    """A model from the images to the features `model`'s head reads (B, D or R), float32."""
    names = {layer.name for layer in model.layers}
    images, taken = _run_blocks(model, encoder, encoder.num_layers)
    x = taken[-1] if encoder.norm is None else encoder.norm(taken[-1])
    x = model.get_layer("pooling")(x)
    for name in ("fc_norm", "pre_logits"):
        if name in names:
            x = model.get_layer(name)(x)
    if "distillation_token" in names:
        # (B, 2, D) class and distillation features: DeiT's pre-logits are their mean.
        x = layers.DistilledHead(None, name="distilled_mean")(x)
    return keras.Model(images, _float32(x, "pre_logits_features"),
                       name=f"{model.name}_pre_logits_features")


def _float32(x, name):
    # The classifier's features are float32 under any policy; so are these.
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchTokens(keras.layers.Layer):
    """(B, prefix + N, D) tokens -> the (B, N, D) patch tokens, the prefix tokens dropped.

    Args:
        num_prefix_tokens: class, distillation and register tokens before the patches.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, num_prefix_tokens, **kwargs):
        super().__init__(**kwargs)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, tokens):
        return tokens[:, self.num_prefix_tokens:]

    def compute_output_shape(self, input_shape):
        num_tokens = None if input_shape[1] is None else input_shape[1] - self.num_prefix_tokens
        return (input_shape[0], num_tokens, input_shape[2])

    def get_config(self):
        return {**super().get_config(), "num_prefix_tokens": self.num_prefix_tokens}


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchGrid(keras.layers.Layer):
    """Patch tokens (B, N, D) -> their map (B, height / P, width / P, D), row-major as
    `layers.PatchEmbedding` flattens them; the grid is the images' at call time.

    Args:
        patch_size: side P of the patches, in pixels.
        **kwargs: passed to `keras.layers.Layer` (name, dtype).
    """

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def call(self, inputs):
        """[tokens (B, N, D), images (B, height, width, C)] -> (B, height/P, width/P, D)."""
        tokens, images = inputs
        rows = ops.shape(images)[1] // self.patch_size
        columns = ops.shape(images)[2] // self.patch_size
        return ops.reshape(tokens, (ops.shape(tokens)[0], rows, columns, ops.shape(tokens)[2]))

    def compute_output_shape(self, input_shape):
        tokens, images = input_shape
        rows, columns = (None if side is None else side // self.patch_size
                         for side in images[1:3])
        return (tokens[0], rows, columns, tokens[2])

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}
