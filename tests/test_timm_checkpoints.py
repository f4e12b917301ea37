"""timm checkpoints in and out (keras_vit.formats.timm), against timm's own conversion code.

The truth: `tests/timm_layout.py`, a NumPy port of pytorch-image-models'
timm/models/vision_transformer.py `_load_weights` (Google/canonical names -> timm's state
dict), with timm's module names for LayerScale, registers, fc_norm and DeiT's distillation
token, and `save_config_for_hf`'s config.json. A checkpoint written by it must read back into
exactly the canonical arrays it came from, and give (through `keras_vit.from_checkpoint`) the
logits of the NumPy reference, tests/vit_reference.py, within 1e-5.
"""

import json
import os

import numpy as np
import pytest

import keras_vit
import timm_layout
import vit_reference
from keras_vit.checkpoints import CheckpointError, CheckpointNotFoundError
from keras_vit.formats import common, timm

P, D, L, H, MLP, GRID, K = 4, 32, 2, 4, 64, 4, 7
SIZE = P * GRID
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SHAPES = dict(patch_size=P, embed_dim=D, depth=L, num_heads=H, mlp_ratio=MLP / D)


# Each case: the canonical checkpoint's options (vit_reference.random_checkpoint), the timm
# architecture and model_args, the timm constructor arguments `to_timm` needs, the expected
# reader options, and the pretrained_cfg's mean/std.
CASES = {
    "token": dict(
        checkpoint=dict(pooling="token"),
        architecture="vit_base_patch16_224", model_args=SHAPES, timm=dict(),
        options=dict(pooling="token", position_embedding_prefix=True, approximate_gelu=False)),
    "avg_fc_norm": dict(
        checkpoint=dict(pooling="gap", norm_after_pooling=True),
        architecture="vit_base_patch16_224",
        model_args=dict(SHAPES, class_token=False, global_pool="avg"),
        timm=dict(class_token=False, global_pool="avg"),
        options=dict(pooling="gap", approximate_gelu=False)),
    "avg_norm_first": dict(  # big_vision's gap: the encoder norm, then the average
        checkpoint=dict(pooling="gap"),
        architecture="vit_base_patch16_siglip_gap_224", model_args=SHAPES,
        timm=dict(class_token=False, global_pool="avg", fc_norm=False),
        options=dict(pooling="gap", approximate_gelu=False)),
    "map_tanh": dict(  # SigLIP: MAP head, tanh GELU (act_layer='gelu_tanh' registered)
        checkpoint=dict(pooling="map"),
        architecture="vit_base_patch32_siglip_256", model_args=SHAPES,
        timm=dict(class_token=False, global_pool="map"),
        options=dict(pooling="map", approximate_gelu=True)),
    "dinov2_registers": dict(  # reg_tokens=4, no_embed_class, LayerScale, ImageNet mean/std
        checkpoint=dict(pooling="token", num_registers=4, position_embedding_prefix=False,
                        layer_scale=True),
        architecture="vit_base_patch14_reg4_dinov2", model_args=SHAPES,
        timm=dict(reg_tokens=4, init_values=1e-5), pretrained=IMAGENET,
        options=dict(pooling="token", position_embedding_prefix=False, approximate_gelu=False)),
    "deit3_layer_scale": dict(
        checkpoint=dict(pooling="token", position_embedding_prefix=False, layer_scale=True),
        architecture="deit3_small_patch16_224", model_args=SHAPES,
        timm=dict(init_values=1e-6), pretrained=IMAGENET,
        options=dict(pooling="token", position_embedding_prefix=False)),
    "deit_distilled": dict(
        checkpoint=dict(pooling="token", distillation_token=True),
        architecture="deit_tiny_distilled_patch16_224", model_args=SHAPES,
        timm=dict(distilled=True), pretrained=IMAGENET,
        options=dict(pooling="token", position_embedding_prefix=True)),
}


def _canonical(case, seed=0):
    return vit_reference.random_checkpoint(P, D, L, H, MLP, grid=GRID, num_classes=K, seed=seed,
                                           **case["checkpoint"])


def _write_case(directory, case, *, label_names=None, **config_changes):
    """The case's checkpoint as a timm Hub folder written by the test's port of timm."""
    arrays = _canonical(case)
    state = timm_layout.to_timm(arrays, **case["timm"])
    pretrained = case.get("pretrained", {})
    config = timm_layout.timm_config(
        case["architecture"], num_classes=K, num_features=D,
        global_pool=case["timm"].get("global_pool", "token"), model_args=case["model_args"],
        pretrained_cfg=timm_layout.pretrained_cfg(input_size=SIZE, num_classes=K, **pretrained),
        label_names=label_names)
    config.update(config_changes)
    timm_layout.write_folder(str(directory), state, config)
    return arrays


@pytest.mark.parametrize("name", sorted(CASES))
def test_hub_folder_reads_into_the_canonical_arrays(tmp_path, name):
    case = CASES[name]
    arrays = _write_case(tmp_path, case)
    assert timm.is_timm_folder(str(tmp_path))
    converted = timm.read_timm(tmp_path)
    vit_reference.assert_same_arrays(converted.arrays, arrays)
    assert converted.format == "timm"
    for key, value in case["options"].items():
        assert converted.options[key] == value, key
    mean = case.get("pretrained", {}).get("mean", (0.5, 0.5, 0.5))
    assert converted.options["input_mean"] == pytest.approx(mean)
    assert converted.options["eval_crop_fraction"] == pytest.approx(0.9)
    assert converted.options["image_size"] == SIZE
    assert converted.options["layer_norm_epsilon"] == 1e-6


def test_heads_from_the_architecture_and_model_args_override_it(tmp_path):
    # vit_base_patch16_gap_224 registers num_heads=16 (not VisionTransformer's 12): with no
    # model_args num_heads, that is the count; model_args' num_heads overrides it.
    case = dict(CASES["avg_norm_first"], architecture="vit_base_patch16_gap_224")
    shapes = {k: v for k, v in SHAPES.items() if k != "num_heads"}
    arrays = vit_reference.random_checkpoint(P, D, L, 16, MLP, grid=GRID, num_classes=K,
                                             pooling="gap")
    state = timm_layout.to_timm(arrays, **case["timm"])
    config = timm_layout.timm_config(
        case["architecture"], num_classes=K, num_features=D, global_pool="avg",
        model_args=shapes, pretrained_cfg=timm_layout.pretrained_cfg(input_size=SIZE))
    timm_layout.write_folder(str(tmp_path / "registered"), state, config)
    query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    assert timm.read_timm(tmp_path / "registered").arrays[query].shape == (D, 16, D // 16)

    _write_case(tmp_path / "overridden", case)  # model_args num_heads=4
    assert timm.read_timm(tmp_path / "overridden").arrays[query].shape == (D, H, D // H)
    with pytest.raises(CheckpointError, match="num_heads=4"):
        timm.read_timm(tmp_path / "overridden", num_heads=8)


def test_class_names_come_from_label_names(tmp_path):
    names = [f"class_{i}" for i in range(K)]
    _write_case(tmp_path / "list", CASES["token"], label_names=names)
    assert timm.read_timm(tmp_path / "list").class_names == names
    _write_case(tmp_path / "dict", CASES["token"],
                label_names={str(i): name for i, name in enumerate(names)})
    assert timm.read_timm(tmp_path / "dict").class_names == names
    _write_case(tmp_path / "none", CASES["token"])
    assert timm.read_timm(tmp_path / "none").class_names is None


def test_squash_at_full_crop_is_the_whole_image(tmp_path):
    case = dict(CASES["token"], pretrained=dict(crop_pct=1.0, crop_mode="squash"))
    _write_case(tmp_path, case)
    assert timm.read_timm(tmp_path).options["eval_crop_fraction"] is None


def test_missing_pretrained_cfg_fields_take_timms_defaults(tmp_path):
    # timm builds a PretrainedCfg from the folder's dict: absent fields take its defaults
    # (timm/models/_pretrained.py), not the architecture's registry cfg.
    _write_case(tmp_path, CASES["token"], pretrained_cfg={"num_classes": K})
    options = timm.read_timm(tmp_path).options
    assert options["input_mean"] == pytest.approx(IMAGENET["mean"])
    assert options["input_std"] == pytest.approx(IMAGENET["std"])
    assert options["eval_crop_fraction"] == pytest.approx(0.875)


@pytest.mark.parametrize("name", ["token", "dinov2_registers", "deit_distilled", "map_tanh"])
def test_bare_safetensors_needs_num_heads(tmp_path, name):
    case = CASES[name]
    arrays = _canonical(case)
    path = timm_layout.write_safetensors(str(tmp_path / "weights.safetensors"),
                                         timm_layout.to_timm(arrays, **case["timm"]))
    with pytest.raises(CheckpointError, match="num_heads="):
        timm.read_timm(path)
    converted = timm.read_timm(path, num_heads=H)
    vit_reference.assert_same_arrays(converted.arrays, arrays)
    expected = {k: v for k, v in case["options"].items() if k != "approximate_gelu"}
    for key, value in expected.items():
        assert converted.options[key] == value, key
    assert converted.options["approximate_gelu"] is False  # nn.GELU: timm's default
    assert "input_mean" not in converted.options  # a bare file carries no preprocessing


@pytest.mark.parametrize("with_config", [True, False])
def test_pickles_are_refused(tmp_path, with_config):
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="PyTorch pickle.*safetensors"):
        timm.read_timm(tmp_path)
    with pytest.raises(CheckpointError, match="PyTorch pickle"):
        timm.read_timm(tmp_path / "pytorch_model.bin")


def test_mis_shaped_arrays_are_named(tmp_path):
    arrays = _canonical(CASES["token"])
    state = timm_layout.to_timm(arrays)
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:-1]
    timm_layout.write_folder(str(tmp_path), state, timm_layout.timm_config(
        "vit_base_patch16_224", num_classes=K, num_features=D, global_pool="token",
        model_args=SHAPES, pretrained_cfg=timm_layout.pretrained_cfg(input_size=SIZE)))
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight \(95, 32\)"):
        timm.read_timm(tmp_path)


def test_a_folder_without_weights_is_not_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        timm.read_timm(tmp_path)


@pytest.mark.parametrize("model_args, message", [
    (dict(qkv_bias=False), "qkv_bias=False"),
    (dict(pre_norm=True), "pre_norm=True"),
    (dict(global_pool=""), "global_pool=''"),
    (dict(act_layer="quick_gelu"), "act_layer='quick_gelu'"),
    (dict(block_fn="ParallelScalingBlock"), "block_fn"),
])
def test_unsupported_model_args_are_named(tmp_path, model_args, message):
    _write_case(tmp_path, CASES["token"], model_args=dict(SHAPES, **model_args))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        timm.read_timm(tmp_path)


def test_keys_keras_vit_cannot_hold_are_named(tmp_path):
    arrays = _canonical(CASES["token"])
    state = timm_layout.to_timm(arrays)
    state["norm_pre.weight"] = np.ones(D, np.float32)
    state["norm_pre.bias"] = np.zeros(D, np.float32)
    del state["blocks.1.attn.qkv.bias"]
    config = timm_layout.timm_config(
        "vit_base_patch16_224", num_classes=K, num_features=D, global_pool="token",
        model_args=SHAPES, pretrained_cfg=timm_layout.pretrained_cfg(input_size=SIZE))
    timm_layout.write_folder(str(tmp_path), state, config)
    with pytest.raises(CheckpointError) as error:
        timm.read_timm(tmp_path)
    message = str(error.value)
    for part in ("blocks.1.attn.qkv.bias", "norm_pre.weight", "pre_norm", "qkv_bias=False"):
        assert part in message


def test_config_and_arrays_must_agree(tmp_path):
    # A folder saved with global_pool='avg' but no model_args saying so: timm itself would
    # build token pooling; the reader says so rather than pick one.
    _write_case(tmp_path / "pool", CASES["avg_fc_norm"],
                model_args=dict(SHAPES, class_token=False))
    with pytest.raises(CheckpointError, match="global_pool"):
        timm.read_timm(tmp_path / "pool")
    _write_case(tmp_path / "depth", CASES["token"], model_args=dict(SHAPES, depth=3))
    with pytest.raises(CheckpointError, match="depth is 3 in the config, 2 in the arrays"):
        timm.read_timm(tmp_path / "depth")


def test_unknown_architecture_needs_num_heads(tmp_path):
    _write_case(tmp_path, CASES["token"], architecture="vit_custom_thing")
    with pytest.raises(CheckpointError, match="pass num_heads="):
        timm.read_timm(tmp_path)
    arrays = _canonical(CASES["token"])
    vit_reference.assert_same_arrays(timm.read_timm(tmp_path, num_heads=H).arrays, arrays)


def test_map_over_patches_only_is_refused(tmp_path):
    # timm's MAP pool drops the class/register tokens first (pool_include_prefix=False).
    case = dict(CASES["map_tanh"], architecture="vit_so150m_patch16_reg4_map_256",
                checkpoint=dict(pooling="map", num_registers=4),
                timm=dict(class_token=False, global_pool="map", reg_tokens=4))
    _write_case(tmp_path, case)
    with pytest.raises(CheckpointError, match="pool_include_prefix"):
        timm.read_timm(tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_writer_matches_timms_layout_and_reads_back(tmp_path, name):
    case = CASES[name]
    arrays = _canonical(case)
    options = dict(case["options"], input_mean=(0.4, 0.5, 0.6), input_std=(0.2, 0.3, 0.4),
                   eval_crop_fraction=0.875, image_size=SIZE, layer_norm_epsilon=1e-6)
    options.setdefault("approximate_gelu", False)
    if case["checkpoint"].get("layer_scale"):
        options["layer_scale"] = case["timm"]["init_values"]
    state, config = timm.timm_arrays_and_config(arrays, options,
                                                class_names=[str(i) for i in range(K)])
    expected = timm_layout.to_timm(arrays, **case["timm"])
    vit_reference.assert_same_arrays(state, expected)

    assert config["architecture"] in timm.ARCHITECTURES
    assert config["num_classes"] == K and config["num_features"] == D
    assert config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    assert config["pretrained_cfg"]["crop_pct"] == 0.875
    # timm's create_model: the architecture's registered arguments, then model_args.
    resolved = dict(timm.architecture_args(config["architecture"]), **config.get("model_args", {}))
    assert resolved["num_heads"] == H and resolved["embed_dim"] == D
    assert int(D * resolved["mlp_ratio"]) == MLP
    assert resolved["global_pool"] == case["timm"].get("global_pool", "token")

    timm_layout.write_folder(str(tmp_path), state, config)
    converted = timm.read_timm(tmp_path)
    vit_reference.assert_same_arrays(converted.arrays, arrays)
    for key, value in options.items():
        if key != "layer_scale":
            assert converted.options[key] == pytest.approx(value), key
    assert converted.class_names == [str(i) for i in range(K)]


def test_writer_refuses_what_timm_cannot_express():
    arrays = vit_reference.random_checkpoint(P, D, L, H, MLP, grid=GRID, representation_size=8)
    with pytest.raises(CheckpointError, match="pre_logits"):
        timm.timm_arrays_and_config(arrays, {})
    arrays = _canonical(CASES["token"])
    with pytest.raises(CheckpointError, match="layer_norm_epsilon"):
        timm.timm_arrays_and_config(arrays, {"layer_norm_epsilon": 1e-12})


# --- End to end, through keras_vit.from_checkpoint -----------------------------------------


def _images(seed=1):
    return vit_reference.random_images(2, SIZE, seed)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_the_reference(tmp_path, name):
    case = CASES[name]
    arrays = _write_case(tmp_path, case)
    model = keras_vit.from_checkpoint(str(tmp_path))
    images = _images()
    # The truth: the case as written (timm's exact GELU unless the architecture says
    # gelu_tanh; the pretrained_cfg's mean and std), not what the reader made of it.
    pretrained = case.get("pretrained", {})
    expected = vit_reference.forward(
        arrays, images, approximate_gelu=case["options"].get("approximate_gelu", False),
        input_mean=pretrained.get("mean", (0.5, 0.5, 0.5)),
        input_std=pretrained.get("std", (0.5, 0.5, 0.5)), pooling=case["options"]["pooling"],
        position_embedding_prefix=case["checkpoint"].get("position_embedding_prefix", True))
    actual = model.predict(images, verbose=0)
    assert vit_reference.relative_error(actual, expected) < 1e-5


def test_bare_file_logits_with_num_heads(tmp_path):
    case = CASES["dinov2_registers"]
    arrays = _canonical(case)
    path = timm_layout.write_safetensors(str(tmp_path / "weights.safetensors"),
                                         timm_layout.to_timm(arrays, **case["timm"]))
    model = keras_vit.from_checkpoint(path, num_heads=H)
    images = _images()
    expected = vit_reference.forward(arrays, images, approximate_gelu=False,
                                     position_embedding_prefix=False)
    assert vit_reference.relative_error(model.predict(images, verbose=0), expected) < 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_timm_round_trip_is_exact(tmp_path, name):
    save_timm = keras_vit.save_timm
    _write_case(tmp_path / "source", CASES[name])
    model = keras_vit.from_checkpoint(str(tmp_path / "source"))
    directory = save_timm(model, str(tmp_path / "saved"))
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    # The file is what timm itself loads: the test's port of timm's layout, key for key.
    arrays, metadata = common.read_safetensors(os.path.join(directory, "model.safetensors"))
    assert metadata == {"format": "pt"}
    assert sorted(arrays) == sorted(common.read_safetensors(
        str(tmp_path / "source" / "model.safetensors"))[0])
    again = keras_vit.from_checkpoint(directory)
    for before, after in zip(model.weights, again.weights):
        assert before.path == after.path
        np.testing.assert_array_equal(before.numpy(), after.numpy(), err_msg=before.path)
    images = _images()
    np.testing.assert_array_equal(model.predict(images, verbose=0),
                                  again.predict(images, verbose=0))


def test_bfloat16_files_read_as_float32(tmp_path):
    import ml_dtypes

    arrays = _canonical(CASES["token"])
    state = {key: value.astype(ml_dtypes.bfloat16)
             for key, value in timm_layout.to_timm(arrays).items()}
    timm_layout.write_folder(str(tmp_path), state, timm_layout.timm_config(
        "vit_base_patch16_224", num_classes=K, num_features=D, global_pool="token",
        model_args=SHAPES, pretrained_cfg=timm_layout.pretrained_cfg(input_size=SIZE)))
    expected = {key: value.astype(ml_dtypes.bfloat16).astype(np.float32)
                for key, value in arrays.items()}
    vit_reference.assert_same_arrays(timm.read_timm(tmp_path).arrays, expected)


def test_hugging_face_folders_are_not_timm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "vit", "architectures": ["ViTForImageClassification"]}))
    assert not timm.is_timm_folder(str(tmp_path))
    assert timm.is_timm_arrays({"patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 0})
    assert not timm.is_timm_arrays({"vit.embeddings.cls_token": 0})
