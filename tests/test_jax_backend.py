"""The same model under KERAS_BACKEND=jax gives TensorFlow's logits (the layers use keras.ops only)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras_vit
from vit_reference import random_checkpoint, relative_error

pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")

_JAX_SCRIPT = """
import json, sys
import numpy as np
import keras
import keras_vit
assert keras.backend.backend() == "jax", keras.backend.backend()
checkpoint, images_path, output_path = sys.argv[1:4]
model = keras_vit.from_npz(checkpoint)
images = np.load(images_path)
np.save(output_path, np.asarray(model(images)))
attention = keras_vit.attention_model(model)(images)["attention"]
np.save(output_path + ".attention.npy", np.asarray(attention))
"""


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_jax_logits_equal_tensorflow_logits(tmp_path, pooling):
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, pooling=pooling, representation_size=16)
    checkpoint = str(tmp_path / "ckpt.npz")
    np.savez(checkpoint, **arrays)
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-c", _JAX_SCRIPT, checkpoint, str(tmp_path / "images.npy"),
         str(tmp_path / "jax.npy")],
        check=True, env=environment, timeout=300,
    )
    model = keras_vit.from_npz(checkpoint)
    tensorflow_logits = np.asarray(model(images), np.float64)
    assert relative_error(np.load(tmp_path / "jax.npy"), tensorflow_logits) < 1e-5
    tensorflow_attention = np.asarray(keras_vit.attention_model(model)(images)["attention"], np.float64)
    assert relative_error(np.load(tmp_path / "jax.npy.attention.npy"), tensorflow_attention) < 1e-5
