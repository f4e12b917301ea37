"""The same model under KERAS_BACKEND=jax gives TensorFlow's logits (the layers use keras.ops only)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_vit
from vit_reference import forward, random_checkpoint, relative_error

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


# The options other projects' checkpoints need, in the checkpoint's canonical layout.
_LAYOUTS = {
    "token": dict(pooling="token", representation_size=16),
    "gap": dict(pooling="gap", representation_size=16),
    "map_registers_layer_scale": dict(pooling="map", class_token=True, num_registers=2,
                                      layer_scale=True),
    "deit_distilled": dict(distillation_token=True),
    "gap_fc_norm_patch_posemb": dict(pooling="gap", class_token=True, norm_after_pooling=True,
                                     num_registers=1, position_embedding_prefix=False),
    "exact_gelu_imagenet_normalisation": dict(),  # with _OPTIONS below, stored in the npz
}
# The options the arrays cannot say, as save_npz stores them in the file.
_OPTIONS = {"exact_gelu_imagenet_normalisation": dict(
    approximate_gelu=False, layer_norm_epsilon=1e-12, input_mean=[0.485, 0.456, 0.406],
    input_std=[0.229, 0.224, 0.225])}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_jax_logits_equal_tensorflow_logits(tmp_path, layout):
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, **_LAYOUTS[layout])
    if layout in _OPTIONS:
        arrays[keras_vit.checkpoints.OPTIONS_KEY] = np.frombuffer(
            json.dumps(_OPTIONS[layout]).encode(), np.uint8)
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
    if layout in _OPTIONS:  # the options reached the model: the reference agrees
        weights = {k: v for k, v in arrays.items() if k != keras_vit.checkpoints.OPTIONS_KEY}
        expected = forward(weights, images, **_OPTIONS[layout])
        assert relative_error(tensorflow_logits, expected) < 1e-5
    tensorflow_attention = np.asarray(keras_vit.attention_model(model)(images)["attention"], np.float64)
    assert relative_error(np.load(tmp_path / "jax.npy.attention.npy"), tensorflow_attention) < 1e-5
