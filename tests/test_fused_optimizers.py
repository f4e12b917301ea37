"""FusedAdamW / FusedSGD: the same steps as Keras's AdamW / SGD, through TensorFlow's fused kernels.

Tolerance: atol 1e-5 after 5 steps of 0.01 to 0.1. TensorFlow's Adam kernel forms 1 - beta_2 in
float32 (0.00099998713 for 0.999; Keras uses 0.001), so its second moment, and with it each Adam
step, differs from Keras's by ~1e-5 relative; SGD differs by float32 rounding only. A wrong
formula is off by a whole step, 1e-2 or more.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vit.training.fused_optimizers import FusedAdamW, FusedSGD

SHAPES = [(6, 5), (5,), (3, 4, 2)]


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.standard_normal(s).astype(np.float32), name=f"w{i}")
            for i, s in enumerate(SHAPES)]


def _gradients(step):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _run(optimizer, steps=5, exclude_first=False):
    variables = _variables()
    if exclude_first:
        optimizer.exclude_from_weight_decay(var_list=[variables[0]])

    @tf.function
    def apply(grads):
        optimizer.apply(grads, variables)

    for step in range(steps):
        apply(_gradients(step))
    return [v.numpy() for v in variables]


def _schedule():
    return keras.optimizers.schedules.CosineDecay(0.05, decay_steps=10, warmup_target=0.1,
                                                  warmup_steps=2)


ADAM_SETTINGS = [
    dict(learning_rate=0.01, weight_decay=0.0),
    dict(learning_rate=0.01, weight_decay=0.3, beta_1=0.8, beta_2=0.95, epsilon=1e-6),
    dict(weight_decay=0.1, global_clipnorm=0.5),
    dict(weight_decay=0.1, gradient_accumulation_steps=2),
]


@pytest.mark.parametrize("settings", ADAM_SETTINGS, ids=["adam", "adamw", "clip", "accumulate"])
@pytest.mark.parametrize("exclude_first", [False, True])
def test_fused_adamw_takes_keras_adamw_steps(settings, exclude_first):
    settings = dict(settings)
    settings.setdefault("learning_rate", _schedule())
    expected = _run(keras.optimizers.AdamW(**settings), exclude_first=exclude_first)
    fused = _run(FusedAdamW(**settings), exclude_first=exclude_first)
    initial = [v.numpy() for v in _variables()]
    for got, want, start in zip(fused, expected, initial):
        assert not np.allclose(want, start)  # the steps moved the variables
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [None, 0.2])
def test_fused_sgd_takes_keras_sgd_steps(momentum, nesterov, weight_decay):
    settings = dict(learning_rate=0.05, momentum=momentum, nesterov=nesterov,
                    weight_decay=weight_decay)
    expected = _run(keras.optimizers.SGD(**settings), exclude_first=weight_decay is not None)
    fused = _run(FusedSGD(**settings), exclude_first=weight_decay is not None)
    for got, want in zip(fused, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_adam_step_by_hand():
    """One step from m = v = 0 is w -= lr * g / (|g| + eps) after the decay (bias-corrected)."""
    variable = keras.Variable(np.array([1.0, -2.0, 0.5], np.float32))
    gradient = np.array([0.5, 0.25, -4.0], np.float32)
    optimizer = FusedAdamW(learning_rate=0.1, weight_decay=0.5, epsilon=1e-7)
    tf.function(lambda: optimizer.apply([gradient], [variable]))()
    start = np.array([1.0, -2.0, 0.5])
    expected = start * (1 - 0.1 * 0.5) - 0.1 * gradient / (np.abs(gradient) + 1e-7)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("optimizer,kernel", [
    (lambda: FusedAdamW(learning_rate=0.1, weight_decay=0.1), "ResourceApplyAdam"),
    (lambda: FusedSGD(learning_rate=0.1, momentum=0.9), "ResourceApplyKerasMomentum"),
    (lambda: FusedSGD(learning_rate=0.1), "ResourceApplyGradientDescent"),
])
def test_updates_run_as_one_fused_kernel_per_variable(optimizer, kernel):
    variables = _variables()
    optimizer = optimizer()
    optimizer.build(variables)
    graph = tf.function(lambda g: optimizer.apply(g, variables)).get_concrete_function(
        [tf.TensorSpec(s, tf.float32) for s in SHAPES]).graph
    op_types = [op.type for op in graph.get_operations()]
    assert op_types.count(kernel) == len(SHAPES)


def test_round_trips_through_keras_serialization():
    optimizer = FusedAdamW(learning_rate=0.01, weight_decay=0.3, beta_2=0.95)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is FusedAdamW
    assert (restored.weight_decay, restored.beta_2) == (0.3, 0.95)


_JAX_SCRIPT = """
import numpy as np
import keras
from keras_vit.training.fused_optimizers import FusedAdamW, FusedSGD
assert keras.backend.backend() == "jax", keras.backend.backend()
for fused, plain in [(FusedAdamW, keras.optimizers.AdamW), (FusedSGD, keras.optimizers.SGD)]:
    results = []
    for cls in (fused, plain):
        variables = [keras.Variable(np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4)),
                     keras.Variable(np.ones(4, "float32"))]
        optimizer = cls(learning_rate=0.1, weight_decay=0.5)
        optimizer.exclude_from_weight_decay(var_list=[variables[1]])
        for step in range(3):
            optimizer.apply([np.full((3, 4), 0.1 * step, "float32"), np.full(4, -0.2, "float32")],
                            variables)
        results.append([np.asarray(v) for v in variables])
    for a, b in zip(*results):
        assert np.array_equal(a, b), (cls, a, b)
    assert not np.allclose(results[0][0], np.linspace(-1, 1, 12).reshape(3, 4))
print("ok")
"""


def test_other_backends_take_keras_updates_unchanged():
    """Under JAX the classes are Keras's AdamW / SGD exactly (decay applied once, not twice)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], env=environment, timeout=300,
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_layer_decay_and_ema_keep_one_fused_kernel_per_variable():
    """Per-variable learning-rate factors are a scalar multiply: the update stays one kernel."""
    variables = _variables()
    optimizer = FusedAdamW(learning_rate=0.1, weight_decay=0.1, use_ema=True, ema_momentum=0.9,
                           learning_rate_multipliers={v.path: 0.5 ** i
                                                      for i, v in enumerate(variables)})
    optimizer.build(variables)
    graph = tf.function(lambda g: optimizer.apply(g, variables)).get_concrete_function(
        [tf.TensorSpec(s, tf.float32) for s in SHAPES]).graph
    assert [op.type for op in graph.get_operations()].count("ResourceApplyAdam") == len(SHAPES)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert restored.learning_rate_multipliers == optimizer.learning_rate_multipliers
