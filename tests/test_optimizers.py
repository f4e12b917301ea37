"""build_optimizer: which variables decay, and gradient accumulation k x b == one batch k*b."""

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.training import ClassificationLoss, build_optimizer, no_decay_variables

TINY = keras_vit.ViTConfig(patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_vit.create_model(TINY, image_size=8, num_classes=3)


def test_no_decay_groups_are_biases_norms_and_embeddings():
    model = tiny_model()
    names = {v.path for v in no_decay_variables(model)}
    decayed = {v.path for v in model.trainable_weights} - names
    # Exactly the kernels decay (big_vision's default wd_mults ".*/kernel").
    assert decayed == {v.path for v in model.trainable_weights if v.path.endswith("/kernel")}
    assert {"class_token/token", "position_embedding/embedding",
            "encoder/block_0/attention_norm/gamma"} <= names
    assert {v.path for v in no_decay_variables(model, ("norm",))} == {
        v.path for v in model.trainable_weights if v.path.endswith(("/gamma", "/beta"))}
    with pytest.raises(ValueError, match="Unknown weight-decay exclusion group"):
        no_decay_variables(model, ("kernel",))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_decoupled_decay_skips_excluded_variables(name):
    model = tiny_model()
    before = {v.path: v.numpy().copy() for v in model.trainable_weights}
    optimizer = build_optimizer(name, 0.1, model=model, weight_decay=0.5, momentum=0.0)
    zero = [np.zeros(v.shape, np.float32) for v in model.trainable_weights]
    optimizer.apply_gradients(zip(zero, model.trainable_weights))
    for variable in model.trainable_weights:
        # Zero gradient: the only change is w -= lr * wd * w = 0.95 w on decayed kernels.
        factor = 0.95 if variable.path.endswith("/kernel") else 1.0
        np.testing.assert_allclose(variable.numpy(), before[variable.path] * factor, rtol=1e-6,
                                   err_msg=variable.path)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gradient_accumulation_matches_the_large_batch(name):
    """2 micro-batches of 4 then one update == one update on the batch of 8.

    Tolerance: rtol 1e-5 / atol 1e-6 (float32 sums in another order; clipping active).
    """
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 8).astype(np.int32)
    results = []
    for accumulation in (1, 2):
        model = tiny_model()
        optimizer = build_optimizer(name, 0.05, model=model, weight_decay=0.1, momentum=0.9,
                                    global_clipnorm=0.5, gradient_accumulation_steps=accumulation)
        model.compile(optimizer, ClassificationLoss("softmax", 3))
        model.fit(images, labels, batch_size=8 // accumulation, epochs=1, shuffle=False, verbose=0)
        assert int(optimizer.iterations.numpy()) == 1
        results.append([v.numpy() for v in model.trainable_weights])
    initial = [v.numpy() for v in tiny_model().trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(results[0], initial))  # it did train
    for large, accumulated in zip(*results):
        np.testing.assert_allclose(accumulated, large, rtol=1e-5, atol=1e-6)


def test_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("lamb", 0.1)
