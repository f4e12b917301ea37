"""Keras's AdamW and SGD with one fused kernel per variable update on the TensorFlow backend.

Keras 3 writes each optimizer update with `keras.ops`: on TensorFlow, AdamW runs about ten
element-wise ops per variable (decay, two moment updates, the step), each a full pass over the
variable's memory plus a temporary. TensorFlow has the same updates as single kernels
(`ResourceApplyAdam`, `ResourceApplyKerasMomentum`; they also have XLA and TPU
implementations): these classes call them, with the decoupled weight decay applied in the same
per-variable update step, which about halves the optimizer's time on ViT-B/16 (bench/NOTES.md
has the measurements). Under XLA (`jit_compile=True`) there is no gain: XLA fuses Keras's ops
itself.

The arithmetic is Keras's, to float32 rounding (tests/test_fused_optimizers.py compares every
step with `keras.optimizers.AdamW` / `SGD`; the MirroredStrategy and multi-worker training
tests run through these classes). Configuration, slots,
schedules, clipping, gradient accumulation, EMA and serialization are inherited unchanged. Other
backends (JAX compiles the whole step, so there is nothing to fuse by hand), sparse gradients
and AMSGrad take Keras's own `update_step`.

Both classes also take the two training-recipe options of `_LayerDecayAndEma` on every
backend: per-variable learning-rate multipliers (layer-wise decay, `layer_decay.py`) and an
EMA of the weights that steps once per optimizer update, with timm's optional warmup.
"""

import threading

import keras
import tensorflow as tf
from keras import ops

from pipelines.errors import UserError

#: timm ModelEmaV3's default warmup power (`warmup_power=2/3`, `warmup_gamma=1`).
EMA_WARMUP_POWER = 2.0 / 3.0


def _fused_updates_apply(gradient) -> bool:
    return keras.backend.backend() == "tensorflow" and not isinstance(gradient, tf.IndexedSlices)


def _tf_variable(variable):
    """The `tf.Variable` (or distributed variable) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class _LayerDecayAndEma:
    """Per-variable learning-rate multipliers and a per-update EMA, mixed into a Keras
    optimizer (before the Keras class).

    Learning-rate multipliers (`learning_rate_multipliers`, {variable.path: factor}): each
    variable's update, its decoupled weight decay included, uses `factor * learning_rate`,
    as torch's AdamW / SGD with timm's `lr_scale` parameter groups (timm/scheduler/scheduler.py
    sets each group's lr to `value * param_group['lr_scale']`; the decay `p *= 1 - lr * wd` uses
    the group's lr). The schedule, clipping (of the raw gradients, before any factor) and
    gradient accumulation are unchanged.

    EMA (`use_ema=True`, `ema_momentum=decay`): Keras's moving-average variables (optimizer
    variables, so `save_weights` and the backups hold them), updated as
    `average = d * average + (1 - d) * weight` after each optimizer update, where with t the
    updates before this one (`self.iterations`):
      - without warmup, d = 0 at t = 0 (the average starts as the first updated weights) and
        `decay` after; this is Keras's rule and timm ModelEmaV3's `get_decay(step)`, whose
        step (timm train.py: `num_updates += 1; model_ema.update(model, step=num_updates)`)
        is t + 1 and gives 0 for step <= 1;
      - with `ema_warmup`, d = min(decay, 1 - (1 + t) ** (-2/3)): timm ModelEmaV3's
        `use_warmup` (timm/utils/model_ema.py, warmup_gamma 1, warmup_power 2/3), with timm's
        `step - 1` = t; also 0 at t = 0.
    Under gradient accumulation Keras runs the EMA update at every micro-step; here d = 1 on
    the micro-steps that only accumulate, so the average moves once per update.
    `finalize_variable_values`, which `fit` calls at its end, leaves the model's weights as
    they are (Keras's would overwrite them with the average): `keras_vit.training.ema` swaps
    or copies the average in when asked.
    """

    def _init_recipe(self, learning_rate_multipliers, ema_warmup):
        if ema_warmup and not self.use_ema:
            raise UserError("ema_warmup=True needs use_ema=True (an EMA to warm up); "
                            "set ema_momentum (--ema_decay) too.")
        self.learning_rate_multipliers = (
            None if learning_rate_multipliers is None
            else {str(path): float(value) for path, value in learning_rate_multipliers.items()})
        self.ema_warmup = bool(ema_warmup)
        self._variable_multipliers = ()

    def build(self, variables):
        super().build(variables)
        if self.learning_rate_multipliers is None:
            return
        missing = [v.path for v in variables if v.path not in self.learning_rate_multipliers]
        if missing:
            raise UserError(
                f"learning_rate_multipliers has no factor for the variable(s) {missing}: the "
                "optimizer is updating another model's variables than the table was made for. "
                "Make it with keras_vit.training.layer_decay.learning_rate_multipliers(model, "
                "layer_decay) of the model you train (build_optimizer(layer_decay=..., "
                "model=model) does).")
        self._variable_multipliers = tuple(
            self.learning_rate_multipliers[v.path] for v in variables)

    def _scaled_learning_rate(self, variable, learning_rate):
        """`learning_rate` times `variable`'s multiplier (unchanged without multipliers)."""
        if self.learning_rate_multipliers is None:
            return learning_rate
        factor = self._variable_multipliers[self._get_variable_index(variable)]
        return learning_rate if factor == 1.0 else learning_rate * factor

    def ema_decay_now(self):
        """The EMA decay d of the update this optimizer is applying (class docstring), a
        float32 scalar; 1 on a micro-step that only accumulates gradients."""
        updates_before = ops.cast(self.iterations, "float32")
        if self.ema_warmup:
            warm = 1.0 - ops.power(1.0 + updates_before, -EMA_WARMUP_POWER)
            decay = ops.minimum(ops.cast(self.ema_momentum, "float32"), warm)
        else:
            decay = ops.where(updates_before > 0, float(self.ema_momentum), 0.0)
        if self.gradient_accumulation_steps:
            updates = ops.equal((self._iterations + 1) % self.gradient_accumulation_steps, 0)
            decay = ops.where(updates, decay, 1.0)
        return ops.cast(decay, "float32")

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        decay = self.ema_decay_now()
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is None:
                continue
            d = ops.cast(decay, variable.dtype)
            # Keras's form d * a + (1 - d) * w: exactly w at d = 0, exactly a at d = 1.
            average.assign(ops.add(ops.multiply(d, average), ops.multiply(1 - d, variable)))

    def finalize_variable_values(self, var_list):
        """Nothing: the model keeps its trained weights at the end of `fit` (see the class
        docstring; `keras_vit.training.ema.copy_ema_into_model` makes the EMA the weights)."""

    def get_config(self):
        config = super().get_config()
        config.update(learning_rate_multipliers=self.learning_rate_multipliers,
                      ema_warmup=self.ema_warmup)
        return config


#: Per replica thread (MirroredStrategy traces each replica in its own thread): whether this
#: replica's gradients were already all-reduced for clipping, keyed by id(optimizer).
_REDUCED_FOR_CLIPPING = threading.local()


def _replicas_in_context():
    """The replicas of the current tf.distribute replica context (1 outside one, or not TF)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


class _GlobalClippingOverReplicas:
    """Global-norm clipping of the all-reduced gradient under a multi-replica strategy.

    Keras 3.15's TensorFlow optimizer clips in `_backend_apply_gradients` before
    `_backend_update_step` all-reduces, i.e. each replica clips its own partial gradient by its
    own norm: with 2 replicas and active clipping the weights differ from one device's by
    ~14% after 8 steps (measured, tests/test_ema.py). Here the gradients are all-reduced first,
    clipped as one device would clip them, and not reduced a second time. Mixed in before the
    Keras class; no change with one replica or on other backends.
    """

    def _clip_gradients(self, grads):
        if self.global_clipnorm and _replicas_in_context() > 1:
            context = tf.distribute.get_replica_context()
            present = [g for g in grads if g is not None]
            reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
            grads = [None if g is None else next(reduced) for g in grads]
            setattr(_REDUCED_FOR_CLIPPING, str(id(self)), True)
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        key = str(id(self))
        if getattr(_REDUCED_FOR_CLIPPING, key, False):
            setattr(_REDUCED_FOR_CLIPPING, key, False)
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)


class _FusedWeightDecay:
    """Decoupled weight decay `w -= lr * weight_decay * w` inside each variable's update.

    Keras's TensorFlow optimizer applies the decay to all variables in a separate distributed
    update before the gradient updates; on TensorFlow this mixin does it in `update_step`, in the
    same per-variable distributed update as the fused kernel. Mixed into subclasses of a Keras
    optimizer, before the Keras class.
    """

    def _apply_weight_decay(self, variables):
        # On TensorFlow: done in `_decay`, called from `update_step`.
        if keras.backend.backend() == "tensorflow":
            return
        if self.learning_rate_multipliers is None:
            super()._apply_weight_decay(variables)
            return
        if self.weight_decay is None:
            return
        for variable in variables:  # Keras's arithmetic, at each variable's own rate
            if self._use_weight_decay(variable):
                lr = ops.cast(self._scaled_learning_rate(variable, self.learning_rate),
                              variable.dtype)
                wd = ops.cast(self.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd * lr)

    def _decay(self, variable, learning_rate):
        if keras.backend.backend() != "tensorflow":
            return  # Keras's own `_apply_weight_decay` ran.
        if not self.weight_decay or not self._use_weight_decay(variable):
            return
        var = _tf_variable(variable)
        scale = tf.cast(learning_rate, var.dtype) * tf.cast(self.weight_decay, var.dtype)
        var.assign_sub(var * scale)


@keras.saving.register_keras_serializable(package="keras_vit")
class FusedAdamW(_LayerDecayAndEma, _GlobalClippingOverReplicas, _FusedWeightDecay,
                 keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose TensorFlow update is `ResourceApplyAdam` (same arguments).

    Update, per variable `w` with gradient `g` at step `t` (Keras's and TensorFlow's Adam):
    `w -= lr * wd * w`; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
    `w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)`.
    With `weight_decay=0` it is Adam. `learning_rate_multipliers` and `ema_warmup`: see
    `_LayerDecayAndEma`.
    """

    def __init__(self, *args, learning_rate_multipliers=None, ema_warmup=False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_recipe(learning_rate_multipliers, ema_warmup)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._scaled_learning_rate(variable, learning_rate)
        self._decay(variable, learning_rate)
        if self.amsgrad or not _fused_updates_apply(gradient):
            return super().update_step(gradient, variable, learning_rate)
        var = _tf_variable(variable)
        index = self._get_variable_index(variable)
        dtype = var.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle,
            m=_tf_variable(self._momentums[index]).handle,
            v=_tf_variable(self._velocities[index]).handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
            use_locking=False,
        )


@keras.saving.register_keras_serializable(package="keras_vit")
class FusedSGD(_LayerDecayAndEma, _GlobalClippingOverReplicas, _FusedWeightDecay,
               keras.optimizers.SGD):
    """`keras.optimizers.SGD` whose TensorFlow update is one kernel (same arguments).

    Momentum: `ResourceApplyKerasMomentum` (`v = momentum v - lr g`; `w += v`, or with Nesterov
    `w += momentum v - lr g`), without momentum `ResourceApplyGradientDescent` (`w -= lr g`);
    the decoupled decay `w -= lr * wd * w` first, as Keras does. `learning_rate_multipliers`
    and `ema_warmup`: see `_LayerDecayAndEma`.
    """

    def __init__(self, *args, learning_rate_multipliers=None, ema_warmup=False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_recipe(learning_rate_multipliers, ema_warmup)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = self._scaled_learning_rate(variable, learning_rate)
        self._decay(variable, learning_rate)
        if not _fused_updates_apply(gradient):
            return super().update_step(gradient, variable, learning_rate)
        var = _tf_variable(variable)
        lr = tf.cast(learning_rate, var.dtype)
        gradient = tf.cast(gradient, var.dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(
                var=var.handle, alpha=lr, delta=gradient, use_locking=False)
            return
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=var.handle,
            accum=_tf_variable(self.momentums[self._get_variable_index(variable)]).handle,
            lr=lr,
            grad=gradient,
            momentum=tf.cast(self.momentum, var.dtype),
            use_locking=False,
            use_nesterov=self.nesterov,
        )
