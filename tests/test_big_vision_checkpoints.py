"""keras_vit.formats.big_vision against files written as google-research/big_vision writes them.

Truth: tests/big_vision_layout.py, a port of big_vision's naming and saving
(google-research/big_vision `big_vision/models/vit.py`, `big_vision/utils.py`), for the
layout; tests/vit_reference.py, an independent float64 NumPy ViT, for the logits. The prefixes
and the scanned layout are also those huggingface/pytorch-image-models
`timm/models/vision_transformer.py` `_load_weights` reads.
"""

import numpy as np
import pytest

import keras_vit
from big_vision_layout import bfloat16_rounded, posemb_sincos_2d, to_big_vision, write_big_vision
from keras_vit.checkpoints import CheckpointError, load_npz
from keras_vit.formats.big_vision import convert_big_vision, is_big_vision, read_big_vision
from vit_reference import (assert_same_arrays, forward, random_checkpoint, random_images,
                            relative_error)

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
POSEMB = "Transformer/posembed_input/pos_embedding"
BIG_VISION_OPTIONS = dict(approximate_gelu=True, layer_norm_epsilon=1e-6,
                          input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5),
                          position_embedding_prefix=False)
POOLINGS = {"token": "tok", "gap": "gap", "map": "map"}  # keras_vit's name: big_vision's

def _canonical(pooling="token", **kwargs):
    # big_vision's pos_embedding covers the patches only (vit.py: added before cls).
    return random_checkpoint(**TINY, grid=4, pooling=pooling, position_embedding_prefix=False,
                             **kwargs)


def _images(batch=2, size=16, seed=1):
    return random_images(batch, size, seed)


@pytest.mark.parametrize("pooling", ["token", "gap", "map"])
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("prefix", ["params/", "params/img/", "opt/target/", ""])
def test_layouts_read_back_exactly(tmp_path, pooling, scan, prefix):
    arrays = _canonical(pooling, representation_size=24 if pooling == "gap" else None)
    path = write_big_vision(tmp_path / "bv.npz", arrays, prefix=prefix, scan=scan)
    stored = load_npz(path)
    assert is_big_vision(stored)
    converted = convert_big_vision(stored, path)
    assert_same_arrays(converted.arrays, arrays)
    assert converted.format == "big_vision" and converted.source == path
    assert converted.options == {**BIG_VISION_OPTIONS, "pooling": pooling, "image_size": 16}


def test_writer_uses_big_vision_names():
    stored = to_big_vision(_canonical("map"), prefix="params/", scan=True)
    assert "params/pos_embedding" in stored and "params/cls" not in stored
    assert stored["params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
                  ].shape == (2, 32, 4, 8)
    assert "params/Transformer/encoderblock/LayerNorm_1/scale" in stored
    assert "params/Transformer/encoderblock/MlpBlock_0/Dense_1/bias" in stored
    assert "params/MAPHead_0/MlpBlock_0/Dense_0/kernel" in stored


@pytest.mark.parametrize("scan", [False, True])
def test_bfloat16_is_read_as_its_float32_values(tmp_path, scan):
    arrays = _canonical("token")
    path = write_big_vision(tmp_path / "bf16.npz", arrays, bfloat16=True, scan=scan)
    stored = load_npz(path)
    assert stored["params/embedding/kernel"].dtype == np.dtype("V2")  # as np.savez stores it
    assert_same_arrays(read_big_vision(path).arrays, bfloat16_rounded(arrays))


def test_subtrees_beside_the_model_are_ignored():
    """A trainer checkpoint also holds the optimizer state; a two-tower one the text tower."""
    arrays = _canonical("map")
    stored = to_big_vision(arrays, prefix="params/img/")
    stored["params/txt/Encoder_0/encoder_norm/scale"] = np.ones(8, np.float32)
    stored["params/t"] = np.ones(1, np.float32)
    stored["opt/1/0/mu/img/embedding/kernel"] = np.zeros((4, 4, 3, 32), np.float32)
    assert_same_arrays(convert_big_vision(stored, "siglip.npz").arrays, arrays)


def test_sincos_position_embedding_is_computed_for_image_size(tmp_path):
    arrays = _canonical("gap")
    path = write_big_vision(tmp_path / "sincos.npz", arrays, posemb="sincos2d")
    with pytest.raises(CheckpointError, match="image_size"):
        read_big_vision(path)
    converted = read_big_vision(path, image_size=(24, 16))
    expected = {**arrays, POSEMB: posemb_sincos_2d(6, 4, 32)}
    np.testing.assert_allclose(converted.arrays[POSEMB], expected[POSEMB], rtol=0, atol=1e-6)
    converted.arrays[POSEMB] = expected[POSEMB]
    assert_same_arrays(converted.arrays, expected)
    assert converted.options["image_size"] == (24, 16)


def test_old_position_embedding_with_class_position_is_folded_into_cls():
    """vit.fix_old_checkpoints: a posemb of 1 + N positions; also Google's under opt/target."""
    arrays = random_checkpoint(**TINY, grid=4, position_embedding_prefix=True)
    stored = {"opt/target/" + key: value for key, value in arrays.items()}
    assert is_big_vision(stored)
    converted = convert_big_vision(stored, "old.npz")
    position = arrays[POSEMB]
    expected = {**arrays, "cls": arrays["cls"] + position[:, :1], POSEMB: position[:, 1:]}
    assert_same_arrays(converted.arrays, expected)
    assert converted.options["position_embedding_prefix"] is False


def test_inlined_map_head_and_old_posemb_location():
    """vit.fix_old_checkpoints: "MAP-head variants during ViT-G development had it inlined"."""
    arrays = _canonical("map")
    stored = to_big_vision(arrays, prefix="")
    stored["Transformer/pos_embedding"] = stored.pop("pos_embedding")
    for key in [k for k in stored if k.startswith("MAPHead_0/")]:
        stored[key[len("MAPHead_0/"):]] = stored.pop(key)
    assert is_big_vision(stored)
    assert_same_arrays(convert_big_vision(stored, "vit_g.npz").arrays, arrays)


def test_very_old_position_embedding_location_with_linen_names():
    """vit.fix_old_checkpoints: "Original ViT paper variant had posemb in a module"."""
    arrays = _canonical("gap")
    stored = to_big_vision(arrays, prefix="")
    stored[POSEMB] = stored.pop("pos_embedding")
    assert is_big_vision(stored)
    assert_same_arrays(convert_big_vision(stored, "old.npz").arrays, arrays)


def test_google_and_keras_vit_layouts_are_not_claimed():
    google = random_checkpoint(**TINY, grid=4)
    assert not is_big_vision(google)
    assert not is_big_vision(random_checkpoint(**TINY, grid=4, pooling="map"))  # has MAPHead_0
    assert not is_big_vision({"weights": np.zeros(3)})


def test_missing_and_unexpected_keys_are_listed_with_the_file():
    stored = to_big_vision(_canonical("token"), scan=True)
    del stored["params/Transformer/encoderblock/LayerNorm_1/bias"]
    del stored["params/head/bias"]
    stored["params/Transformer/encoderblock/LayerScale_0/scale"] = np.ones((2, 32), np.float32)
    stored["params/extra"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointError) as error:
        convert_big_vision(stored, "broken.npz")
    message = str(error.value)
    assert "broken.npz" in message
    assert "missing: params/Transformer/encoderblock/LayerNorm_1/bias, params/head/bias" in message
    assert "params/extra" in message
    assert "params/Transformer/encoderblock/LayerScale_0/scale[1]" in message


def test_missing_block_keys_unscanned():
    stored = to_big_vision(_canonical("gap"))
    del stored["params/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/bias"]
    del stored["params/pos_embedding"]
    with pytest.raises(CheckpointError) as error:
        convert_big_vision(stored, "f.npz", image_size=16)
    # Without pos_embedding the file is a sincos2d model: only the block's key is missing.
    assert "missing: params/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/bias\n" \
        in str(error.value) + "\n"


def test_wrong_shapes_name_key_expected_and_found():
    stored = to_big_vision(_canonical("token"))
    stored["params/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"] = np.zeros((32, 48))
    stored["params/cls"] = np.zeros((1, 2, 32))
    with pytest.raises(CheckpointError) as error:
        convert_big_vision(stored, "shapes.npz")
    message = str(error.value)
    assert "params/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel: expected (32, 64), " \
           "found (32, 48)" in message
    assert "params/cls: expected (1, 1, 32), found (1, 2, 32)" in message


def test_ragged_scan_is_refused():
    stored = to_big_vision(_canonical("gap"), scan=True)
    key = "params/Transformer/encoderblock/LayerNorm_0/scale"
    stored[key] = stored[key][:1]
    with pytest.raises(CheckpointError, match="leading depth axis"):
        convert_big_vision(stored, "ragged.npz")


def test_pool_type_is_checked_and_unknown_ones_refused():
    stored = to_big_vision(_canonical("gap"))
    assert convert_big_vision(stored, "f.npz", pool_type="gap").options["pooling"] == "gap"
    with pytest.raises(CheckpointError, match="no keras_vit counterpart"):
        convert_big_vision(stored, "f.npz", pool_type="0")
    with pytest.raises(CheckpointError, match="'map'"):
        convert_big_vision(stored, "f.npz", pool_type="map")


@pytest.mark.parametrize("pooling, scan, prefix", [
    ("token", False, "params/"), ("gap", False, "params/"), ("map", False, "params/img/"),
    ("token", True, "params/"), ("map", True, ""),
])
def test_from_checkpoint_logits_match_reference(tmp_path, pooling, scan, prefix):
    arrays = _canonical(pooling)
    path = write_big_vision(tmp_path / "bv.npz", arrays, prefix=prefix, scan=scan)
    model = keras_vit.from_checkpoint(path)
    images = _images()
    expected = forward(arrays, images, position_embedding_prefix=False)
    assert relative_error(model(images), expected) < 1e-5


def test_from_checkpoint_bfloat16(tmp_path):
    arrays = bfloat16_rounded(_canonical("token"))
    path = write_big_vision(tmp_path / "bf16.npz", arrays, bfloat16=True, scan=True)
    model = keras_vit.from_checkpoint(path)
    images = _images()
    expected = forward(arrays, images, position_embedding_prefix=False)
    assert relative_error(model(images), expected) < 1e-5


def test_from_checkpoint_sincos_position_embedding(tmp_path):
    """from_checkpoint must hand its image_size to the reader (sources._read_npz)."""
    arrays = _canonical("gap")
    path = write_big_vision(tmp_path / "sincos.npz", arrays, posemb="sincos2d")
    model = keras_vit.from_checkpoint(path, image_size=16)
    images = _images()
    reference = {**arrays, POSEMB: posemb_sincos_2d(4, 4, 32)}
    expected = forward(reference, images, position_embedding_prefix=False)
    assert relative_error(model(images), expected) < 1e-5


def test_from_checkpoint_google_names_under_opt_target(tmp_path):
    """Google's layout in a Flax-optimizer checkpoint; its position embedding covers cls."""
    arrays = random_checkpoint(**TINY, grid=4, position_embedding_prefix=True)
    path = tmp_path / "opt.npz"
    np.savez(path, **{"opt/target/" + key: value for key, value in arrays.items()})
    model = keras_vit.from_checkpoint(str(path))
    images = _images()
    assert relative_error(model(images), forward(arrays, images)) < 1e-5
