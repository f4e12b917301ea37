"""FlexiViT's PI-resize of the patch embedding (keras_vit.flexi) and from_checkpoint(patch_size=).

Truths: the paper's property <resize(x), ŵ> = <x, w> for upsampling, with resize =
tf.image.resize (bilinear), not keras_vit's resize matrix; a NumPy port of big_vision's
`resample_patchemb` (google-research/big_vision, big_vision/models/proj/flexi/vit.py: basis
vectors through tf.image.resize, pinv of the transposed matrix, one kernel slice at a time);
the checkpoint's own model on the original images.
"""

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

import keras_vit
from keras_vit import flexi
from vit_reference import random_checkpoint, relative_error


def _kernel(patch, channels=3, width=5, seed=0, rows=None):
    return np.random.default_rng(seed).standard_normal(
        (rows or patch, patch, channels, width)).astype(np.float32)


def _tf_resize(x, size):
    """(h, w, C) -> size, bilinear, as big_vision's input pipeline and resample_patchemb."""
    return tf.image.resize(np.asarray(x, np.float64)[None], size, method="bilinear")[0].numpy()


def _big_vision_resample_patchemb(old, new_hw):
    """A NumPy port of big_vision's resample_patchemb, loop for its jax.vmap."""
    if tuple(old.shape[:2]) == tuple(new_hw):
        return old

    def resize(x_np, new_shape):
        return tf.image.resize(tf.constant(x_np)[None, ..., None], new_shape,
                               method="bilinear")[0, ..., 0].numpy()

    mat = []
    for i in range(np.prod(old.shape[:2])):
        basis_vec = np.zeros(old.shape[:2])
        basis_vec[np.unravel_index(i, old.shape[:2])] = 1.0
        mat.append(resize(basis_vec, new_hw).reshape(-1))
    resize_mat_pinv = np.linalg.pinv(np.stack(mat).T.T)
    out = np.empty((*new_hw, *old.shape[2:]))
    for c in range(old.shape[2]):
        for d in range(old.shape[3]):
            out[:, :, c, d] = (resize_mat_pinv @ old[:, :, c, d].reshape(-1)).reshape(new_hw)
    return out


@pytest.mark.parametrize("old, new", [(4, 8), (4, 6), (4, 5), (2, 7), (4, (6, 8)), (3, 16)])
def test_pi_resize_property_for_upsampling(old, new):
    kernel = _kernel(old)
    resized = flexi.resample_patch_embedding(kernel, new)
    new_hw = (new, new) if isinstance(new, int) else new
    assert resized.shape == (*new_hw, 3, 5) and resized.dtype == np.float32
    for seed in range(3):
        patch = np.random.default_rng(10 + seed).uniform(-1, 1, (old, old, 3))
        original = np.einsum("hwc,hwcd->d", patch, kernel.astype(np.float64))
        upsampled = np.einsum("hwc,hwcd->d", _tf_resize(patch, new_hw), resized.astype(np.float64))
        np.testing.assert_allclose(upsampled, original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("old, new", [(4, 8), (4, 6), (8, 4), (6, 4), (5, 3), (3, 5)])
def test_equals_big_vision_resample_patchemb(old, new):
    kernel = _kernel(old, seed=old + new)
    expected = _big_vision_resample_patchemb(kernel, (new, new))
    np.testing.assert_allclose(flexi.resample_patch_embedding(kernel, new), expected,
                               rtol=1e-4, atol=1e-5)


def test_resize_matrix_is_tf_image_resize():
    for old, new in ((4, 8), (8, 4), (3, 5), (4, 4)):
        matrix = flexi.resize_matrix((old, old + 1), (new, new + 2))
        patch = np.random.default_rng(old * new).standard_normal((old, old + 1))
        np.testing.assert_allclose((matrix @ patch.reshape(-1)).reshape(new, new + 2),
                                   _tf_resize(patch[..., None], (new, new + 2))[..., 0],
                                   rtol=1e-5, atol=1e-6)


def test_same_size_and_errors():
    kernel = _kernel(4)
    np.testing.assert_array_equal(flexi.resample_patch_embedding(kernel, 4), kernel)
    with pytest.raises(ValueError, match=r"kernel \(P, P, C, D\)"):
        flexi.resample_patch_embedding(kernel[0], 8)
    for bad in (0, 2.5, (4, 4, 4), "8"):
        with pytest.raises(ValueError, match="new_patch_size"):
            flexi.resample_patch_embedding(kernel, bad)


def _patchwise_upsample(images, old, new):
    """Each old×old patch resized to new×new on its own: what the PI-resize inverts exactly."""
    b, h, w, c = images.shape
    out = np.empty((b, h // old * new, w // old * new, c), np.float32)
    for i in range(h // old):
        for j in range(w // old):
            patch = images[:, i * old:(i + 1) * old, j * old:(j + 1) * old]
            out[:, i * new:(i + 1) * new, j * new:(j + 1) * new] = tf.image.resize(
                patch, (new, new), method="bilinear").numpy()
    return out


def _smooth_images(seed, batch=3, size=16, sigma=2.0):
    """Pixels in [0, 255] with a natural image's local smoothness: Gaussian-blurred noise."""
    noise = np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3))
    blurred = scipy.ndimage.gaussian_filter(noise, (0, sigma, sigma, 0))
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    return (255 * blurred).astype(np.float32)


def test_from_checkpoint_at_a_larger_patch_size(tmp_path):
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4)
    path = str(tmp_path / "p4.npz")
    np.savez(path, **arrays)
    original = keras_vit.from_checkpoint(path)
    images = _smooth_images(seed=5)
    expected = np.asarray(original(images), np.float64)

    # Same grid (4x4) at patch 8 on 32x32 images: the position embedding is unchanged.
    model = keras_vit.from_checkpoint(path, patch_size=8, image_size=32)
    assert model.get_layer("patch_embedding").patch_size == 8
    assert model.get_layer("position_embedding").grid_size == (4, 4)
    np.testing.assert_array_equal(
        model.get_layer("patch_embedding").projection.kernel.numpy(),
        flexi.resample_patch_embedding(arrays["embedding/kernel"], 8))
    # Exact where the paper says: every patch upsampled on its own.
    assert relative_error(model(_patchwise_upsample(images, 4, 8)), expected) < 1e-5
    # A whole-image bilinear upsample mixes neighbouring patches at their borders: close,
    # not equal. Measured on these random weights, max |error| / max |logit|: 0.017-0.031
    # for images as smooth as these (5 seeds), 0.11-0.21 for white noise.
    whole = tf.image.resize(images, (32, 32), method="bilinear").numpy()
    error = relative_error(model(whole), expected)
    assert error < 0.05, error
    unrelated = keras_vit.from_checkpoint(path, patch_size=8, image_size=32)
    unrelated.get_layer("patch_embedding").projection.kernel.assign(
        np.random.default_rng(9).standard_normal((8, 8, 3, 32)).astype(np.float32) * 0.025)
    assert relative_error(unrelated(whole), expected) > 3 * error

    # Default image size: the checkpoint's 16 pixels, so a 2x2 grid, the embedding resampled.
    small = keras_vit.from_checkpoint(path, patch_size=8)
    assert small.input_shape == (None, 16, 16, 3)
    assert small.get_layer("position_embedding").grid_size == (2, 2)
    np.testing.assert_allclose(
        small.get_layer("position_embedding").embedding.numpy(),
        keras_vit.resample_position_embedding(
            arrays["Transformer/posembed_input/pos_embedding"], (4, 4), (2, 2)))
    # And with dynamic_image_size too.
    dynamic = keras_vit.from_checkpoint(path, patch_size=8, image_size=32,
                                        dynamic_image_size=True)
    assert relative_error(dynamic(_patchwise_upsample(images, 4, 8)), expected) < 1e-5


def test_from_checkpoint_patch_size_errors(tmp_path):
    path = str(tmp_path / "p4.npz")
    np.savez(path, **random_checkpoint(4, 32, 1, 4, 64, grid=4))
    with pytest.raises(ValueError, match="no multiple of patch_size 6"):
        keras_vit.from_checkpoint(path, patch_size=6)
    with pytest.raises(ValueError, match="positive int"):
        keras_vit.from_checkpoint(path, patch_size=0)
