"""WarmupDecay against values computed by hand from the formulas of big_vision's schedule."""

import math

import keras
import numpy as np
import pytest

from keras_vit.training.schedules import WarmupDecay


def lr(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_cosine_with_warmup_hand_values():
    s = WarmupDecay(0.1, total_steps=110, warmup_steps=10, decay="cosine")
    assert lr(s, 0) == 0.0
    assert lr(s, 5) == pytest.approx(0.05)  # 0.1 * 5/10
    assert lr(s, 10) == pytest.approx(0.1)  # peak, progress 0
    # step 60: progress 0.5, 0.5 * (1 + cos(pi/2)) = 0.5
    assert lr(s, 60) == pytest.approx(0.05, abs=1e-7)
    # step 35: progress 0.25: 0.1 * 0.5 * (1 + cos(pi/4)) = 0.0853553...
    assert lr(s, 35) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-6)
    assert lr(s, 110) == pytest.approx(0.0, abs=1e-9)
    assert lr(s, 500) == pytest.approx(0.0, abs=1e-9)  # clipped after the end


def test_linear_decay_to_end_value():
    s = WarmupDecay(1.0, total_steps=20, warmup_steps=0, decay="linear", end_learning_rate=0.1)
    assert lr(s, 0) == pytest.approx(1.0)
    assert lr(s, 10) == pytest.approx(0.55)  # 0.1 + 0.9 * 0.5
    assert lr(s, 20) == pytest.approx(0.1)


def test_gradient_accumulation_counts_updates_not_micro_steps():
    s = WarmupDecay(0.1, total_steps=110, warmup_steps=10, decay="cosine", steps_per_update=4)
    # micro-steps 20..23 are update 5: halfway through warmup.
    assert [lr(s, step) for step in (20, 21, 23)] == pytest.approx([0.05] * 3)
    assert lr(s, 24) == pytest.approx(0.06)


def test_constant_and_serialization():
    s = WarmupDecay(0.5, total_steps=10, warmup_steps=2, decay="constant")
    assert [lr(s, i) for i in range(4)] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    clone = WarmupDecay.from_config(s.get_config())
    np.testing.assert_allclose([lr(clone, i) for i in range(10)], [lr(s, i) for i in range(10)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decay="step"), "decay must be one of"),
        (dict(warmup_steps=100), "warmup_steps must be in"),
        (dict(total_steps=0), "total_steps must be positive"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    args = dict(base_learning_rate=0.1, total_steps=100, warmup_steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        WarmupDecay(**args)
