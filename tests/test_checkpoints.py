"""keras_vit.from_npz / save_npz against Google's checkpoint layout and a NumPy forward pass."""

import numpy as np
import pytest

import keras_vit
from pipelines.errors import MissingFileError, UserError
from vit_reference import forward, random_checkpoint, random_images, relative_error

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


def _write(tmp_path, arrays, name="ckpt.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _images(batch, size, seed=1):
    return random_images(batch, size, seed)


@pytest.mark.parametrize(
    "pooling, representation_size", [("token", None), ("token", 24), ("gap", None)]
)
def test_logits_match_numpy_reference(tmp_path, pooling, representation_size):
    arrays = random_checkpoint(**TINY, grid=4, pooling=pooling, representation_size=representation_size)
    model = keras_vit.from_npz(_write(tmp_path, arrays))
    images = _images(3, 16)
    assert model.input_shape == (None, 16, 16, 3)
    assert relative_error(model(images), forward(arrays, images)) < 1e-5


def test_attention_model_matches_reference_attention(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4)
    model = keras_vit.from_npz(_write(tmp_path, arrays))
    images = _images(2, 16)
    expected_logits, expected_attention = forward(arrays, images, return_attention=True)
    outputs = keras_vit.attention_model(model)(images)
    assert outputs["attention"].shape == (2, 2, 4, 17, 17)
    assert relative_error(outputs["attention"], expected_attention) < 1e-5
    assert relative_error(outputs["logits"], expected_logits) < 1e-5


def test_architecture_is_read_from_shapes(tmp_path):
    arrays = random_checkpoint(patch_size=2, hidden_size=24, num_layers=3, num_heads=2,
                               mlp_dim=40, grid=3, num_classes=5, representation_size=12)
    model = keras_vit.from_npz(_write(tmp_path, arrays))
    encoder = model.get_layer("encoder")
    assert model.input_shape == (None, 6, 6, 3)
    assert model.output_shape == (None, 5)
    assert encoder.num_layers == 3 and encoder.num_heads == 2 and encoder.mlp_dim == 40
    assert model.get_layer("pre_logits").units == 12


def test_save_npz_round_trip_is_exact(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4, representation_size=16)
    model = keras_vit.from_npz(_write(tmp_path, arrays))
    saved = keras_vit.save_npz(model, str(tmp_path / "again.npz"))
    with np.load(saved) as written:
        assert sorted(written.files) == sorted(arrays)
        for key in arrays:
            np.testing.assert_array_equal(written[key], arrays[key], err_msg=key)
    images = _images(2, 16)
    np.testing.assert_array_equal(keras_vit.from_npz(saved)(images), model(images))


def test_new_resolution_resamples_position_grid(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4)
    model = keras_vit.from_npz(_write(tmp_path, arrays), image_size=24)
    layer = model.get_layer("position_embedding")
    assert layer.grid_size == (6, 6)
    expected = keras_vit.resample_position_embedding(
        arrays["Transformer/posembed_input/pos_embedding"], (4, 4), (6, 6), 1)
    np.testing.assert_allclose(layer.embedding.numpy(), expected, rtol=0, atol=0)
    # The class-token position is not touched.
    np.testing.assert_array_equal(
        layer.embedding.numpy()[0, 0], arrays["Transformer/posembed_input/pos_embedding"][0, 0])
    # And the model at the new size computes what the reference computes with those embeddings.
    resampled = dict(arrays)
    resampled["Transformer/posembed_input/pos_embedding"] = expected
    images = _images(2, 24)
    assert relative_error(model(images), forward(resampled, images)) < 1e-5


def test_new_head_is_zero_and_drops_pre_logits(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4, num_classes=7, representation_size=16)
    model = keras_vit.from_npz(_write(tmp_path, arrays), num_classes=3, image_size=32)
    head = model.get_layer("head")
    assert head.kernel.shape == (32, 3)
    assert not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    assert "pre_logits" not in [layer.name for layer in model.layers]
    np.testing.assert_array_equal(model(_images(2, 32)), np.zeros((2, 3)))
    # The body still holds the checkpoint.
    np.testing.assert_array_equal(
        model.get_layer("class_token").token.numpy(), arrays["cls"])


def test_include_top_false_gives_checkpoint_features(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4)
    model = keras_vit.from_npz(_write(tmp_path, arrays), include_top=False)
    assert model.output_shape == (None, 32)


def test_missing_key_is_listed(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4)
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    with pytest.raises(keras_vit.CheckpointError, match=r"missing keys.*encoderblock_1/MlpBlock_3/Dense_1/bias"):
        keras_vit.from_npz(_write(tmp_path, arrays))


def test_wrong_shape_names_key_expected_and_found(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4)
    arrays["Transformer/encoderblock_0/LayerNorm_2/bias"] = np.zeros(31, np.float32)
    with pytest.raises(keras_vit.CheckpointError) as error:
        keras_vit.from_npz(_write(tmp_path, arrays))
    assert "encoderblock_0/LayerNorm_2/bias: expected (32,), found (31,)" in str(error.value)


def test_unexpected_key_is_listed(tmp_path):
    arrays = random_checkpoint(**TINY, grid=4)
    arrays["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(keras_vit.CheckpointError, match="unexpected keys.*extra/kernel"):
        keras_vit.from_npz(_write(tmp_path, arrays))


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("this is not a zip archive")
    with pytest.raises(keras_vit.CheckpointError, match="notes.npz is not a readable .npz"):
        keras_vit.from_npz(str(text))
    with pytest.raises(keras_vit.CheckpointError, match="does not exist") as missing:
        keras_vit.from_npz(str(tmp_path / "absent.npz"))
    # A user's error (the command line prints it as one line), and a missing file.
    assert isinstance(missing.value, UserError)
    assert isinstance(missing.value, MissingFileError) and isinstance(missing.value, FileNotFoundError)
    other = _write(tmp_path, {"weights": np.zeros(3)}, "other.npz")
    with pytest.raises(keras_vit.CheckpointError, match="missing.*embedding/kernel"):
        keras_vit.from_npz(other)
    single = tmp_path / "single.npz"
    with open(single, "wb") as stream:
        np.save(stream, np.zeros(3, np.float32))  # np.save's .npy layout, under an .npz name
    with pytest.raises(keras_vit.CheckpointError, match="single.npz holds a single array"):
        keras_vit.from_npz(str(single))


def test_unknown_override_is_refused(tmp_path):
    path = _write(tmp_path, random_checkpoint(**TINY, grid=4))
    with pytest.raises(TypeError, match="hidden_size"):
        keras_vit.from_npz(path, hidden_size=64)
