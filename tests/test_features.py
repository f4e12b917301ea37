"""`keras_vit.feature_extractor` against the NumPy reference's per-block outputs and pooled
features (`vit_reference.representations`), for the model options; the spatial maps against
a hand reshape, token permutation and a dynamic-size model; weight sharing; saving;
errors; the JAX backend."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_vit import checkpoints
from keras_vit.features import feature_extractor
import vit_reference

SHAPE = dict(patch_size=4, hidden_size=32, num_layers=3, num_heads=4, mlp_dim=64)
IMAGENET = dict(input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225))

# (name, random_checkpoint keywords, model options the arrays cannot say)
CASES = [
    ("google_class_token_only", {}, {}),
    ("registers_patch_posemb_layer_scale", dict(num_registers=3, position_embedding_prefix=False,
                                                layer_scale=True),
     dict(position_embedding_prefix=False, approximate_gelu=False)),
    ("gap_without_class_token", dict(pooling="gap"), {}),
    ("gap_class_token_fc_norm", dict(pooling="gap", class_token=True, norm_after_pooling=True,
                                     num_registers=1), dict(pooling="gap")),
    ("map_with_class_token", dict(pooling="map", class_token=True), {}),
    ("deit_distilled_pre_logits", dict(distillation_token=True, representation_size=16),
     dict(IMAGENET, approximate_gelu=False)),
    ("token_pre_logits", dict(representation_size=16), dict(layer_norm_epsilon=1e-12)),
]
IDS = [case[0] for case in CASES]


def _images(batch=2, size=16, seed=1):
    return vit_reference.random_images(batch, size, seed)


def _case(layout, options, **overrides):
    arrays = vit_reference.random_checkpoint(**SHAPE, **layout)
    arrays.update(overrides)
    model = checkpoints.build_model(arrays, "features", options=options)
    reference = vit_reference.representations(arrays, _images(), **options)
    return arrays, model, reference


@pytest.mark.parametrize("name,layout,options", CASES, ids=IDS)
def test_block_tokens_equal_the_reference(name, layout, options):
    _, model, reference = _case(layout, options)
    if name == "google_class_token_only":  # its last block computes the class token alone
        assert model.get_layer("encoder").class_token_only
    prefix = reference["num_prefix_tokens"]
    for norm, truth in ((False, reference["blocks"]), (True, reference["normed_blocks"])):
        with_prefix = feature_extractor(model, blocks=[-1, 0, 1], norm=norm,
                                        include_prefix_tokens=True)(_images())
        patches_only = feature_extractor(model, blocks=[2, 0], norm=norm)(_images())
        for actual, index in zip(with_prefix, (2, 0, 1)):
            assert actual.shape == truth[index].shape
            assert vit_reference.relative_error(actual, truth[index]) < 1e-5, (norm, index)
        for actual, index in zip(patches_only, (2, 0)):
            assert actual.shape == (2, 16, SHAPE["hidden_size"])
            assert vit_reference.relative_error(actual, truth[index][:, prefix:]) < 1e-5
    # None is the last block, a single tensor; an int one block's.
    last = feature_extractor(model)(_images())
    assert vit_reference.relative_error(last, reference["blocks"][-1][:, prefix:]) < 1e-5
    first = feature_extractor(model, blocks=np.int64(-3), output="spatial")(_images())
    np.testing.assert_allclose(
        first, reference["blocks"][0][:, prefix:].reshape(2, 4, 4, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,layout,options", CASES, ids=IDS)
def test_pre_logits_equal_the_reference_pooled_features(name, layout, options):
    _, model, reference = _case(layout, options)
    features = feature_extractor(model, output="pre_logits")(_images())
    width = layout.get("representation_size") or SHAPE["hidden_size"]
    assert features.shape == (2, width) == reference["pre_logits"].shape
    assert features.dtype == "float32"
    assert vit_reference.relative_error(features, reference["pre_logits"]) < 1e-5


def test_spatial_is_the_tokens_in_row_major_order_on_a_rectangular_grid():
    arrays = vit_reference.random_checkpoint(**SHAPE, num_registers=2)
    model = checkpoints.build_model(arrays, "wide", image_size=(16, 24))
    images = np.random.default_rng(3).uniform(0, 255, (2, 16, 24, 3)).astype(np.float32)
    tokens = np.asarray(feature_extractor(model, blocks=1)(images))
    spatial = np.asarray(feature_extractor(model, blocks=1, output="spatial")(images))
    assert spatial.shape == (2, 4, 6, SHAPE["hidden_size"])
    for row in range(4):
        for column in range(6):  # patch number row * columns + column, as PatchEmbedding flattens
            np.testing.assert_array_equal(spatial[:, row, column], tokens[:, row * 6 + column])


def test_a_dynamic_size_models_maps_follow_the_image():
    """`create_model(dynamic_image_size=True)`: the grid is the image's at call time; at 16x24
    the maps are those of the fixed model built at 16x24 (position grid resampled offline)."""
    arrays = vit_reference.random_checkpoint(**SHAPE, num_registers=2)
    dynamic = checkpoints.build_model(arrays, "dynamic", dynamic_image_size=True)
    fixed = checkpoints.build_model(arrays, "fixed", image_size=(16, 24))
    images = np.random.default_rng(3).uniform(0, 255, (2, 16, 24, 3)).astype(np.float32)
    maps = feature_extractor(dynamic, blocks=[0, -1], output="spatial")(images)
    truths = feature_extractor(fixed, blocks=[0, -1], output="spatial")(images)
    for actual, expected in zip(maps, truths):
        assert actual.shape == (2, 4, 6, SHAPE["hidden_size"])
        assert vit_reference.relative_error(actual, np.asarray(expected, np.float64)) < 1e-5
    reference = vit_reference.representations(arrays, _images())
    pooled = feature_extractor(dynamic, output="pre_logits")(_images())
    assert vit_reference.relative_error(pooled, reference["pre_logits"]) < 1e-5


def test_a_moved_patch_moves_in_the_map():
    """Without position embeddings a ViT is permutation-equivariant over its patch tokens
    (attention and MLP treat every token alike), so swapping two patches of the image swaps
    exactly those two places of every block's map."""
    arrays = vit_reference.random_checkpoint(**SHAPE)
    key = "Transformer/posembed_input/pos_embedding"
    arrays[key] = np.zeros_like(arrays[key])
    model = checkpoints.build_model(arrays, "no_posemb")
    images = _images()
    moved = images.copy()
    a, b = (slice(0, 4), slice(4, 8)), (slice(8, 12), slice(12, 16))  # patches (0, 1), (2, 3)
    moved[:, a[0], a[1]], moved[:, b[0], b[1]] = images[:, b[0], b[1]], images[:, a[0], a[1]]
    extractor = feature_extractor(model, blocks=[0, -1], output="spatial", norm=True)
    for before, after in zip(extractor(images), extractor(moved)):
        before, after = np.asarray(before), np.asarray(after)
        assert not np.allclose(before[:, 0, 1], before[:, 2, 3], atol=1e-3)
        np.testing.assert_allclose(after[:, 0, 1], before[:, 2, 3], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(after[:, 2, 3], before[:, 0, 1], rtol=1e-4, atol=1e-5)
        others = np.ones((4, 4), bool)
        others[0, 1] = others[2, 3] = False
        np.testing.assert_allclose(after[:, others], before[:, others], rtol=1e-4, atol=1e-5)


def test_the_extractor_shares_the_models_weights():
    arrays = vit_reference.random_checkpoint(**SHAPE, pooling="map", class_token=True)
    model = checkpoints.build_model(arrays, "shared")
    tokens = feature_extractor(model, blocks=[0, 2], include_prefix_tokens=True)
    pooled = feature_extractor(model, output="pre_logits")
    model_variables = {id(variable) for variable in model.weights}
    for extractor in (tokens, pooled):
        assert {id(variable) for variable in extractor.weights} <= model_variables
    # Change the model's weights: the extractors compute with the new ones.
    key = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    arrays[key] = arrays[key] * -1.5
    # Into the model's own variables (the checkpoint table that from_npz loads with).
    checkpoints._assign(model, arrays, "changed")
    reference = vit_reference.representations(arrays, _images())
    for actual, index in zip(tokens(_images()), (0, 2)):
        assert vit_reference.relative_error(actual, reference["blocks"][index]) < 1e-5
    assert vit_reference.relative_error(pooled(_images()), reference["pre_logits"]) < 1e-5
    before = vit_reference.representations(vit_reference.random_checkpoint(
        **SHAPE, pooling="map", class_token=True), _images())
    assert vit_reference.relative_error(before["blocks"][0], reference["blocks"][0]) > 1e-2


def test_the_extractor_survives_keras_saving(tmp_path):
    arrays = vit_reference.random_checkpoint(**SHAPE, num_registers=2)
    model = checkpoints.build_model(arrays, "saved")
    extractor = feature_extractor(model, blocks=[0, -1], output="spatial")
    path = str(tmp_path / "features.keras")
    extractor.save(path)
    loaded = keras.models.load_model(path)
    for actual, expected in zip(loaded(_images()), extractor(_images())):
        np.testing.assert_array_equal(actual, expected)


def test_errors_say_what_was_expected():
    arrays = vit_reference.random_checkpoint(**SHAPE)
    model = checkpoints.build_model(arrays, "errors")
    with pytest.raises(ValueError, match="block index 3 is out of range.*3 encoder blocks"):
        feature_extractor(model, blocks=3)
    with pytest.raises(ValueError, match="block index -4 is out of range"):
        feature_extractor(model, blocks=[0, -4])
    with pytest.raises(ValueError, match="block 2 twice"):
        feature_extractor(model, blocks=[2, -1])
    with pytest.raises(ValueError, match="integers"):
        feature_extractor(model, blocks=[1.0])
    with pytest.raises(ValueError, match="empty"):
        feature_extractor(model, blocks=[])
    with pytest.raises(ValueError, match="output must be one of"):
        feature_extractor(model, output="maps")
    with pytest.raises(ValueError, match="takes no blocks"):
        feature_extractor(model, blocks=0, output="pre_logits")
    with pytest.raises(ValueError, match="prefix tokens have no place"):
        feature_extractor(model, output="spatial", include_prefix_tokens=True)
    images = keras.Input((16, 16, 3))
    with pytest.raises(ValueError, match="needs a ViT built by keras_vit.create_model"):
        feature_extractor(keras.Model(images, keras.layers.Dense(2)(images)))
    # Tokens that do not fill the image's patch grid cannot be a map: here a patch size the
    # tokens were not made with (16x16 images in 3-pixel patches: 5x5 grid, 16 tokens).
    model.get_layer("patch_embedding").patch_size = 3
    with pytest.raises(ValueError, match="5x5 grid, but the encoder reads 16 patch tokens"):
        feature_extractor(model, output="spatial")


_JAX_SCRIPT = """
import sys
import numpy as np
import keras
import keras_vit
from keras_vit.features import feature_extractor
assert keras.backend.backend() == "jax", keras.backend.backend()
checkpoint, images_path, output_path = sys.argv[1:4]
model = keras_vit.from_npz(checkpoint)
assert model.get_layer("encoder").class_token_only
images = np.load(images_path)
tokens = feature_extractor(model, blocks=[0, -1], norm=True, include_prefix_tokens=True)(images)
spatial = feature_extractor(model, blocks=1, output="spatial")(images)
pooled = feature_extractor(model, output="pre_logits")(images)
np.savez(output_path, first=tokens[0], last=tokens[1], spatial=spatial, pooled=pooled)
"""


def test_jax_features_equal_the_reference(tmp_path):
    """A class_token_only model with registers and LayerScale (MAP and the others: on TF)."""
    pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")
    arrays = vit_reference.random_checkpoint(**SHAPE, num_registers=2, layer_scale=True)
    checkpoint = str(tmp_path / "ckpt.npz")
    np.savez(checkpoint, **arrays)
    images = _images(3)
    np.save(tmp_path / "images.npy", images)
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _JAX_SCRIPT, checkpoint, str(tmp_path / "images.npy"),
                    str(tmp_path / "jax.npz")], check=True, env=environment, timeout=300)
    jax = np.load(tmp_path / "jax.npz")
    reference = vit_reference.representations(arrays, images)
    prefix = reference["num_prefix_tokens"]
    expected = {"first": reference["normed_blocks"][0], "last": reference["normed_blocks"][-1],
                "spatial": reference["blocks"][1][:, prefix:].reshape(3, 4, 4, -1),
                "pooled": reference["pre_logits"]}
    for key, value in expected.items():
        assert jax[key].shape == value.shape, key
        assert vit_reference.relative_error(jax[key], value) < 1e-5, key
