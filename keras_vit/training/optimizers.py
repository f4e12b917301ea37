"""Keras optimizers configured as the paper's recipes need them.

One function, `build_optimizer`: SGD with momentum (fine-tuning, Appendix B.1.1), Adam with
decoupled weight decay (pre-training, Table 3) or AdamW, all with global-norm gradient clipping,
gradient accumulation (`gradient_accumulation_steps`) and weight decay restricted to the
kernels: biases, LayerNorm scales/offsets and the position embedding / class token are excluded
(the default of big_vision, whose `wd_mults` decay only `.*/kernel`).

The optimizers are Keras's, with each variable's update fused into one TensorFlow kernel
(`fused_optimizers`): same arithmetic, ~2x less optimizer time on TensorFlow.

Two fine-tuning / DeiT recipe options: layer-wise learning-rate decay (`layer_decay`, BEiT/MAE
and timm's `param_groups_layer_decay`, see `layer_decay.py`) and an exponential moving average
of the weights (`ema_decay`, `ema_warmup`: Keras's optimizer EMA, stepped once per update,
with timm ModelEmaV3's warmup; `ema.py` evaluates and exports it).
"""

import keras

from keras_vit import layers as vit_layers
from keras_vit.training import layer_decay as layer_decay_lib
from keras_vit.training.fused_optimizers import FusedAdamW, FusedSGD
from pipelines.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
WEIGHT_DECAY_GROUPS = ("bias", "norm", "embedding")


def no_decay_variables(model, groups=WEIGHT_DECAY_GROUPS):
    """The trainable variables of `model` in the named groups.

    Args:
        model: a built `keras.Model` (a keras_vit ViT).
        groups: any of WEIGHT_DECAY_GROUPS: "bias" (every layer's `bias`), "norm"
            (LayerNormalization gamma and beta, LayerScale scales), "embedding" (position
            embedding, class, distillation and register tokens, the MAP head's probe; the
            patch projection is a kernel and is decayed, as in big_vision). timm excludes the
            same: every 1-D weight, and its `no_weight_decay` names.

    Returns:
        A list of the variables, each once.

    Raises:
        ValueError: a group is not one of WEIGHT_DECAY_GROUPS.
    """
    unknown = set(groups) - set(WEIGHT_DECAY_GROUPS)
    if unknown:
        raise ValueError(
            f"Unknown weight-decay exclusion group(s) {sorted(unknown)}; "
            f"expected any of {WEIGHT_DECAY_GROUPS}."
        )
    selected = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        chosen = []
        if "norm" in groups and isinstance(
            layer, (keras.layers.LayerNormalization, vit_layers.LayerScale)
        ):
            chosen = layer.trainable_weights
        elif "embedding" in groups and isinstance(
            layer, (vit_layers.ClassToken, vit_layers.AddPositionEmbedding)
        ):
            chosen = layer.trainable_weights
        elif "embedding" in groups and isinstance(layer, vit_layers.AttentionPooling):
            chosen = [layer.probe]
        elif "bias" in groups and getattr(layer, "bias", None) is not None:
            if layer.bias.trainable:
                chosen = [layer.bias]
        for variable in chosen:
            selected[variable.path] = variable
    return list(selected.values())


def build_optimizer(
    name,
    learning_rate,
    *,
    model=None,
    momentum=0.9,
    beta1=0.9,
    beta2=0.999,
    weight_decay=0.0,
    weight_decay_exclude=WEIGHT_DECAY_GROUPS,
    global_clipnorm=None,
    gradient_accumulation_steps=1,
    layer_decay=0.0,
    ema_decay=0.0,
    ema_warmup=False,
):
    """Returns a Keras optimizer: `FusedSGD` for "sgd", `FusedAdamW` for "adam" and "adamw".

    Args:
        name: "sgd" (heavy-ball momentum), "adam" or "adamw". `weight_decay` is decoupled
            (`w -= lr * weight_decay * w`) for all three, so "adam" with weight decay is the
            paper's pre-training optimizer and equals "adamw" (the same class).
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
        model: the model to train; needed when `weight_decay > 0` to find the excluded
            variables and when `layer_decay > 0` to find the layers (call under the
            strategy scope, before the optimizer is built).
        momentum: SGD momentum.
        beta1, beta2: Adam moment decay rates.
        weight_decay: decoupled weight decay coefficient (0 disables it).
        weight_decay_exclude: groups of `no_decay_variables` that are not decayed.
        global_clipnorm: clip the gradients to this global L2 norm (None: no clipping).
        gradient_accumulation_steps: average the gradients of this many micro-batches before
            each update (1: none).
        layer_decay: in (0, 1]: each variable's learning rate (and decoupled weight decay)
            is scaled by `layer_decay ** (L + 1 - layer_id)` (`layer_decay.layer_ids`); 0: off.
        ema_decay: in [0, 1): keep an exponential moving average of the trainable weights
            with this decay, updated once per optimizer update; 0: no EMA.
        ema_warmup: timm ModelEmaV3's warmup, decay min(ema_decay, 1 - (1 + t) ** (-2/3))
            at the update after t updates (`fused_optimizers._LayerDecayAndEma`).

    Returns:
        The optimizer, not yet built (Keras builds it on the first update).

    Raises:
        ValueError (a `UserError`): an unknown `name`, `gradient_accumulation_steps` < 1,
            weight or layer decay that needs `model` without one, `layer_decay` outside
            {0} and (0, 1], `ema_decay` outside [0, 1), or `ema_warmup` without `ema_decay`.
    """
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    if gradient_accumulation_steps < 1:
        raise UserError(
            f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}."
        )
    common = dict(
        learning_rate=learning_rate,
        weight_decay=weight_decay or None,
        global_clipnorm=global_clipnorm or None,
        gradient_accumulation_steps=(
            gradient_accumulation_steps if gradient_accumulation_steps > 1 else None
        ),
        learning_rate_multipliers=_multipliers(model, layer_decay),
        **_ema_arguments(ema_decay, ema_warmup),
    )
    if name == "sgd":
        optimizer = FusedSGD(momentum=momentum, **common)
    else:
        common["weight_decay"] = weight_decay  # AdamW needs a number; 0 decays nothing.
        optimizer = FusedAdamW(beta_1=beta1, beta_2=beta2, **common)
    if weight_decay and weight_decay_exclude:
        if model is None:
            raise UserError("build_optimizer needs `model` to exclude variables from weight decay.")
        optimizer.exclude_from_weight_decay(
            var_list=no_decay_variables(model, tuple(weight_decay_exclude))
        )
    return optimizer


def _multipliers(model, layer_decay):
    """{variable.path: learning-rate factor} of layer decay, or None when it is off (0)."""
    if not layer_decay:
        return None
    layer_decay_lib.check_layer_decay(layer_decay)
    if model is None:
        raise UserError(f"layer_decay={layer_decay} needs build_optimizer(model=...): the "
                        "learning-rate factors follow the model's layers.")
    return layer_decay_lib.learning_rate_multipliers(model, layer_decay)


def _ema_arguments(ema_decay, ema_warmup):
    """The EMA keywords of the optimizer: Keras's use_ema / ema_momentum and ema_warmup."""
    if not 0.0 <= ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1) (0: no EMA; DeiT uses 0.99996, timm "
                        f"fine-tuning 0.9998), got {ema_decay!r}.")
    if ema_warmup and not ema_decay:
        raise UserError("ema_warmup=True warms up an EMA: set ema_decay > 0 too.")
    if not ema_decay:
        return {}
    return dict(use_ema=True, ema_momentum=float(ema_decay), ema_warmup=bool(ema_warmup))
