"""keras_vit.create_model: presets, parameter counts, dtypes, serialization."""

import keras
import numpy as np
import pytest

import keras_vit

TINY = keras_vit.ViTConfig(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)

# Parameter counts of the README's table (1000 classes, token pooling, no representation
# layer); by hand for B/16: patch 590,592 + cls 768 + posemb 151,296
# + 12 blocks x 7,087,872 + final norm 1,536 + head 769,000 = 86,567,656.
PARAMETER_COUNTS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
}
# H/14: 630,764,800 is the count without the head (timm's vit_huge_patch14_224 with
# num_classes=0 reports the same); with the 1000-class head, 1280 x 1000 + 1000 = 1,281,000 more,
# 632,045,800, the paper's "632M".
HEAVY_PARAMETER_COUNTS = {"L/16": (304_326_632, None), "H/14": (632_045_800, 630_764_800)}


@pytest.mark.parametrize("variant, expected", sorted(PARAMETER_COUNTS.items()))
def test_parameter_counts(variant, expected):
    assert keras_vit.create_model(variant).count_params() == expected


@pytest.mark.slow
@pytest.mark.parametrize("variant, expected", sorted(HEAVY_PARAMETER_COUNTS.items()))
def test_parameter_counts_heavy(variant, expected):
    with_head, without_head = expected
    model = keras_vit.create_model(variant)
    assert model.count_params() == with_head
    if without_head:
        headless = keras_vit.create_model(variant, include_top=False)
        assert headless.count_params() == without_head
    keras.backend.clear_session()


@pytest.mark.parametrize("name", ["B/16", "ViT-B/16", "b16", "vit_b16", "B-16"])
def test_variant_spellings(name):
    assert keras_vit.parse_variant(name) == keras_vit.ViTConfig(16, 768, 12, 12, 3072)


def test_custom_size_round_trips_through_its_name():
    config = keras_vit.ViTConfig(patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)
    assert keras_vit.variants.short_name(config) == "d64_l4_h4_m128_p4"
    assert keras_vit.parse_variant("d64_l4_h4_m128_p4") == config
    with pytest.raises(ValueError, match="divisible by num_heads"):
        keras_vit.parse_variant("d64_l4_h3_m128_p4")


@pytest.mark.parametrize("name", ["B/15", "X/16", "", "B/16/2", "d64_l4_h4_m128"])
def test_unknown_variant_lists_the_known_ones(name):
    with pytest.raises(ValueError, match="Expected one of Ti/16, S/16"):
        keras_vit.parse_variant(name)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        keras_vit.ViTConfig(16, 100, 2, 3, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        keras_vit.create_model(TINY, image_size=18)
    with pytest.raises(ValueError, match="pooling"):
        keras_vit.create_model(TINY, image_size=16, pooling="max")


@pytest.mark.parametrize("pooling, tokens", [("token", 17), ("gap", 16)])
def test_shapes(pooling, tokens):
    model = keras_vit.create_model(TINY, image_size=16, num_classes=5, pooling=pooling)
    assert model.output_shape == (None, 5)
    assert model.get_layer("position_embedding").embedding.shape == (1, tokens, 32)
    attention = keras_vit.attention_model(model)(np.zeros((2, 16, 16, 3), np.float32))["attention"]
    assert attention.shape == (2, 2, 4, tokens, tokens)
    # Probabilities: every row sums to one.
    np.testing.assert_allclose(np.sum(attention, axis=-1), 1.0, atol=1e-5)


def test_non_square_images():
    model = keras_vit.create_model(TINY, image_size=(16, 24), num_classes=3)
    assert model.get_layer("position_embedding").grid_size == (4, 6)
    assert model(np.zeros((1, 16, 24, 3), np.float32)).shape == (1, 3)


def test_representation_and_features():
    model = keras_vit.create_model(TINY, image_size=16, representation_size=8, include_top=False)
    features = model(np.random.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32))
    assert features.shape == (2, 8)
    # tanh pre-logits: bounded by 1.
    assert np.all(np.abs(features) <= 1.0)


def test_head_starts_at_zero():
    model = keras_vit.create_model(TINY, image_size=16, num_classes=4)
    np.testing.assert_array_equal(model(np.ones((2, 16, 16, 3), np.float32)), np.zeros((2, 4)))


def test_logits_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras_vit.create_model(TINY, image_size=16, num_classes=4)
        assert model.get_layer("encoder").compute_dtype == "bfloat16"
        assert str(model.output.dtype) == "float32"
        logits = model(np.ones((2, 16, 16, 3), np.float32))
        assert "float32" in str(logits.dtype)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.1, variable.shape).astype(np.float32))
    return model


def test_keras_file_round_trip(tmp_path):
    model = _randomize(keras_vit.create_model(
        TINY, image_size=16, num_classes=5, representation_size=8, dropout_rate=0.1,
        stochastic_depth_rate=0.2))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    images = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(restored(images), model(images))
    assert restored.get_layer("encoder").blocks[-1].drop_path.rate == pytest.approx(0.2)


def test_weights_files_keep_the_layout_of_earlier_versions(tmp_path):
    """A functional model's .weights.h5 files its top-level layers by class name: fc_norm must
    stay Keras's LayerNormalization (files written before keras_vit.layers.LayerNorm hold it
    under layers/layer_normalization), while the LayerNorms inside layers go by attribute."""
    import h5py

    model = keras_vit.create_model("d32_l1_h2_m64_p8", image_size=16, num_classes=3,
                                   pooling="gap", norm_after_pooling=True)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    with h5py.File(path) as stored:
        groups = []
        stored.visit(lambda name: groups.append(name) if name.endswith("/vars") else None)
    assert "layers/layer_normalization/vars" in groups
    assert "layers/encoder/blocks/transformer_block/attention_norm/vars" in groups
    assert not any(name.startswith("layers/layer_norm/") for name in groups), groups


def test_dropout_only_in_training():
    model = _randomize(keras_vit.create_model(TINY, image_size=16, num_classes=5, dropout_rate=0.5))
    images = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(model(images), model(images))
    assert not np.allclose(model(images, training=True), model(images))


def test_inference_graph_equals_training_path_without_dropout():
    # On TensorFlow, inference runs the first MLP layer as MatMul + BiasAdd + GELU ops that
    # oneDNN fuses in a graph (predict traces one); training keeps Keras's Dense. Same math.
    model = _randomize(keras_vit.create_model(TINY, image_size=16, num_classes=5))
    images = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    inferred = model.predict(images, verbose=0)
    trained = np.asarray(model(images, training=True))
    np.testing.assert_allclose(inferred, trained, rtol=1e-5, atol=1e-5 * np.abs(trained).max())


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_int8_quantized_model_uses_its_quantized_dense_layers():
    model = _randomize(keras_vit.create_model(TINY, image_size=16, num_classes=5))
    images = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    float_logits = model.predict(images, verbose=0)
    model.quantize("int8")
    int8_logits = model.predict(images, verbose=0)
    scale = np.abs(float_logits).max()
    # int8 weights and activations: close to the float model, but not equal to it.
    assert np.abs(int8_logits - float_logits).max() < 0.05 * scale
    assert np.abs(int8_logits - float_logits).max() > 1e-4 * scale


def test_class_token_only_last_block_gives_the_same_logits_and_gradients():
    # A token-pooling classifier reads the class token alone, so its last block computes only
    # that token. Switching that off (every token through every block) must change nothing.
    import tensorflow as tf

    model = _randomize(keras_vit.create_model(TINY, image_size=16, num_classes=5))
    encoder = model.get_layer("encoder")
    assert encoder.class_token_only and tuple(encoder.output.shape) == (None, 1, 32)
    images = np.random.default_rng(1).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 3, 4])

    def logits_and_gradients():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return logits.numpy(), [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

    pruned_logits, pruned_gradients = logits_and_gradients()
    encoder.class_token_only = False
    full_logits, full_gradients = logits_and_gradients()
    np.testing.assert_allclose(pruned_logits, full_logits, rtol=1e-5, atol=1e-6)
    for variable, pruned, full in zip(model.trainable_variables, pruned_gradients, full_gradients):
        np.testing.assert_allclose(pruned, full, rtol=1e-4, atol=1e-6 * np.abs(full).max(),
                                   err_msg=variable.path)
    assert np.abs(full_gradients[-1]).max() > 0  # the head's gradient: the loss is not flat


def test_gap_pooling_and_class_token_only_false_keep_every_token():
    model = keras_vit.create_model(TINY, image_size=16, num_classes=5, pooling="gap")
    encoder = model.get_layer("encoder")
    assert not encoder.class_token_only and tuple(encoder.output.shape) == (None, 16, 32)
    model = keras_vit.create_model(TINY, image_size=16, num_classes=5, class_token_only=False)
    assert tuple(model.get_layer("encoder").output.shape) == (None, 17, 32)
    with pytest.raises(ValueError, match="class_token_only=True needs pooling='token'"):
        keras_vit.create_model(TINY, image_size=16, pooling="gap", class_token_only=True)
