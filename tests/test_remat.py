"""Rematerialised encoder blocks (`create_model(remat=True)`): the same loss, gradients and
weights as without, on TensorFlow and JAX, with dropout and drop path; the block really runs
twice per training step; a saved model keeps it and predicts the same.

The truth each test compares with is the same model without remat (same initial weights and
seed states): rematerialisation may change memory and time, nothing else.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit import layers
from keras_vit.model import model_options, set_remat
from vit_reference import random_checkpoint, random_images

TINY = "d32_l2_h4_m64_p4"  # hidden 32, 2 blocks, 4 heads, MLP 64, patch 4
RANDOM_LAYERS = dict(dropout_rate=0.2, attention_dropout_rate=0.1, stochastic_depth_rate=0.3)


def _model(remat, seed=3, **arguments):
    keras.utils.set_random_seed(seed)
    return keras_vit.create_model(TINY, image_size=16, num_classes=5, remat=remat, **arguments)


def _loss_and_gradients(model, images, labels):
    """A tf.function training-mode forward and backward pass, as `fit`'s train step runs it."""

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, gradients = step(images, labels)
    return float(loss), [np.asarray(g) for g in gradients]


def _assert_equal_to_rounding(actual, expected):
    """Equal up to float32 rounding: recomputation may order the same arithmetic differently
    (TensorFlow's graph optimizer rewrites a recomputed block's ops separately), so an element
    may move by a few 1e-6 of the array's largest magnitude, however small it is itself (1.4e-6
    measured on an AVX2 CPU). A recomputation that drew other dropout masks moves every
    gradient here by 0.33-1.6 of that magnitude (measured), far beyond 1e-5 of it."""
    expected = np.asarray(expected)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _data(batch=4):
    labels = np.arange(batch, dtype=np.int32) % 5
    return random_images(batch, 16), labels


@pytest.mark.parametrize("regularisation", [{}, RANDOM_LAYERS], ids=["plain", "dropout_drop_path"])
def test_remat_gives_the_same_loss_and_gradients(regularisation):
    images, labels = _data()
    # The head is zero-initialised, which would leave the encoder's gradients zero.
    results = {}
    for remat in (False, True):
        model = _model(remat, **regularisation)
        model.get_layer("head").kernel.assign(
            np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32))
        # Two steps: the second starts from the seed states the first left behind.
        results[remat] = [_loss_and_gradients(model, images, labels) for _ in range(2)]
        results[remat, "seeds"] = [np.asarray(v) for v in model.non_trainable_variables]
    for (loss, gradients), (remat_loss, remat_gradients) in zip(results[False], results[True]):
        assert remat_loss == pytest.approx(loss, rel=1e-5)
        assert any(np.abs(g).max() > 0 for g in gradients[:-2])  # the encoder gets a gradient
        for expected, actual in zip(gradients, remat_gradients):
            _assert_equal_to_rounding(actual, expected)
    for expected, actual in zip(results[False, "seeds"], results[True, "seeds"]):
        np.testing.assert_array_equal(actual, expected)


def test_fit_with_remat_gives_the_same_weights():
    images, labels = _data(8)
    weights = {}
    for remat in (False, True):
        model = _model(remat, **RANDOM_LAYERS)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(images, labels, batch_size=4, epochs=2, shuffle=False, verbose=0)
        weights[remat] = model.get_weights()
    assert not np.array_equal(weights[False][-2], np.zeros_like(weights[False][-2]))  # it trained
    for expected, actual in zip(weights[False], weights[True]):
        _assert_equal_to_rounding(actual, expected)


def test_each_block_runs_again_in_the_backward_pass(monkeypatch):
    # The property that makes remat save memory: the backward pass recomputes each block
    # from its input. Eager, so a Python counter sees every run of TransformerBlock.call.
    calls = []
    original = layers.TransformerBlock.call

    def counting_call(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layers.TransformerBlock, "call", counting_call)
    images, labels = _data()
    for remat, runs_per_block in ((False, 1), (True, 2)):
        model = _model(remat)
        calls.clear()
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True))
        tape.gradient(loss, model.trainable_variables)
        assert sorted(calls) == sorted(["block_0", "block_1"] * runs_per_block), remat
        calls.clear()
        model(images, training=False)  # inference never rematerialises
        assert sorted(calls) == ["block_0", "block_1"]


def test_remat_is_not_an_architecture_option_and_a_saved_model_keeps_it(tmp_path):
    model = _model(True)
    assert model_options(model) == model_options(_model(False))
    images = random_images(3, 16)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("encoder").remat
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert not set_remat(loaded, False).get_layer("encoder").remat


def test_create_model_from_weights_with_remat(tmp_path):
    checkpoint = str(tmp_path / "ckpt.npz")
    np.savez(checkpoint, **random_checkpoint(4, 32, 2, 4, 64, grid=4))
    plain = keras_vit.create_model("d32_l2_h4_m64_p4", weights=checkpoint)
    remat = keras_vit.create_model("d32_l2_h4_m64_p4", weights=checkpoint, remat=True)
    assert remat.get_layer("encoder").remat and not plain.get_layer("encoder").remat
    images, labels = _data()
    loss, gradients = _loss_and_gradients(plain, images, labels % 5)
    remat_loss, remat_gradients = _loss_and_gradients(remat, images, labels % 5)
    assert remat_loss == pytest.approx(loss, rel=1e-5)
    for expected, actual in zip(gradients, remat_gradients):
        _assert_equal_to_rounding(actual, expected)


_JAX_SCRIPT = """
import json, sys
import jax
import keras
import numpy as np
import keras_vit
assert keras.backend.backend() == "jax", keras.backend.backend()
images = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
labels = np.arange(4) % 5
results = {}
for remat in (False, True):
    keras.utils.set_random_seed(3)
    model = keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16, num_classes=5, remat=remat,
                                   dropout_rate=0.2, attention_dropout_rate=0.1,
                                   stochastic_depth_rate=0.3)
    model.get_layer("head").kernel.assign(
        np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32))
    trainable = [v.value for v in model.trainable_variables]
    seeds = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable, seeds):
        logits, seeds = model.stateless_call(trainable, seeds, images, training=True)
        log_p = jax.nn.log_softmax(logits)
        return -log_p[np.arange(4), labels].mean(), seeds

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    out = []
    for _ in range(2):
        (loss, seeds), grads = step(trainable, seeds)
        out.append([float(loss)] + [np.asarray(g).ravel().tolist() for g in grads])
    results[str(remat)] = out
json.dump(results, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_remat_gives_the_same_gradients_on_jax(tmp_path):
    pytest.importorskip("jax", reason="jax is a test extra: pip install -e '.[test]'")
    output = tmp_path / "grads.json"
    environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _JAX_SCRIPT, str(output)], env=environment,
                   check=True, capture_output=True, timeout=300)
    results = json.loads(output.read_text())
    for plain, remat in zip(results["False"], results["True"]):
        assert remat[0] == pytest.approx(plain[0], rel=1e-5)
        for expected, actual in zip(plain[1:], remat[1:]):
            _assert_equal_to_rounding(actual, expected)


def test_from_checkpoint_with_remat(tmp_path):
    checkpoint = str(tmp_path / "ckpt.npz")
    np.savez(checkpoint, **random_checkpoint(4, 32, 2, 4, 64, grid=4))
    plain = keras_vit.from_checkpoint(checkpoint)
    remat = keras_vit.from_checkpoint(checkpoint, remat=True, stochastic_depth_rate=0.0)
    assert remat.get_layer("encoder").remat and not plain.get_layer("encoder").remat
    images, labels = _data()
    loss, gradients = _loss_and_gradients(plain, images, labels)
    remat_loss, remat_gradients = _loss_and_gradients(remat, images, labels)
    assert remat_loss == pytest.approx(loss, rel=1e-5)
    for expected, actual in zip(gradients, remat_gradients):
        _assert_equal_to_rounding(actual, expected)
