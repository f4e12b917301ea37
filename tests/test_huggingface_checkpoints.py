"""keras_vit.formats.huggingface against folders written the way transformers writes them.

The truth: canonical random arrays (tests/vit_reference.py) put in transformers' layout by
tests/huggingface_layout.py, a NumPy port of timm's `_load_weights` composed with
transformers' `convert_vit_timm_to_pytorch.py` (`create_rename_keys`, `read_in_q_k_v`), must
read back as the same arrays, and give (through `keras_vit.from_checkpoint`) the logits of
the NumPy reference with transformers' options: exact GELU, LayerNorm epsilon 1e-12, and the
image processor's mean and std.
"""

import json
import os

import numpy as np
import pytest

import keras_vit
from huggingface_layout import hf_config, hf_forward, to_huggingface, write_folder
from keras_vit.checkpoints import CheckpointError, CheckpointNotFoundError
from keras_vit.formats.huggingface import is_huggingface_folder, read_huggingface
from vit_reference import (assert_same_arrays, forward, random_checkpoint, random_images,
                            relative_error)

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
HEADS = TINY["num_heads"]


def _arrays(**kwargs):
    return random_checkpoint(**TINY, grid=4, **kwargs)


def _images(batch, size=16, seed=1):
    return random_images(batch, size, seed)


def _rewrite_json(path, **changes):
    with open(path) as file:
        value = json.load(file)
    value.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del value[key]
    with open(path, "w") as file:
        json.dump(value, file)


def test_writer_produces_transformers_keys():
    state = to_huggingface(_arrays())
    assert state["vit.embeddings.patch_embeddings.projection.weight"].shape == (32, 3, 4, 4)
    assert state["vit.embeddings.position_embeddings"].shape == (1, 17, 32)
    assert state["vit.encoder.layer.1.attention.attention.query.weight"].shape == (32, 32)
    assert state["vit.encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
    assert state["classifier.weight"].shape == (7, 32)
    assert not any(key.startswith("blocks.") for key in state)
    base = to_huggingface(_arrays(representation_size=32), base_model=True)
    assert "pooler.dense.weight" in base and "layernorm.weight" in base
    assert not any(key.startswith(("vit.", "classifier")) for key in base)


@pytest.mark.parametrize("hidden_act, approximate", [("gelu", False), ("gelu_new", True)])
def test_writer_layout_runs_like_transformers_model(hidden_act, approximate):
    # The writer's output, run by a port of transformers' own forward, is the reference ViT:
    # the check that the layout (head order of query/key/value, conv and Linear transposes) is
    # transformers', independent of the reader.
    arrays = _arrays()
    images = _images(2)
    config = hf_config(arrays, num_heads=HEADS, hidden_act=hidden_act)
    pixel_values = ((images.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    expected = forward(arrays, images, approximate_gelu=approximate, layer_norm_epsilon=1e-12)
    assert relative_error(hf_forward(to_huggingface(arrays), config, pixel_values), expected) < 1e-9


def test_writer_base_model_pooler_is_pre_logits():
    arrays = _arrays(representation_size=24)
    images = _images(2)
    pixel_values = ((images.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    pooled = hf_forward(to_huggingface(arrays, base_model=True),
                        hf_config(arrays, num_heads=HEADS, base_model=True), pixel_values)
    # The reference's features before the head, recovered by a head of the identity.
    identity = {**arrays, "head/kernel": np.eye(24, dtype=np.float32),
                "head/bias": np.zeros(24, np.float32)}
    expected = forward(identity, images, approximate_gelu=False, layer_norm_epsilon=1e-12)
    assert relative_error(pooled, expected) < 1e-9


def test_classification_model_reads_as_canonical_arrays(tmp_path):
    arrays = _arrays()
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS)
    assert is_huggingface_folder(folder)
    checkpoint = read_huggingface(folder)
    assert checkpoint.format == "huggingface" and checkpoint.source == str(folder)
    assert_same_arrays(checkpoint.arrays, arrays)
    assert checkpoint.options == {
        "approximate_gelu": False, "layer_norm_epsilon": 1e-12,
        "input_mean": pytest.approx((0.5,) * 3), "input_std": pytest.approx((0.5,) * 3),
        "eval_crop_fraction": None, "image_size": 16, "position_embedding_prefix": True,
        "pooling": "token"}
    assert checkpoint.class_names is None  # transformers' generic LABEL_i


def test_base_model_with_pooler_reads_pre_logits_and_no_head(tmp_path):
    arrays = _arrays(representation_size=32)
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS, base_model=True)
    expected = {k: v for k, v in arrays.items() if not k.startswith("head/")}
    assert_same_arrays(read_huggingface(folder).arrays, expected)


def test_base_model_without_pooler_reads_backbone_only(tmp_path):
    arrays = _arrays()
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS, base_model=True)
    expected = {k: v for k, v in arrays.items() if not k.startswith("head/")}
    checkpoint = read_huggingface(folder)
    assert_same_arrays(checkpoint.arrays, expected)
    assert checkpoint.class_names is None


def test_pooler_beside_a_classifier_is_dropped(tmp_path):
    # ViTForImageClassification builds ViTModel(add_pooling_layer=False): a pooler is unused.
    arrays = _arrays()
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS)
    state = to_huggingface(arrays)
    state["vit.pooler.dense.weight"] = np.ones((32, 32), np.float32)
    state["vit.pooler.dense.bias"] = np.ones((32,), np.float32)
    from safetensors.numpy import save_file
    save_file(state, os.path.join(folder, "model.safetensors"))
    assert_same_arrays(read_huggingface(folder).arrays, arrays)


def test_sharded_and_half_precision_folders(tmp_path):
    arrays = _arrays()
    folder = write_folder(tmp_path / "sharded", arrays, num_heads=HEADS, shards=3)
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    assert_same_arrays(read_huggingface(folder).arrays, arrays)
    half = read_huggingface(write_folder(tmp_path / "half", arrays, num_heads=HEADS,
                                         dtype=np.float16)).arrays
    for key, value in arrays.items():
        np.testing.assert_array_equal(half[key], value.astype(np.float16).astype(np.float32))


def test_options_from_config_and_preprocessor(tmp_path):
    arrays = _arrays()
    names = [f"class {i}" for i in range(7)]
    preprocessor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                    "size": {"height": 16, "width": 16}, "resample": 2, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS, id2label=names,
                          preprocessor=preprocessor, hidden_act="gelu_new", layer_norm_eps=1e-6)
    checkpoint = read_huggingface(folder)
    assert checkpoint.class_names == names
    assert checkpoint.options["approximate_gelu"] is True
    assert checkpoint.options["layer_norm_epsilon"] == 1e-6
    assert checkpoint.options["input_mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert checkpoint.options["input_std"] == pytest.approx((0.229, 0.224, 0.225))
    assert checkpoint.options["eval_crop_fraction"] is None


@pytest.mark.parametrize("processor, mean, std, crop", [
    ({"do_normalize": False}, 0.0, 1.0, None),
    ({"do_rescale": True, "rescale_factor": 1 / 127.5, "image_mean": 1.0, "image_std": 1.0},
     0.5, 0.5, None),
    ({"image_processor_type": "DeiTImageProcessor", "size": {"height": 256, "width": 256},
      "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}, 0.5, 0.5, 0.875),
])
def test_preprocessor_variants(tmp_path, processor, mean, std, crop):
    folder = write_folder(tmp_path / "vit", _arrays(), num_heads=HEADS, preprocessor=processor)
    options = read_huggingface(folder).options
    assert options["input_mean"] == pytest.approx((mean,) * 3)
    assert options["input_std"] == pytest.approx((std,) * 3)
    assert options["eval_crop_fraction"] == crop


@pytest.mark.parametrize("act, approximate", [
    ("gelu", False), ("gelu_python", False), ("gelu_new", True), ("gelu_pytorch_tanh", True),
    ("gelu_fast", True), ("gelu_accurate", True)])
def test_hidden_act_maps_to_gelu_form(tmp_path, act, approximate):
    folder = write_folder(tmp_path / "vit", _arrays(), num_heads=HEADS, hidden_act=act)
    assert read_huggingface(folder).options["approximate_gelu"] is approximate


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"),
    ({"qkv_bias": False}, "qkv_bias false"),
    ({"num_channels": 1}, "num_channels 1"),
    ({"num_hidden_layers": 3}, "num_hidden_layers 3"),
    ({"image_size": 32}, "image_size 32"),
    ({"num_attention_heads": 5}, "num_attention_heads=5"),
    ({"id2label": {"0": "a"}}, "id2label has 1 labels"),
])
def test_config_errors_name_the_field_and_file(tmp_path, change, message):
    folder = write_folder(tmp_path / "vit", _arrays(), num_heads=HEADS)
    _rewrite_json(os.path.join(folder, "config.json"), **change)
    with pytest.raises(CheckpointError, match=message) as error:
        read_huggingface(folder)
    assert str(folder) in str(error.value)


def test_missing_and_unknown_keys_are_reported_together(tmp_path):
    arrays = _arrays()
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS)
    state = to_huggingface(arrays)
    del state["vit.encoder.layer.1.output.dense.bias"]
    state["vit.encoder.layer.0.attention.attention.lora.weight"] = np.zeros((2, 2), np.float32)
    from safetensors.numpy import save_file
    save_file(state, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        read_huggingface(folder)
    text = str(error.value)
    assert "missing encoder.layer.1.output.dense.bias" in text
    assert "unknown keys encoder.layer.0.attention.attention.lora.weight" in text
    assert "model.safetensors" in text


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(_arrays(), num_heads=HEADS)))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    assert is_huggingface_folder(folder)
    with pytest.raises(CheckpointError, match="PyTorch pickle"):
        read_huggingface(folder)


def test_folder_without_weights_or_config(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    assert not is_huggingface_folder(folder)
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        read_huggingface(folder)
    (folder / "config.json").write_text(json.dumps(hf_config(_arrays(), num_heads=HEADS)))
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        read_huggingface(folder)


def test_other_model_types_are_not_vit_folders(tmp_path):
    folder = write_folder(tmp_path / "deit", _arrays(), num_heads=HEADS)
    _rewrite_json(os.path.join(folder, "config.json"), model_type="deit")
    assert not is_huggingface_folder(folder)
    with pytest.raises(CheckpointError, match="model_type 'deit'"):
        read_huggingface(folder)


@pytest.mark.parametrize("hidden_act, approximate", [("gelu", False), ("gelu_new", True)])
def test_loaded_model_logits_match_reference(tmp_path, hidden_act, approximate):
    arrays = _arrays()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    preprocessor = {"image_processor_type": "ViTImageProcessor",
                    "size": {"height": 16, "width": 16},
                    "image_mean": list(mean), "image_std": list(std)}
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS, hidden_act=hidden_act,
                          preprocessor=preprocessor)
    model = keras_vit.from_checkpoint(str(folder))
    images = _images(3)
    expected = forward(arrays, images, approximate_gelu=approximate, layer_norm_epsilon=1e-12,
                       input_mean=mean, input_std=std)
    assert relative_error(model(images), expected) < 1e-5


def test_loaded_sharded_folder_without_preprocessor(tmp_path):
    arrays = _arrays()
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS, shards=2)
    model = keras_vit.from_checkpoint(str(folder))
    images = _images(2)
    expected = forward(arrays, images, approximate_gelu=False, layer_norm_epsilon=1e-12)
    assert relative_error(model(images), expected) < 1e-5


def test_base_model_with_pooler_loads_with_a_new_head(tmp_path):
    # No classifier: from_checkpoint needs num_classes, attaches a zero head and, as for
    # Google's pre-training checkpoints, drops the pre-logits (here the pooler).
    arrays = _arrays(representation_size=32)
    folder = write_folder(tmp_path / "vit", arrays, num_heads=HEADS, base_model=True)
    with pytest.raises(CheckpointError, match="num_classes"):
        keras_vit.from_checkpoint(str(folder))
    model = keras_vit.from_checkpoint(str(folder), num_classes=3)
    np.testing.assert_array_equal(model(_images(2)), np.zeros((2, 3)))
