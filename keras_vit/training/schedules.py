"""Learning-rate schedules of the paper: linear warmup, then cosine or linear decay.

The shape is big_vision's `create_learning_rate_schedule` (the code behind the paper's
Appendix B.1): with `u` the number of optimizer updates done so far,

    warmup  = min(1, u / warmup_steps)                          (1 when warmup_steps == 0)
    p       = clip((u - warmup_steps) / (total_steps - warmup_steps), 0, 1)
    cosine: lr = base * warmup * (end + (1 - end) * 0.5 * (1 + cos(pi * p)))
    linear: lr = base * warmup * (end + (1 - end) * (1 - p))
    constant: lr = base * warmup

where `end = end_learning_rate / base`. Keras evaluates a schedule at the optimizer's *micro*
step counter, which with gradient accumulation advances k times per update; the schedule divides
it by `steps_per_update` so `warmup_steps` and `total_steps` always count updates.
"""

import math

import keras
from keras import ops

DECAYS = ("cosine", "linear", "constant")


@keras.saving.register_keras_serializable(package="keras_vit")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup followed by cosine, linear or no decay.

    Args:
        base_learning_rate: peak learning rate, reached after `warmup_steps` updates.
        total_steps: optimizer updates of the whole run (the decay ends there).
        warmup_steps: updates of linear warmup from 0; must be < total_steps (or 0).
        decay: "cosine", "linear" or "constant".
        end_learning_rate: value reached at `total_steps` (the paper decays to 0).
        steps_per_update: micro-steps per optimizer update (the gradient accumulation steps).

    Raises:
        ValueError: an unknown `decay`, `total_steps` <= 0, `warmup_steps` outside
            [0, total_steps), or `steps_per_update` < 1.
    """

    def __init__(self, base_learning_rate, total_steps, warmup_steps=0, decay="cosine",
                 end_learning_rate=0.0, steps_per_update=1):
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}.")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}."
            )
        if steps_per_update < 1:
            raise ValueError(f"steps_per_update must be >= 1, got {steps_per_update}.")
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.end_learning_rate = float(end_learning_rate)
        self.steps_per_update = int(steps_per_update)

    def __call__(self, step):
        """The learning rate at micro-step `step` (the optimizer's iteration counter), a float32
        scalar tensor."""
        update = ops.floor_divide(ops.cast(step, "int64"), self.steps_per_update)
        update = ops.cast(update, "float32")
        multiplier = 1.0
        if self.warmup_steps:
            multiplier = ops.minimum(1.0, update / self.warmup_steps)
        progress = ops.clip(
            (update - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0
        )
        end = self.end_learning_rate / self.base_learning_rate if self.base_learning_rate else 0.0
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = ops.ones_like(progress)
        if self.decay != "constant":
            shape = end + (1.0 - end) * shape
        return self.base_learning_rate * multiplier * shape

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "end_learning_rate": self.end_learning_rate,
            "steps_per_update": self.steps_per_update,
        }
