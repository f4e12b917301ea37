"""The options other projects' ViTs need (`create_model(**options)`), against the NumPy
reference: exact GELU, LayerNorm epsilon, input normalisation, register and distillation
tokens, position embeddings without the prefix tokens, LayerScale, fc_norm, the MAP head."""

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import checkpoints
from keras_vit.model import model_options
import vit_reference

SHAPE = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
IMAGENET = dict(input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225))

# (name, random_checkpoint keywords, model options the arrays cannot say)
CASES = [
    ("google", {}, {}),
    ("exact_gelu_eps", {}, dict(approximate_gelu=False, layer_norm_epsilon=1e-12)),
    ("imagenet_normalisation", {}, dict(IMAGENET, eval_crop_fraction=0.875)),
    ("registers_patch_posemb", dict(num_registers=4, position_embedding_prefix=False,
                                    layer_scale=True),
     dict(position_embedding_prefix=False, approximate_gelu=False)),
    ("registers_prefix_posemb", dict(num_registers=2), {}),
    ("gap_with_class_token_fc_norm", dict(pooling="gap", class_token=True,
                                          norm_after_pooling=True), dict(pooling="gap")),
    ("gap_without_class_token", dict(pooling="gap"), {}),
    ("map", dict(pooling="map", position_embedding_prefix=False), {}),
    ("map_with_class_token", dict(pooling="map", class_token=True), {}),
    ("deit_distilled", dict(distillation_token=True), dict(IMAGENET, approximate_gelu=False)),
    ("pre_logits", dict(representation_size=16), {}),
]


def _images(seed=1, size=16):
    return vit_reference.random_images(2, size, seed)


@pytest.mark.parametrize("name,layout,options", CASES, ids=[case[0] for case in CASES])
def test_options_match_the_reference(name, layout, options):
    arrays = vit_reference.random_checkpoint(**SHAPE, **layout)
    model = checkpoints.build_model(arrays, name, options=options)
    reference_options = {k: v for k, v in options.items() if k != "eval_crop_fraction"}
    expected = vit_reference.forward(arrays, _images(), **reference_options)
    assert vit_reference.relative_error(model.predict(_images(), verbose=0), expected) < 1e-5
    # The canonical arrays come back out exactly, and the options are recorded.
    saved = checkpoints.model_arrays(model)
    assert sorted(saved) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    recorded = model_options(model)
    for key, value in options.items():
        if key != "pooling":
            assert recorded[key] == (tuple(value) if isinstance(value, tuple) else value), key


@pytest.mark.parametrize("name,layout,options", CASES[3:6], ids=[c[0] for c in CASES[3:6]])
def test_options_survive_keras_saving_and_resized_inputs(tmp_path, name, layout, options):
    arrays = vit_reference.random_checkpoint(**SHAPE, **layout)
    model = checkpoints.build_model(arrays, name, options=options)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(_images(), verbose=0),
                                  model.predict(_images(), verbose=0))
    assert model_options(loaded) == model_options(model)
    # A 24-px model: the patch grid of the position embedding is resampled, prefix kept.
    bigger = checkpoints.build_model(arrays, name, options=options, image_size=24)
    assert bigger.predict(_images(size=24), verbose=0).shape == (2, 7)


def test_gelu_forms_differ_and_the_exact_one_is_what_timm_computes():
    """The 2e-4 the issue reports: tanh GELU weights run as exact GELU are off."""
    arrays = vit_reference.random_checkpoint(**SHAPE)
    exact = vit_reference.forward(arrays, _images(), approximate_gelu=False)
    tanh_model = checkpoints.build_model(arrays, "tanh")
    assert vit_reference.relative_error(tanh_model.predict(_images(), verbose=0), exact) > 1e-5
    exact_model = checkpoints.build_model(arrays, "exact", options=dict(approximate_gelu=False))
    assert vit_reference.relative_error(exact_model.predict(_images(), verbose=0), exact) < 1e-5


def test_new_head_with_distillation_token_is_zero_and_pruned_last_block_refused():
    arrays = vit_reference.random_checkpoint(**SHAPE, distillation_token=True)
    model = checkpoints.build_model(arrays, "deit", num_classes=3)
    np.testing.assert_array_equal(model.predict(_images(), verbose=0), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="distillation token"):
        keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, distillation_token=True,
                               class_token_only=True)
    assert not model.get_layer("encoder").class_token_only


def test_class_token_only_with_registers_gives_the_full_models_logits():
    arrays = vit_reference.random_checkpoint(**SHAPE, num_registers=3)
    pruned = checkpoints.build_model(arrays, "pruned")
    full = checkpoints.build_model(arrays, "full", class_token_only=False)
    assert pruned.get_layer("encoder").class_token_only
    np.testing.assert_allclose(pruned.predict(_images(), verbose=0),
                               full.predict(_images(), verbose=0), rtol=1e-5, atol=1e-6)


def test_option_conflicts_are_clear():
    with pytest.raises(ValueError, match="class_token must be True"):
        keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, class_token=False)
    with pytest.raises(TypeError, match="unexpected arguments"):
        keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, gelu="exact")
    with pytest.raises(ValueError, match="std must be positive"):
        keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, input_std=(0, 1, 1))


def test_weight_decay_exclusions_cover_the_new_weights():
    from keras_vit.training.optimizers import no_decay_variables

    arrays = vit_reference.random_checkpoint(**SHAPE, pooling="map", class_token=True,
                                             num_registers=2, layer_scale=True)
    model = checkpoints.build_model(arrays, "all")
    excluded = {variable.path for variable in no_decay_variables(model)}
    decayed = {variable.path for variable in model.trainable_variables} - excluded
    assert all(path.endswith("kernel") for path in decayed), sorted(decayed)
    assert any("register_tokens" in path for path in excluded)
    assert any(path.endswith("probe") for path in excluded)
    assert any("attention_scale" in path for path in excluded)


@pytest.mark.parametrize("layout", [dict(distillation_token=True),
                                    dict(pooling="map", num_registers=2, class_token=True)])
def test_attention_model_works_for_the_options(layout):
    arrays = vit_reference.random_checkpoint(**SHAPE, **layout)
    model = checkpoints.build_model(arrays, "options")
    outputs = keras_vit.attention_model(model)(_images())
    expected_logits, expected_attention = vit_reference.forward(arrays, _images(),
                                                                return_attention=True)
    assert vit_reference.relative_error(outputs["logits"], expected_logits) < 1e-5
    assert vit_reference.relative_error(outputs["attention"], expected_attention) < 1e-5
