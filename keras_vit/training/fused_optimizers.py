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
"""

import keras
import tensorflow as tf


def _fused_updates_apply(gradient) -> bool:
    return keras.backend.backend() == "tensorflow" and not isinstance(gradient, tf.IndexedSlices)


def _tf_variable(variable):
    """The `tf.Variable` (or distributed variable) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class _FusedWeightDecay:
    """Decoupled weight decay `w -= lr * weight_decay * w` inside each variable's update.

    Keras's TensorFlow optimizer applies the decay to all variables in a separate distributed
    update before the gradient updates; on TensorFlow this mixin does it in `update_step`, in the
    same per-variable distributed update as the fused kernel. Mixed into subclasses of a Keras
    optimizer, before the Keras class.
    """

    def _apply_weight_decay(self, variables):
        if keras.backend.backend() != "tensorflow":
            super()._apply_weight_decay(variables)
        # On TensorFlow: done in `_decay`, called from `update_step`.

    def _decay(self, variable, learning_rate):
        if keras.backend.backend() != "tensorflow":
            return  # Keras's own `_apply_weight_decay` ran.
        if not self.weight_decay or not self._use_weight_decay(variable):
            return
        var = _tf_variable(variable)
        scale = tf.cast(learning_rate, var.dtype) * tf.cast(self.weight_decay, var.dtype)
        var.assign_sub(var * scale)


@keras.saving.register_keras_serializable(package="keras_vit")
class FusedAdamW(_FusedWeightDecay, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose TensorFlow update is `ResourceApplyAdam` (same arguments).

    Update, per variable `w` with gradient `g` at step `t` (Keras's and TensorFlow's Adam):
    `w -= lr * wd * w`; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
    `w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)`.
    With `weight_decay=0` it is Adam.
    """

    def update_step(self, gradient, variable, learning_rate):
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
class FusedSGD(_FusedWeightDecay, keras.optimizers.SGD):
    """`keras.optimizers.SGD` whose TensorFlow update is one kernel (same arguments).

    Momentum: `ResourceApplyKerasMomentum` (`v = momentum v - lr g`; `w += v`, or with Nesterov
    `w += momentum v - lr g`), without momentum `ResourceApplyGradientDescent` (`w -= lr g`);
    the decoupled decay `w -= lr * wd * w` first, as Keras does.
    """

    def update_step(self, gradient, variable, learning_rate):
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
