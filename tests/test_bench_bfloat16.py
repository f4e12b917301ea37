"""The mixed_bfloat16 path that bench/model.py times computes the same ViT as the float32 one.

Truth: the independent float64 NumPy reference (tests/vit_reference.py). Under mixed_bfloat16
the matrix multiplies round their inputs to 8 mantissa bits (relative step 2^-8 ≈ 0.4%) while
LayerNorm, softmax and GELU run in float32 (keras_vit/layers.py), so the logits are held to 2e-2
relative (float32 is held to 1e-5 in test_checkpoints.py).
"""

import keras
import numpy as np
import pytest

import keras_vit
from vit_reference import forward, random_checkpoint, relative_error

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_bfloat16_logits_match_the_reference(tmp_path, mixed_bfloat16, pooling):
    arrays = random_checkpoint(**TINY, grid=4, pooling=pooling)
    path = tmp_path / "ckpt.npz"
    np.savez(path, **arrays)
    model = keras_vit.from_npz(str(path))
    assert model.get_layer("encoder").compute_dtype == "bfloat16"
    images = np.random.default_rng(1).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    expected = forward(arrays, images)
    error = relative_error(model(images), expected)
    assert error < 2e-2
    # And bfloat16 really is in use: float32 would agree to 1e-5.
    assert error > 1e-5
