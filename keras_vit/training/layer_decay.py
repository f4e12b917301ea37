"""Layer-wise learning-rate decay (BEiT, MAE; timm's `param_groups_layer_decay`).

Fine-tuning a pre-trained ViT, the layers near the input change least: each variable's
learning rate is the schedule's times `layer_decay ** (L + 1 - layer_id)`, with

    layer_id 0       patch embedding, position embedding, class / distillation / register
                     tokens (and the input normalisation, were it to have weights);
    layer_id b + 1   encoder block b (0-based), b = 0 .. L - 1;
    layer_id L + 1   everything after the blocks: the final norm, fc_norm, the MAP pooling,
                     pre_logits and the head(s), at the full rate.

Sources: timm/optim/_param_groups.py `param_groups_layer_decay` (`layer_scales =
layer_decay ** (layer_max - i)`, `layer_max = num_layers - 1`) with the ViT matcher of
timm/models/vision_transformer.py `VisionTransformer.group_matcher` (stem
`^cls_token|pos_embed|patch_embed`, deit.py adds `dist_token`; blocks `^blocks\\.(\\d+)`);
facebookresearch/mae util/lr_decay.py `get_layer_id_for_vit` and microsoft/unilm
beit/optim_factory.py `get_num_layer_for_vit`. Two choices where the sources differ:
  - the final norm is at L + 1 as in BEiT and MAE (`else: return num_layers`); timm's matcher
    gives `norm` the suffix `MATCH_PREV_GROUP` (timm/models/_manipulate.py), which puts it in
    the last block's group, L;
  - register tokens are at 0 like the class token (they are input tokens); timm's stem regex
    does not name `reg_token`, which then falls to `layer_max`.
"""

import keras

from keras_vit import layers as vit_layers
from pipelines.errors import UserError

#: Layers before the encoder whose variables are layer 0.
_EMBEDDING_LAYERS = (
    vit_layers.PixelNormalization,
    vit_layers.PatchEmbedding,
    vit_layers.ClassToken,
    vit_layers.AddPositionEmbedding,
)


class LayerDecayError(UserError):
    """The model's variables cannot be put into layer-decay groups, or the rate is invalid."""


def check_layer_decay(layer_decay):
    """Raises `LayerDecayError` unless `layer_decay` is in (0, 1] (0 means off elsewhere)."""
    if not 0.0 < layer_decay <= 1.0:
        raise LayerDecayError(
            f"layer_decay must be in (0, 1] (each block below the head gets that factor of "
            f"the learning rate; 0 turns layer decay off), got {layer_decay!r}. BEiT/MAE "
            "fine-tuning uses 0.65 to 0.75.")


def _encoder_of(model):
    """The `Encoder` among `model`'s own layers, or None."""
    return next((layer for layer in model.layers if isinstance(layer, vit_layers.Encoder)), None)


def _vision_transformer(model):
    """The functional keras_vit model inside `model` whose encoder trains: `model` itself, or
    a sub-model such as a distillation wrapper's student (a frozen teacher, even a ViT, and
    other views of the same student's layers do not count twice)."""
    candidates = [model] + [
        layer for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.Model)
    ]
    by_encoder = {}
    for candidate in candidates:
        encoder = _encoder_of(candidate)
        if encoder is not None and encoder.trainable_variables:
            by_encoder.setdefault(id(encoder), candidate)
    if len(by_encoder) != 1:
        raise LayerDecayError(
            f"layer decay needs a keras_vit Vision Transformer (a functional model with one "
            f"trainable `Encoder` layer); {model.name!r} holds {len(by_encoder)} such models. "
            "Pass the model built by keras_vit.create_model / from_checkpoint.")
    return next(iter(by_encoder.values()))


def _encoder_ids(encoder):
    """{path: id} of the encoder's variables: block b -> b + 1, its final norm -> L + 1."""
    ids = {}
    for index, block in enumerate(encoder.blocks):
        ids.update({v.path: index + 1 for v in block.trainable_variables})
    if encoder.norm is not None:
        ids.update({v.path: encoder.num_layers + 1 for v in encoder.norm.trainable_variables})
    return ids


def layer_ids(model):
    """The layer-decay group of each trainable variable of `model`.

    Args:
        model: a built keras_vit ViT (`create_model`, `from_checkpoint`), or a model whose
            trainable variables are those of exactly one such ViT inside it.

    Returns:
        {variable.path: layer id in 0 .. L + 1} (module docstring), for every trainable
        variable.

    Raises:
        LayerDecayError: a trainable variable belongs to no group (a layer of unknown kind
            before the encoder, a variable of the encoder outside its blocks and final norm,
            or one outside the ViT), naming each.
    """
    vit = _vision_transformer(model)
    encoder = _encoder_of(vit)
    ids, unknown = {}, []
    after_encoder = False
    for layer in vit.layers:  # functional layers are in topological order: input first
        if layer is encoder:
            ids.update(_encoder_ids(encoder))
            after_encoder = True
        elif after_encoder:
            ids.update({v.path: encoder.num_layers + 1 for v in layer.trainable_variables})
        elif isinstance(layer, _EMBEDDING_LAYERS):
            ids.update({v.path: 0 for v in layer.trainable_variables})
        else:
            unknown += [v.path for v in layer.trainable_variables]
    unknown += [v.path for v in model.trainable_variables if v.path not in ids]
    if unknown:
        raise LayerDecayError(
            f"layer decay cannot place the variable(s) {sorted(set(unknown))} of {model.name!r} "
            "in a layer group: only the embeddings and tokens before the encoder (layer 0), "
            "the encoder's blocks (1 .. L) and final norm, and the layers after the encoder "
            "(L + 1) are known. Train without --layer_decay, or give "
            "build_optimizer(learning_rate_multipliers=...) your own table.")
    return {v.path: ids[v.path] for v in model.trainable_variables}


def num_groups(model):
    """L + 2: the layer-decay groups of `model`'s ViT (embeddings, L blocks, the top)."""
    return _encoder_of(_vision_transformer(model)).num_layers + 2


def learning_rate_multipliers(model, layer_decay):
    """The factor of the learning rate of each trainable variable: `layer_decay ** (L + 1 -
    layer_id)` (timm's `layer_scales`), so the head gets 1 and the patch embedding
    `layer_decay ** (L + 1)`.

    Args:
        model: as for `layer_ids`.
        layer_decay: the decay per layer, in (0, 1].

    Returns:
        {variable.path: multiplier (float)}.

    Raises:
        LayerDecayError: `layer_decay` outside (0, 1], or a variable `layer_ids` cannot place.
    """
    check_layer_decay(layer_decay)
    ids = layer_ids(model)
    top = num_groups(model) - 1  # L + 1, also when no variable sits after the blocks
    return {path: float(layer_decay) ** (top - layer_id) for path, layer_id in ids.items()}
