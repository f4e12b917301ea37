"""create_model(dynamic_image_size=True): any multiple of the patch size at call time.

Truths: `posemb.resample` (scipy.ndimage.zoom) and the fixed-size model built with its
offline-resampled weights; the NumPy reference (tests/vit_reference.py) on those weights; the
fixed model at the built size (bit for bit); TensorFlow's logits under JAX.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit import posemb
from keras_vit.checkpoints import POSITION_EMBEDDING_KEY, model_arrays
from vit_reference import forward, random_checkpoint, relative_error

# (random_checkpoint options, the reference's forward options) for the token layouts whose
# position embedding covers the prefix tokens or not.
_LAYOUTS = {
    "token": (dict(pooling="token"), dict()),
    "gap_registers_patch_posemb": (
        dict(pooling="gap", num_registers=2, position_embedding_prefix=False),
        dict(pooling="gap", position_embedding_prefix=False)),
    "map_class_token": (dict(pooling="map", class_token=True), dict(pooling="map")),
}


def _checkpoint(tmp_path, layout):
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, **_LAYOUTS[layout][0])
    path = str(tmp_path / f"{layout}.npz")
    np.savez(path, **arrays)
    return arrays, path


def _images(height, width, batch=2, seed=3):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype(np.float32)


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_new_size_equals_offline_resampled_fixed_model_and_reference(tmp_path, layout):
    arrays, path = _checkpoint(tmp_path, layout)
    dynamic = keras_vit.from_npz(path, dynamic_image_size=True)
    assert dynamic.input_shape == (None, None, None, 3)
    for height, width in ((48, 64), (12, 20), (8, 8), (4, 28)):
        images = _images(height, width)
        fixed = keras_vit.from_npz(path, image_size=(height, width))
        expected = np.asarray(fixed(images), np.float64)
        assert relative_error(dynamic(images), expected) < 1e-5, (height, width)
        assert relative_error(dynamic.predict(images, verbose=0), expected) < 1e-5
        # The reference reads the scipy-resampled embedding directly: no keras_vit code.
        resampled = dict(arrays)
        num_prefix = fixed.get_layer("position_embedding").num_prefix_tokens
        resampled[POSITION_EMBEDDING_KEY] = posemb.resample(
            arrays[POSITION_EMBEDDING_KEY], (4, 4), (height // 4, width // 4), num_prefix)
        reference = forward(resampled, images.astype(np.float64), **_LAYOUTS[layout][1])
        assert relative_error(dynamic(images), reference) < 1e-5, (height, width)


def test_distilled_model_new_size_equals_fixed_model(tmp_path):
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, distillation_token=True, num_registers=1)
    path = str(tmp_path / "deit.npz")
    np.savez(path, **arrays)
    dynamic = keras_vit.from_npz(path, dynamic_image_size=True)
    images = _images(48, 64)
    fixed = keras_vit.from_npz(path, image_size=(48, 64))
    assert relative_error(dynamic(images), np.asarray(fixed(images), np.float64)) < 1e-5


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_built_size_is_the_fixed_model_exactly(tmp_path, layout):
    _, path = _checkpoint(tmp_path, layout)
    dynamic = keras_vit.from_npz(path, dynamic_image_size=True)
    fixed = keras_vit.from_npz(path)
    images = _images(16, 16, batch=3)
    np.testing.assert_array_equal(np.asarray(dynamic(images)), np.asarray(fixed(images)))
    np.testing.assert_array_equal(dynamic.predict(images, verbose=0),
                                  fixed.predict(images, verbose=0))


@pytest.mark.parametrize("old, new, prefix", [
    ((4, 4), (3, 5), 1), ((3, 5), (7, 2), 0), ((4, 4), (1, 6), 2), ((1, 3), (4, 4), 1),
    ((5, 5), (12, 9), 1), ((2, 2), (2, 2), 3)])
def test_in_graph_resample_equals_scipy_resample(old, new, prefix):
    embedding = np.random.default_rng(0).standard_normal(
        (1, prefix + old[0] * old[1], 8)).astype(np.float32)
    expected = posemb.resample(embedding, old, new, prefix)
    actual = np.asarray(posemb.resample_ops(embedding, old, new, prefix))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # Symbolic sides (a graph traced for any size) give the same numbers.
    traced = tf.function(lambda h, w: posemb.resample_ops(embedding, old, (h, w), prefix))
    np.testing.assert_allclose(traced(tf.constant(new[0]), tf.constant(new[1])), expected,
                               rtol=1e-5, atol=1e-6)


def test_in_graph_resample_at_the_same_grid_is_an_exact_identity():
    embedding = np.random.default_rng(1).standard_normal((1, 1 + 3 * 5, 8)).astype(np.float32)
    traced = tf.function(lambda h, w: posemb.resample_ops(embedding, (3, 5), (h, w), 1))
    np.testing.assert_array_equal(traced(tf.constant(3), tf.constant(5)), embedding)


def test_sizes_not_divisible_by_the_patch_are_refused(tmp_path):
    _, path = _checkpoint(tmp_path, "token")
    dynamic = keras_vit.from_npz(path, dynamic_image_size=True)
    for height, width in ((13, 16), (16, 18), (2, 16)):
        with pytest.raises(ValueError, match="multiples of the patch size 4"):
            dynamic(_images(height, width))
    # A graph traced for any size (as a serving export is) asserts it when it runs.
    serve = tf.function(dynamic, input_signature=[tf.TensorSpec((None, None, None, 3))])
    assert serve(_images(12, 20)).shape == (2, 7)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of the patch size 4"):
        serve(_images(13, 16))


def test_create_model_and_save_load_keep_it(tmp_path):
    config = keras_vit.ViTConfig(4, 32, 2, 4, 64)
    model = keras_vit.create_model(config, image_size=(16, 24), num_classes=5,
                                   dynamic_image_size=True)
    assert model.input_shape == (None, None, None, 3)
    assert model.get_layer("position_embedding").grid_size == (4, 6)
    images = _images(20, 12)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.input_shape == (None, None, None, 3)
    np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(model(images)))
    # create_model(weights=...) passes it on to from_checkpoint.
    _, checkpoint = _checkpoint(tmp_path, "token")
    pretrained = keras_vit.create_model(config, weights=checkpoint, dynamic_image_size=True)
    assert pretrained.input_shape == (None, None, None, 3)
    loaded_directly = keras_vit.from_npz(checkpoint, dynamic_image_size=True)
    np.testing.assert_array_equal(np.asarray(pretrained(images)),
                                  np.asarray(loaded_directly(images)))


def test_not_an_architecture_option(tmp_path):
    """The weights and the options save_npz writes are the fixed model's."""
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, pooling="gap", class_token=True,
                               position_embedding_prefix=False)
    arrays[keras_vit.checkpoints.OPTIONS_KEY] = np.frombuffer(
        b'{"position_embedding_prefix": false, "pooling": "gap"}', np.uint8)
    path = str(tmp_path / "gap.npz")
    np.savez(path, **arrays)
    dynamic = keras_vit.from_checkpoint(path, dynamic_image_size=True)
    saved = str(tmp_path / "saved.npz")
    keras_vit.save_npz(dynamic, saved)
    fixed_saved = str(tmp_path / "fixed.npz")
    keras_vit.save_npz(keras_vit.from_npz(path), fixed_saved)
    with np.load(saved) as a, np.load(fixed_saved) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    reloaded = keras_vit.from_npz(saved)
    assert reloaded.input_shape == (None, 16, 16, 3)
    for key, value in model_arrays(reloaded).items():
        np.testing.assert_array_equal(value, model_arrays(dynamic)[key])


_JAX_SCRIPT = """
import sys
import numpy as np
import keras
import keras_vit
assert keras.backend.backend() == "jax", keras.backend.backend()
checkpoint, folder = sys.argv[1:3]
model = keras_vit.from_npz(checkpoint, dynamic_image_size=True)
for name in ("16x16", "48x64", "12x20"):
    images = np.load(f"{folder}/{name}.npy")
    np.save(f"{folder}/{name}.jax.npy", np.asarray(model(images)))
try:
    model(np.zeros((1, 13, 16, 3), np.float32))
except ValueError as error:
    print("refused:", "multiples of the patch size" in str(error))
"""


def test_jax_backend_gives_tensorflow_logits(tmp_path):
    pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")
    _, path = _checkpoint(tmp_path, "token")
    model = keras_vit.from_npz(path, dynamic_image_size=True)
    expected = {}
    for height, width in ((16, 16), (48, 64), (12, 20)):
        name = f"{height}x{width}"
        images = _images(height, width)
        np.save(tmp_path / f"{name}.npy", images)
        expected[name] = np.asarray(model(images), np.float64)
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _JAX_SCRIPT, path, str(tmp_path)],
                            env=environment, check=True, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "refused: True" in result.stdout
    for name, logits in expected.items():
        assert relative_error(np.load(tmp_path / f"{name}.jax.npy"), logits) < 1e-5, name
