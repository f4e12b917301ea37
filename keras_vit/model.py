"""The Vision Transformer as a functional `keras.Model` (paper, Section 3.1)."""

import keras

from keras_vit import layers
from keras_vit.variants import check_pooling, image_shape, parse_variant, short_name


def create_model(
    variant,
    *,
    image_size=224,
    num_classes=1000,
    pooling="token",
    representation_size=None,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    stochastic_depth_rate=0.0,
    include_top=True,
    class_token_only=None,
    name=None,
):
    """Builds a Vision Transformer.

    Args:
        variant: "Ti/16", "S/16", "S/32", "B/8", "B/16", "B/32", "L/16", "L/32", "H/14" (also
            "ViT-B/16" or "b16"), or a `keras_vit.ViTConfig`.
        image_size: side of the square input in pixels, or (height, width); multiples of the
            patch size.
        num_classes: classes of the linear head.
        pooling: one of `variants.POOLINGS`: "token" (class token, Eq. 4) or "gap" (mean of
            the patch tokens).
        representation_size: if set, the pre-training "pre-logits" layer Dense + tanh of this
            width sits before the head (the paper's "MLP with one hidden layer" at
            pre-training); None for fine-tuning's single linear head.
        dropout_rate: dropout after the position embedding, attention output and MLP layers.
        attention_dropout_rate: dropout on the attention probabilities.
        stochastic_depth_rate: drop-path rate of the last block (linear in depth from 0).
        include_top: if False the model ends at the pooled (or pre-logits) features.
        class_token_only: whether the last encoder block computes the class token alone, the
            only token token pooling reads: the same outputs for ~6% less work on ViT-B/16
            (`layers.Encoder`). None (default): True for pooling="token". Pass False to read
            every token of the encoder's output, `model.get_layer("encoder").output`
            (B, T, D), e.g. as dense features; with True it is (B, 1, D).
        name: model name; defaults to "vit_" and the variant's short name, e.g. "vit_b16".

    Returns:
        A functional `keras.Model`. Input: float32 RGB pixels in [0, 255],
        (B, height, width, 3); the model rescales them to [-1, 1] itself, as Google's
        checkpoints expect. Output: float32 logits (B, num_classes) (no softmax) even under a
        mixed-precision policy; with include_top=False the float32 features (B, D) or
        (B, representation_size).
    """
    config = parse_variant(variant)
    check_pooling(pooling)
    class_token_only = _class_token_only(pooling, class_token_only)
    if include_top and (not isinstance(num_classes, int) or num_classes <= 0):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    height, width = image_shape(image_size, config.patch_size)

    images = keras.Input((height, width, 3), name="images")
    x = _embed(images, config, pooling, dropout_rate)
    x = layers.Encoder(
        config.num_layers,
        config.num_heads,
        config.mlp_dim,
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
        stochastic_depth_rate=stochastic_depth_rate,
        class_token_only=class_token_only,
        name="encoder",
    )(x)
    x = layers.TokenPooling(pooling, name="pooling")(x)
    x = _head(x, representation_size, num_classes if include_top else None)
    return keras.Model(images, x, name=name or f"vit_{short_name(config)}")


def _class_token_only(pooling, class_token_only):
    """`create_model`'s class_token_only, checked; None means True exactly for token pooling."""
    if class_token_only is None:
        return pooling == "token"
    if class_token_only and pooling != "token":
        raise ValueError(f"class_token_only=True needs pooling='token', got {pooling!r}: "
                         "global average pooling reads every token.")
    return class_token_only


def _embed(images, config, pooling, dropout_rate):
    """Eq. 1: pixels (B, height, width, 3) in [0, 255] -> tokens (B, T, D)."""
    # [0, 255] -> [-1, 1]: the input scaling of the original training code.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(images)
    x = layers.PatchEmbedding(config.patch_size, config.hidden_size, name="patch_embedding")(x)
    if pooling == "token":
        x = layers.ClassToken(name="class_token")(x)
    grid_size = (images.shape[1] // config.patch_size, images.shape[2] // config.patch_size)
    x = layers.AddPositionEmbedding(
        grid_size, num_prefix_tokens=1 if pooling == "token" else 0, name="position_embedding"
    )(x)
    return keras.layers.Dropout(dropout_rate, name="embedding_dropout")(x)


def _head(features, representation_size, num_classes):
    """Pooled features (B, D) -> float32 logits (B, num_classes), or features without a head.

    Args:
        features: (B, D), the pooled encoder output.
        representation_size: width of the pre-logits Dense + tanh before the head; None for
            none.
        num_classes: classes of the head; None for no head.

    Returns:
        float32 logits (B, num_classes); without a head the float32 features (B, D) or
        (B, representation_size).
    """
    x = features
    if representation_size:
        x = keras.layers.Dense(
            representation_size, activation="tanh", kernel_initializer="lecun_normal",
            name="pre_logits",
        )(x)
    if num_classes is None:
        return keras.layers.Activation("linear", dtype="float32", name="features")(x)
    # The head is zero-initialized (big_vision's default, the paper's fine-tuning recipe)
    # and computes in float32, so logits are float32 under any policy.
    return keras.layers.Dense(
        num_classes, kernel_initializer="zeros", dtype="float32", name="head"
    )(x)


class _EncoderWithAttention(keras.layers.Layer):
    """Calls an existing Encoder with return_attention_scores=True (weights shared).

    A separate layer object, because Keras's functional graph records one output structure per
    layer object, and the encoder already has a single-output node in the classifier.
    """

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, tokens):
        return self.encoder(tokens, return_attention_scores=True)


def attention_model(model):
    """Returns a model sharing `model`'s weights that also outputs every attention map.

    The blocks are the same layer objects called with `return_attention_scores=True`, so there
    is no second implementation of attention to drift apart.

    Output: a dict with "logits" (or "features" without a head) as `model` gives, and
    "attention": (B, num_layers, H, T, T) attention probabilities, first block first.
    """
    encoder = model.get_layer("encoder")
    images = keras.Input(model.input_shape[1:], name="images")
    x = images
    outputs = {}
    for layer in model.layers[1:]:
        if layer is encoder:
            x, outputs["attention"] = _EncoderWithAttention(encoder, name="encoder_with_attention")(x)
        else:
            x = layer(x)
    outputs["logits" if model.layers[-1].name == "head" else "features"] = x
    return keras.Model(images, outputs, name=f"{model.name}_with_attention")
