"""The layers one by one: shapes, the equations they stand for, and get_config round trips."""

import math

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import layers


def assert_config_round_trip(layer, inputs, **call_kwargs):
    """Rebuilds `layer` from its serialized config, copies its weights, compares outputs."""
    expected = layer(inputs, **call_kwargs)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    clone(inputs, **call_kwargs)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(inputs, **call_kwargs), expected)
    assert clone.get_config() == layer.get_config()


def _tokens(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_patch_embedding_is_flatten_then_dense():
    layer = layers.PatchEmbedding(patch_size=4, hidden_size=6)
    images = _tokens(2, 8, 12, 3)
    output = layer(images)
    assert output.shape == (2, 6, 6)
    kernel, bias = layer.projection.kernel.numpy(), layer.projection.bias.numpy()
    patches = images.reshape(2, 2, 4, 3, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 48)
    np.testing.assert_allclose(output, patches @ kernel.reshape(48, 6) + bias, rtol=1e-5, atol=1e-5)
    assert_config_round_trip(layer, images)


def test_patch_embedding_refuses_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        layers.PatchEmbedding(4, 6)(np.zeros((1, 10, 8, 3), np.float32))


def _layer_norm_by_hand(x, gamma, beta, epsilon):
    x = x.astype(np.float64)
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered ** 2).mean(-1, keepdims=True) + epsilon) * gamma + beta


def test_layer_norm_is_keras_layer_norm_in_the_textbook_order():
    tokens = _tokens(2, 5, 8) * 3 + 7  # a mean far from 0, where the orders differ most
    layer = layers.LayerNorm(epsilon=1e-6)
    keras_layer = keras.layers.LayerNormalization(epsilon=1e-6)
    layer.build(tokens.shape)
    keras_layer.build(tokens.shape)
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)]
    layer.set_weights(weights)
    keras_layer.set_weights(weights)
    expected = _layer_norm_by_hand(tokens, *weights, 1e-6)
    np.testing.assert_allclose(layer(tokens), expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(layer(tokens), keras_layer(tokens), rtol=0, atol=1e-5)
    assert isinstance(layer, keras.layers.LayerNormalization)  # weight decay and precision rules
    assert_config_round_trip(layer, tokens)


@pytest.mark.parametrize("policy, input_dtype", [
    ("mixed_bfloat16", "float32"), ("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_layer_norm_computes_in_float32_under_mixed_precision(policy, input_dtype):
    tokens = keras.ops.cast(_tokens(2, 3, 8) * 3 + 7, input_dtype)
    layer = layers.LayerNorm(epsilon=1e-6, dtype=policy)
    outputs = layer(tokens)
    assert outputs.dtype == policy.split("_")[1] and layer.gamma.dtype == "float32"
    rounded = np.asarray(keras.ops.cast(tokens, "float32"))  # what the layer was given
    expected = _layer_norm_by_hand(rounded, np.ones(8), np.zeros(8), 1e-6)
    # Only the output's rounding (8 or 11 significant bits): the statistics are float32.
    np.testing.assert_allclose(np.asarray(keras.ops.cast(outputs, "float32")), expected,
                               rtol=0, atol=2e-2 if policy == "mixed_bfloat16" else 3e-3)


def test_layer_norm_refuses_an_axis_but_the_last():
    with pytest.raises(ValueError, match="normalizes the last axis only"):
        layers.LayerNorm(axis=1)(_tokens(2, 3, 8))
    assert layers.LayerNorm(axis=2)(_tokens(2, 3, 8)).shape == (2, 3, 8)


@pytest.mark.parametrize("options", [{"rms_scaling": True}, {"center": False}, {"scale": False}])
def test_layer_norm_refuses_the_forms_it_does_not_compute(options):
    with pytest.raises(ValueError, match="centred, scaled and shifted form only"):
        layers.LayerNorm(**options)


def test_class_token_is_prepended():
    layer = layers.ClassToken()
    tokens = _tokens(3, 5, 4)
    layer.build(tokens.shape)
    layer.token.assign(np.arange(4, dtype=np.float32).reshape(1, 1, 4))
    output = layer(tokens)
    assert output.shape == (3, 6, 4)
    np.testing.assert_array_equal(output[:, 0], np.tile(np.arange(4), (3, 1)))
    np.testing.assert_array_equal(output[:, 1:], tokens)
    assert_config_round_trip(layer, tokens)


def test_position_embedding_adds_and_round_trips():
    layer = layers.AddPositionEmbedding((2, 3), num_prefix_tokens=1)
    tokens = _tokens(2, 7, 4)
    np.testing.assert_allclose(layer(tokens) - tokens, np.broadcast_to(layer.embedding.numpy(), (2, 7, 4)), atol=1e-6)
    assert_config_round_trip(layer, tokens)
    with pytest.raises(ValueError, match="expects 7 tokens"):
        layers.AddPositionEmbedding((2, 3))(_tokens(1, 6, 4))


def test_resample_is_identity_on_the_same_grid():
    embedding = _tokens(1, 1 + 12, 5)
    np.testing.assert_array_equal(keras_vit.resample_position_embedding(embedding, (3, 4), (3, 4)), embedding)


def test_resample_is_bilinear():
    # A linear function of the grid position stays linear: with corner-aligned bilinear
    # resampling (scipy.ndimage.zoom(order=1)) new position i' sits at old i' (old-1)/(new-1).
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    grid = np.stack([2 * rows + 3 * cols, rows - cols], axis=-1)  # (4, 4, 2)
    embedding = np.concatenate([[[[7.0, -7.0]]], grid.reshape(1, 16, 2)], axis=1)
    resampled = keras_vit.resample_position_embedding(embedding, (4, 4), (7, 7), 1)
    assert resampled.shape == (1, 50, 2)
    np.testing.assert_array_equal(resampled[0, 0], [7.0, -7.0])
    new_rows, new_cols = np.meshgrid(np.arange(7.0) * 3 / 6, np.arange(7.0) * 3 / 6, indexing="ij")
    expected = np.stack([2 * new_rows + 3 * new_cols, new_rows - new_cols], axis=-1).reshape(49, 2)
    np.testing.assert_allclose(resampled[0, 1:], expected, atol=1e-5)


def test_resample_via_layer_method_without_prefix():
    layer = layers.AddPositionEmbedding((2, 2), num_prefix_tokens=0)
    layer.build((None, 4, 3))
    assert layer.resampled((4, 4)).shape == (1, 16, 3)
    with pytest.raises(ValueError, match="does not fit a 3x3 grid"):
        keras_vit.resample_position_embedding(np.zeros((1, 5, 3)), (3, 3), (4, 4), 1)


def test_attention_and_block_round_trip():
    tokens = _tokens(2, 5, 8)
    attention = layers.MultiHeadSelfAttention(num_heads=2)
    outputs, probabilities = attention(tokens, return_attention_scores=True)
    assert outputs.shape == (2, 5, 8) and probabilities.shape == (2, 2, 5, 5)
    assert_config_round_trip(attention, tokens)
    block = layers.TransformerBlock(num_heads=2, mlp_dim=16, dropout_rate=0.1, stochastic_depth_rate=0.1)
    assert block(tokens).shape == (2, 5, 8)
    assert_config_round_trip(block, tokens)
    encoder = layers.Encoder(num_layers=3, num_heads=2, mlp_dim=16, stochastic_depth_rate=0.3)
    assert [b.stochastic_depth_rate for b in encoder.blocks] == pytest.approx([0.0, 0.15, 0.3])
    assert_config_round_trip(encoder, tokens)
    pooling = layers.TokenPooling("gap")
    np.testing.assert_allclose(pooling(tokens), tokens.mean(axis=1), atol=1e-6)
    assert_config_round_trip(pooling, tokens)


def test_attention_is_softmax_of_scaled_dot_products(monkeypatch):
    # Truth: Eq. 5-8 of the paper's Appendix A in NumPy, on the layer's own fused weights, with
    # biases of order 1 (their init is zero), so a lost or wrong BiasAdd shows. Inference takes
    # the TensorFlow fast path of both Dense layers (counted), training Keras's Dense.
    tokens = _tokens(2, 5, 8)
    attention = layers.MultiHeadSelfAttention(num_heads=2)
    attention.build(tokens.shape)
    rng = np.random.default_rng(6)
    for dense in (attention.qkv, attention.out):
        dense.bias.assign(rng.normal(size=dense.bias.shape).astype(np.float32))
    qkv = tokens @ attention.qkv.kernel.numpy() + attention.qkv.bias.numpy()
    query, key, value = np.split(qkv.reshape(2, 5, 3, 2, 4), 3, axis=2)  # (B, T, 1, H, D/H)
    scores = np.einsum("bqhd,bkhd->bhqk", query[:, :, 0], key[:, :, 0]) / np.sqrt(4)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, value[:, :, 0]).reshape(2, 5, 8)
    expected = attended @ attention.out.kernel.numpy() + attention.out.bias.numpy()
    flat_calls = []
    flat_dense = layers._flat_dense_tensorflow
    monkeypatch.setattr(layers, "_flat_dense_tensorflow",
                        lambda *args, **kwargs: flat_calls.append(1) or flat_dense(*args, **kwargs))
    on_tensorflow = keras.backend.backend() == "tensorflow"
    for training in (False, True):
        flat_calls.clear()
        outputs, probabilities = attention(tokens, training=training, return_attention_scores=True)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(probabilities, weights, rtol=1e-5, atol=1e-6)
        first = attention(tokens, training=training, first_query_only=True)
        np.testing.assert_allclose(first, expected[:, :1], rtol=1e-5, atol=1e-5)
        assert len(flat_calls) == (4 if on_tensorflow and not training else 0)
    if on_tensorflow:  # The fast path with batch and tokens unknown when traced.
        import tensorflow as tf

        traced = tf.function(lambda x: attention(x, training=False),
                             input_signature=[tf.TensorSpec((None, None, 8), tf.float32)])
        np.testing.assert_allclose(traced(tokens), expected, rtol=1e-5, atol=1e-5)


def test_mlp_block_is_dense_gelu_dense():
    # Truth: Eq. 3's MLP written out in NumPy, with the tanh GELU of flax.linen.gelu (default)
    # and the exact erf GELU (approximate=False).
    tokens = _tokens(2, 5, 8)
    for approximate in (True, False):
        mlp = layers.MlpBlock(mlp_dim=16, approximate=approximate)
        mlp.build(tokens.shape)
        # Biases of order 1 (their init is N(0, 1e-6)), so a lost or wrong BiasAdd shows.
        rng = np.random.default_rng(5)
        for dense in (mlp.dense_1, mlp.dense_2):
            dense.bias.assign(rng.normal(size=dense.bias.shape).astype(np.float32))
        inferred = np.asarray(mlp(tokens))  # On TensorFlow: the fused MatMul, BiasAdd (+ GELU).
        hidden = tokens @ mlp.dense_1.kernel.numpy() + mlp.dense_1.bias.numpy()
        if approximate:
            gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden ** 3)))
        else:
            gelu = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / np.sqrt(2)))
        expected = gelu @ mlp.dense_2.kernel.numpy() + mlp.dense_2.bias.numpy()
        np.testing.assert_allclose(inferred, expected, rtol=1e-5, atol=1e-6)
        # Training takes Keras's Dense and the float32 GELU (no dropout here).
        np.testing.assert_allclose(mlp(tokens, training=True), expected, rtol=1e-5, atol=1e-6)
        assert_config_round_trip(mlp, tokens)


def test_stochastic_depth_drops_whole_examples():
    layer = layers.StochasticDepth(0.25, seed=3)
    inputs = np.ones((4000, 3, 2), np.float32)
    np.testing.assert_array_equal(layer(inputs), inputs)  # inference: identity
    dropped = np.asarray(layer(inputs, training=True))
    per_example = dropped.reshape(4000, -1)
    # Each example is all zeros or all 1 / (1 - 0.25).
    assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
    assert abs(dropped.mean() - 1.0) < 0.05  # expectation kept
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layers.StochasticDepth(1.0)
