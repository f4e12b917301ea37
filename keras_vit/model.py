"""The Vision Transformer as a functional `keras.Model` (paper, Section 3.1)."""

import dataclasses

import keras

from keras_vit import layers
from keras_vit.variants import ViTConfig, check_pooling, image_shape, parse_variant, short_name


def create_model(
    variant,
    *,
    image_size=None,
    num_classes=None,
    pooling="token",
    representation_size=None,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    stochastic_depth_rate=0.0,
    include_top=True,
    class_token_only=None,
    name=None,
    weights=None,
    remat=False,
    dynamic_image_size=False,
    **options,
):
    """Builds a Vision Transformer.

    Args:
        variant: "Ti/16", "S/16", "S/32", "B/8", "B/16", "B/32", "L/16", "L/32", "H/14" (also
            "ViT-B/16" or "b16"), or a `keras_vit.ViTConfig`.
        image_size: side of the square input in pixels, or (height, width); multiples of the
            patch size. Default 224; with `weights`, the checkpoint's (another size resamples
            its position embeddings).
        num_classes: classes of the linear head. Default 1000; with `weights`, the
            checkpoint's head (another number attaches a new zero head).
        pooling: one of `variants.POOLINGS`: "token" (class token, Eq. 4), "gap" (mean of
            the patch tokens) or "map" (attention pooling, big_vision's MAP head).
        representation_size: if set, the pre-training "pre-logits" layer Dense + tanh of this
            width sits before the head (the paper's "MLP with one hidden layer" at
            pre-training); None for fine-tuning's single linear head.
        dropout_rate: dropout after the position embedding, attention output and MLP layers.
        attention_dropout_rate: dropout on the attention probabilities.
        stochastic_depth_rate: drop-path rate of the last block (linear in depth from 0).
        include_top: if False the model ends at the pooled (or pre-logits) features.
        class_token_only: whether the last encoder block computes the class token alone, the
            only token token pooling reads: the same outputs for ~6% less work on ViT-B/16
            (`layers.Encoder`). None (default): True for pooling="token" without a
            distillation token. Pass False to read every token of the encoder's output,
            `model.get_layer("encoder").output` (B, T, D), e.g. as dense features; with True it
            is (B, 1, D).
        name: model name; defaults to "vit_" and the variant's short name, e.g. "vit_b16".
        weights: a registry name (`keras_vit.pretrained.names()`) or a checkpoint path: the
            model is then `keras_vit.from_checkpoint(weights, image_size=..., num_classes=...,
            dropout rates, include_top, name)`; its architecture is the checkpoint's, which
            must be `variant`'s, so the architecture arguments (pooling, representation_size,
            class_token_only, **options) cannot be given with it.
        remat: rematerialise each encoder block in training (`layers.Encoder`'s `remat`): the
            backward pass recomputes a block's activations instead of keeping them, for
            batches that do not fit otherwise (ViT-B/16, batch 32: 64% less peak memory for
            27% more step time, bench/NOTES.md). The same weights, outputs and gradients;
            not an architecture option (`model_options` leaves it out); `set_remat`
            switches it on a built model.
        dynamic_image_size: if True the model's input is (B, None, None, 3): any height and
            width that are multiples of the patch size work at call time (timm's
            `dynamic_img_size`). The position embedding, still trained for `image_size`'s
            grid, is resampled in the graph to each call's grid, bilinearly, to the numbers
            `posemb.resample` gives offline (`layers.AddPositionEmbedding`); at `image_size`
            the model computes exactly what the fixed-size model does. Not an architecture
            option (as remat: the weights are the same); a size that is no multiple of the
            patch size raises a ValueError (or, in a graph traced for any size, fails its
            assertion).
        **options: the choices other projects' ViTs made, each defaulting to Google's
            (`ModelOptions`): approximate_gelu, layer_norm_epsilon, input_mean, input_std,
            eval_crop_fraction, class_token, num_registers, distillation_token,
            position_embedding_prefix, layer_scale, norm_after_pooling.

    Returns:
        A functional `keras.Model`. Input: float32 RGB pixels in [0, 255],
        (B, height, width, 3); the model normalises them itself ((x / 255 - mean) / std; [-1, 1]
        by default, as Google's checkpoints expect). Output: float32 logits (B, num_classes)
        (no softmax) even under a mixed-precision policy; with include_top=False the float32
        features (B, D) or (B, representation_size).
    """
    config = parse_variant(variant)
    regularisation = dict(dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
                          stochastic_depth_rate=stochastic_depth_rate)
    if weights is not None:
        architecture = dict(options, pooling=pooling, representation_size=representation_size,
                            class_token_only=class_token_only)
        model = _pretrained(config, weights, architecture, image_size=image_size,
                            num_classes=num_classes, include_top=include_top, name=name,
                            dynamic_image_size=dynamic_image_size, **regularisation)
        return set_remat(model, remat)
    image_size = 224 if image_size is None else image_size
    num_classes = 1000 if num_classes is None else num_classes
    check_pooling(pooling)
    choices = ModelOptions.checked(pooling, options)
    class_token_only = _class_token_only(pooling, class_token_only, choices)
    if include_top and (not isinstance(num_classes, int) or num_classes <= 0):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    height, width = image_shape(image_size, config.patch_size)

    images = keras.Input((None, None, 3) if dynamic_image_size else (height, width, 3),
                         name="images")
    x = _embed(images, config, choices, dropout_rate, grid_size=(
        height // config.patch_size, width // config.patch_size), dynamic=dynamic_image_size)
    x = layers.Encoder(
        config.num_layers,
        config.num_heads,
        config.mlp_dim,
        **regularisation,
        class_token_only=class_token_only,
        final_norm=not choices.norm_after_pooling,
        **choices.block_options(),
        remat=remat,
        name="encoder",
    )(x)
    x = _pool(x, config, pooling, choices)
    x = _head(x, representation_size, num_classes if include_top else None, choices)
    return keras.Model(images, x, name=name or f"vit_{short_name(config)}")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The architecture choices beyond the paper's, each defaulting to Google's model.

    Attributes:
        approximate_gelu: the MLPs' GELU: tanh form (Google's Flax code, big_vision) or exact
            erf form (timm, Hugging Face, DeiT, DINOv2).
        layer_norm_epsilon: of every LayerNorm (Hugging Face's ViT uses 1e-12).
        input_mean, input_std: per-channel normalisation of [0, 1] pixels inside the model.
        eval_crop_fraction: the checkpoint's evaluation central crop (timm's crop_pct),
            recorded for the tools; None for the whole image.
        class_token: None means exactly with pooling="token".
        num_registers: register tokens after the class (and distillation) token.
        distillation_token: DeiT's second token and head; needs token pooling.
        position_embedding_prefix: whether the position embedding also covers the prefix
            tokens (Google, timm's default) or the patches only (big_vision, timm's
            no_embed_class).
        layer_scale: None, or the init value of a LayerScale on both residual branches.
        norm_after_pooling: the final LayerNorm after pooling instead of before (timm's
            fc_norm).
    """

    approximate_gelu: bool = True
    layer_norm_epsilon: float = layers.LAYER_NORM_EPSILON
    input_mean: tuple = (0.5, 0.5, 0.5)
    input_std: tuple = (0.5, 0.5, 0.5)
    eval_crop_fraction: float | None = None
    class_token: bool | None = None
    num_registers: int = 0
    distillation_token: bool = False
    position_embedding_prefix: bool = True
    layer_scale: float | None = None
    norm_after_pooling: bool = False

    @classmethod
    def checked(cls, pooling, options):
        """The options of `create_model(**options)`, checked against each other and `pooling`."""
        unknown = sorted(set(options) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            allowed = ", ".join(field.name for field in dataclasses.fields(cls))
            raise TypeError(f"create_model got unexpected arguments {unknown}; its options are "
                            f"{allowed} (and the keywords of its signature).")
        choices = cls(**options)
        if choices.class_token is None:
            choices = dataclasses.replace(choices, class_token=pooling == "token")
        if pooling == "token" and not choices.class_token:
            raise ValueError("pooling='token' reads the class token: class_token must be True.")
        if choices.distillation_token and (pooling != "token" or choices.norm_after_pooling):
            raise ValueError("distillation_token=True needs pooling='token' (DeiT reads the "
                             "class and distillation tokens) and no norm_after_pooling.")
        if choices.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {choices.num_registers}.")
        return choices

    @property
    def num_prefix_tokens(self):
        return int(self.class_token) + int(self.distillation_token) + self.num_registers

    def block_options(self):
        return {"layer_scale": self.layer_scale, "approximate_gelu": self.approximate_gelu,
                "layer_norm_epsilon": self.layer_norm_epsilon}


def set_remat(model, remat=True):
    """Switches the rematerialisation of `model`'s encoder blocks (`create_model`'s `remat`).

    It takes effect the next time the model is traced for training (a new `compile` or `fit`
    of a new model); Keras caches a compiled train function.

    Args:
        model: a model `create_model` (or `from_checkpoint`) built.
        remat: whether each encoder block is rematerialised in training.

    Returns:
        `model`, changed in place.
    """
    model.get_layer("encoder").remat = bool(remat)
    return model


def _class_token_only(pooling, class_token_only, choices):
    """`create_model`'s class_token_only, checked; None means True exactly for token pooling
    of the class token alone."""
    reads_class_token_only = pooling == "token" and not choices.distillation_token
    if class_token_only is None:
        return reads_class_token_only
    if class_token_only and not reads_class_token_only:
        raise ValueError(f"class_token_only=True needs pooling='token' without a distillation "
                         f"token, got pooling={pooling!r}: the head reads other tokens.")
    return class_token_only


def _embed(images, config, choices, dropout_rate, grid_size, dynamic=False):
    """Eq. 1: pixels (B, height, width, 3) in [0, 255] -> tokens (B, T, D).

    T = prefix tokens (class, distillation, registers, in that order) + patches.
    grid_size: the patch grid (rows, columns) the position embedding is built for; with
    `dynamic`, the embedding layer also takes the images, to resample to their grid.
    """
    x = layers.PixelNormalization(choices.input_mean, choices.input_std,
                                  choices.eval_crop_fraction, name="rescale")(images)
    x = layers.PatchEmbedding(config.patch_size, config.hidden_size, name="patch_embedding")(x)
    position = dict(patch_size=config.patch_size) if dynamic else {}
    grid_images = (images,) if dynamic else ()
    if not choices.position_embedding_prefix:
        x = layers.AddPositionEmbedding(grid_size, num_prefix_tokens=0, name="position_embedding",
                                        **position)(x, *grid_images)
    # Each layer prepends its tokens, so the last one called comes first.
    if choices.num_registers:
        x = layers.ClassToken(choices.num_registers, keras.initializers.RandomNormal(stddev=1e-6),
                              name="register_tokens")(x)
    if choices.distillation_token:
        x = layers.ClassToken(1, keras.initializers.TruncatedNormal(stddev=0.02),
                              name="distillation_token")(x)
    if choices.class_token:
        x = layers.ClassToken(name="class_token")(x)
    if choices.position_embedding_prefix:
        x = layers.AddPositionEmbedding(
            grid_size, num_prefix_tokens=choices.num_prefix_tokens, name="position_embedding",
            **position)(x, *grid_images)
    return keras.layers.Dropout(dropout_rate, name="embedding_dropout")(x)


def _pool(tokens, config, pooling, choices):
    """Encoder output (B, T, D) -> (B, D), or (B, 2, D) with a distillation token; then the
    final LayerNorm if it comes after pooling."""
    if pooling == "map":
        x = layers.AttentionPooling(
            config.num_heads, config.mlp_dim, choices.approximate_gelu,
            choices.layer_norm_epsilon, name="pooling")(tokens)
    else:
        x = layers.TokenPooling(pooling, choices.num_prefix_tokens, choices.distillation_token,
                                name="pooling")(tokens)
    if choices.norm_after_pooling:
        # Keras's own layer, not layers.LayerNorm: a functional model's .weights.h5 files its
        # top-level layers by class name, and earlier files hold this one under
        # "layers/layer_normalization". It normalizes one (B, D) vector: its form costs nothing.
        x = keras.layers.LayerNormalization(epsilon=choices.layer_norm_epsilon, name="fc_norm")(x)
    return x


def _head(features, representation_size, num_classes, choices):
    """Pooled features (B, D) -> float32 logits (B, num_classes), or features without a head.

    Args:
        features: (B, D), the pooled encoder output; (B, 2, D) with a distillation token.
        representation_size: width of the pre-logits Dense + tanh before the head; None for
            none.
        num_classes: classes of the head; None for no head.
        choices: the `ModelOptions` (a distillation token gets DeiT's two heads).

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
    if choices.distillation_token:
        return layers.DistilledHead(num_classes, name="head" if num_classes else "features")(x)
    if num_classes is None:
        return keras.layers.Activation("linear", dtype="float32", name="features")(x)
    # The head is zero-initialized (big_vision's default, the paper's fine-tuning recipe)
    # and computes in float32, so logits are float32 under any policy.
    return keras.layers.Dense(
        num_classes, kernel_initializer="zeros", dtype="float32", name="head"
    )(x)


def _pretrained(config, weights, architecture, name=None, **arguments):
    """`create_model(variant, weights=...)`: the checkpoint's model, checked against `variant`.

    `architecture` holds create_model's architecture arguments, which must be left at their
    defaults: the checkpoint decides them.
    """
    from keras_vit.sources import from_checkpoint  # Here: sources imports this module.

    defaults = dict(pooling="token", representation_size=None, class_token_only=None)
    dynamic = {"dynamic_image_size": True} if arguments.pop("dynamic_image_size", False) else {}
    given = sorted(key for key, value in architecture.items()
                   if key not in defaults or value != defaults[key])
    if given:
        raise TypeError(f"create_model(weights={weights!r}) takes its architecture from the "
                        f"checkpoint; drop {given} (image_size, num_classes, the dropout rates, "
                        "include_top and name are allowed).")
    model = from_checkpoint(weights, **arguments, **dynamic, **({"name": name} if name else {}))
    found = model_config(model)
    if found != config:
        raise ValueError(f"weights={weights!r} is a {short_name(found)} model ({found}), not the "
                         f"variant {short_name(config)} asked for ({config}).")
    return model


def model_options(model):
    """The `create_model` keywords that rebuild `model` (a model `create_model` built), the
    variant aside (`model_config`): image_size, num_classes, pooling, representation_size and
    every `ModelOptions` field."""
    encoder = model.get_layer("encoder")
    rescale = model.get_layer("rescale")
    pooling = model.get_layer("pooling")
    head = _layer_or_none(model, "head")
    found = {
        "image_size": built_image_size(model),
        "num_classes": None if head is None else int(model.output_shape[-1]),
        "pooling": "map" if isinstance(pooling, layers.AttentionPooling) else pooling.pooling,
        "representation_size": _units(_layer_or_none(model, "pre_logits")),
        "class_token": _layer_or_none(model, "class_token") is not None,
        "distillation_token": _layer_or_none(model, "distillation_token") is not None,
        "num_registers": getattr(_layer_or_none(model, "register_tokens"), "num_tokens", 0),
        "position_embedding_prefix": model.get_layer("position_embedding").num_prefix_tokens > 0
        or not any(_layer_or_none(model, n) for n in
                   ("class_token", "distillation_token", "register_tokens")),
        "norm_after_pooling": _layer_or_none(model, "fc_norm") is not None,
        **encoder.block_options,
    }
    # Models saved before PixelNormalization existed rescale with keras's Rescaling to [-1, 1].
    defaults = ModelOptions()
    for name in ("mean", "std", "eval_crop_fraction"):
        key = name if name == "eval_crop_fraction" else f"input_{name}"
        found[key] = getattr(rescale, name, getattr(defaults, key))
    return found


def built_image_size(model):
    """(height, width) in pixels that `model`'s position embedding is built for: its input's,
    or for a dynamic-size model (input (B, None, None, 3)) the grid times the patch size."""
    height, width = model.input_shape[1:3]
    if height is not None and width is not None:
        return (height, width)
    patch_size = model.get_layer("patch_embedding").patch_size
    return tuple(side * patch_size for side in model.get_layer("position_embedding").grid_size)


def _layer_or_none(model, name):
    return next((layer for layer in model.layers if layer.name == name), None)


def _units(dense):
    return None if dense is None else int(dense.units)


def model_config(model):
    """The `ViTConfig` of a model `create_model` built."""
    encoder = model.get_layer("encoder")
    projection = model.get_layer("patch_embedding")
    return ViTConfig(projection.patch_size, projection.hidden_size, encoder.num_layers,
                     encoder.num_heads, encoder.mlp_dim)


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
        elif isinstance(layer, layers.AddPositionEmbedding) and layer.patch_size is not None:
            x = layer(x, images)  # A dynamic-size model's embedding reads the images' grid.
        else:
            x = layer(x)
    outputs["logits" if model.layers[-1].name == "head" else "features"] = x
    return keras.Model(images, outputs, name=f"{model.name}_with_attention")
