"""Floating-point operations of a ViT, counted analytically from its shape.

Convention: 2 FLOP per multiply-add, counting only the matrix multiplies (patch projection,
attention projections, the two attention products, MLP, pre-logits and head). Bias adds,
LayerNorm, softmax and GELU are O(T·D) per layer against O(T·D²) for the matrix multiplies
(under 1% for B/16) and are left out, as in the paper's and timm's GFLOP figures. With this
convention ViT-B/16 at 224 with a 1000-class head is 35.13 GFLOP per image forward.

A training step (forward, backward, update) is counted as 3× the forward: the backward pass
does two matrix multiplies (input gradient and weight gradient) for each forward one.

`class_token_only=True` counts what keras_vit's token-pooling classifier actually runs: its last
block computes the class token alone (`layers.Encoder(class_token_only=True)`), 32.93 GFLOP for
ViT-B/16 at 224 instead of 35.13. Use it for rates and utilization of keras_vit's own models;
the standard count is the one to compare architectures with.
"""

from keras_vit.variants import check_pooling, image_shape, parse_variant

TRAINING_FLOPS_PER_FORWARD = 3


def forward_flops(variant, image_size=224, num_classes=1000, pooling="token",
                  representation_size=None, channels=3, class_token_only=False):
    """FLOP (2 per multiply-add) of one image's forward pass.

    Args:
        variant: "B/16" etc. or a `keras_vit.ViTConfig`.
        image_size: side in pixels or (height, width); multiples of the patch size.
        num_classes: width of the head; 0 or None for a model without a head.
        pooling: "token" (one class token more) or "gap".
        representation_size: width of the pre-logits layer, if any.
        channels: input channels (3 for RGB).
        class_token_only: count the last block for the class token alone (its query, value
            mixing, output projection and MLP for one token; keys and values for all), as
            keras_vit's token-pooling models run it. Needs pooling="token".

    Returns:
        An int, FLOP per image.
    """
    config = parse_variant(variant)
    height, width = image_shape(image_size, config.patch_size)
    patch, hidden, mlp = config.patch_size, config.hidden_size, config.mlp_dim
    check_pooling(pooling)
    if class_token_only and pooling != "token":
        raise ValueError("class_token_only needs pooling='token' (a model with a class token).")
    num_patches = (height // patch) * (width // patch)
    tokens = num_patches + (1 if pooling == "token" else 0)

    def block(queries):
        """Multiply-adds of one encoder block whose output is computed for `queries` tokens."""
        return (
            tokens * hidden * 3 * hidden      # fused query, key, value projection (all tokens)
            + 2 * queries * tokens * hidden   # q·kᵀ and probabilities·v, summed over heads
            + queries * hidden * hidden       # attention output projection
            + 2 * queries * hidden * mlp      # MLP: D -> mlp_dim -> D
        )

    patch_embedding = num_patches * (patch * patch * channels) * hidden
    blocks = (config.num_layers - 1) * block(tokens) + block(1 if class_token_only else tokens)
    width_out = hidden
    head = 0
    if representation_size:
        head += hidden * representation_size
        width_out = representation_size
    if num_classes:
        head += width_out * num_classes
    multiply_adds = patch_embedding + blocks + head
    return 2 * multiply_adds


def training_step_flops(variant, **kwargs):
    """FLOP of one image's training step (forward + backward), 3× `forward_flops`."""
    return TRAINING_FLOPS_PER_FORWARD * forward_flops(variant, **kwargs)


def mlp_matmul_flops(variant, batch_size, image_size=224, pooling="token"):
    """FLOP of one (batch·tokens, D) @ (D, mlp_dim) matrix multiply: the model's MLP shape.

    Used as the machine's reference rate for the kind of work the model does.

    Args:
        variant: "B/16" etc. or a `keras_vit.ViTConfig`.
        batch_size: images per batch.
        image_size: side in pixels or (height, width); multiples of the patch size.
        pooling: "token" (one class token more) or "gap".

    Returns:
        An int, FLOP of the whole multiply.
    """
    config = parse_variant(variant)
    height, width = image_shape(image_size, config.patch_size)
    tokens = (height // config.patch_size) * (width // config.patch_size)
    tokens += 1 if pooling == "token" else 0
    return 2 * batch_size * tokens * config.hidden_size * config.mlp_dim
