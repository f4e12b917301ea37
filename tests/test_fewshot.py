"""keras_vit.fewshot: big_vision's few-shot least squares, the logistic-regression probe and
feature extraction.

Truths: features built to be linearly separable (accuracy 1.0); random features with random
labels, whose test accuracy is Binomial(T, 1/C) / T whatever the classifier (chance within 4
binomial standard deviations); `numpy.linalg.lstsq` on the ridge-augmented system for the
closed-form weights, both eigendecomposition branches; a hand rerun of
`default_rng(seed).permutation` per class for the shots; the Bayes accuracy of two Gaussian
blobs for the probe; and the Keras model called directly for the features.
"""

import logging
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import norm

import keras_vit
from keras_vit import fewshot
from keras_vit.fewshot import FewshotError


def _separable(num_examples, num_classes, seed):
    """Class c at +10 in dimension c of num_classes, plus N(0, 0.1^2) noise everywhere."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_examples)
    features = rng.normal(0.0, 0.1, (num_examples, num_classes))
    features[np.arange(num_examples), labels] += 10.0
    return features.astype(np.float32), labels


def _random(num_examples, dim, num_classes, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_examples, dim)), rng.integers(0, num_classes, num_examples)


def _chance_margin(num_classes, num_test):
    """4 binomial standard deviations of one seed's accuracy (the mean's is no larger)."""
    p = 1.0 / num_classes
    return 4.0 * math.sqrt(p * (1.0 - p) / num_test)


# --- Few-shot accuracy --------------------------------------------------------------------------


def test_separable_features_are_classified_perfectly_at_every_shot_count():
    train = _separable(300, 5, seed=0)
    test = _separable(200, 5, seed=1)
    result = fewshot.fewshot_accuracies(*train, *test)
    assert result.accuracy == {1: 1.0, 5: 1.0, 10: 1.0, 25: 1.0}
    assert {k: len(v) for k, v in result.per_seed.items()} == {1: 3, 5: 3, 10: 3, 25: 3}
    assert (result.num_train, result.num_test, result.num_classes) == (300, 200, 5)


@pytest.mark.parametrize("dim", [16, 200])  # 1- to 25-shot: N > D and D > N (200 > 100).
def test_random_features_and_labels_score_chance(dim):
    num_classes, num_test = 4, 1000
    train = _random(500, dim, num_classes, seed=2)
    test = _random(num_test, dim, num_classes, seed=3)
    result = fewshot.fewshot_accuracies(*train, *test)
    margin = _chance_margin(num_classes, num_test)
    for shots, accuracy in result.accuracy.items():
        assert abs(accuracy - 1 / num_classes) < margin, (shots, accuracy, margin)


def _ridge_lstsq(features, labels, num_classes, l2_reg):
    """Independent truth: the whitened features plus a 100.0 column, stacked over sqrt(l2) I,
    solved by least squares against the {-1, +1} targets over zeros (the bias regularised)."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-5
    x = np.hstack([(features - mean) / std, np.full((len(features), 1), 100.0)])
    y = np.where(labels[:, None] == np.arange(num_classes)[None, :], 1.0, -1.0)
    a = np.vstack([x, math.sqrt(l2_reg) * np.eye(x.shape[1])])
    b = np.vstack([y, np.zeros((x.shape[1], num_classes))])
    weights = np.linalg.lstsq(a, b, rcond=None)[0]
    return weights, lambda t: np.hstack([(t - mean) / std, np.full((len(t), 1), 100.0)])


@pytest.mark.parametrize("num_points,dim", [(60, 7), (9, 40)], ids=["N>=D", "D>N"])
@pytest.mark.parametrize("l2_reg", [fewshot.DEFAULT_L2_REG, 0.5])
def test_weights_and_predictions_equal_lstsq_on_the_augmented_system(num_points, dim, l2_reg):
    num_classes = 3
    features, labels = _random(num_points, dim, num_classes, seed=4)
    features = features * np.linspace(0.5, 3.0, dim) + np.linspace(-2, 2, dim)
    cache = fewshot.lsr_cache(features, labels, num_classes)
    assert cache["eigs"].shape == ((dim + 1,) if num_points >= dim + 1 else (num_points,))
    truth, augment = _ridge_lstsq(features, labels, num_classes, l2_reg)
    np.testing.assert_allclose(fewshot.lsr_weights(cache, l2_reg), truth, rtol=1e-7,
                               atol=1e-10 * np.abs(truth).max())
    test_features, _ = _random(50, dim, num_classes, seed=5)
    predicted = np.argmax(augment(test_features) @ truth, axis=1)
    assert fewshot.lsr_accuracy(cache, test_features, predicted, l2_reg) == 1.0
    other = (predicted + (np.arange(50) % 3 == 0)) % num_classes  # Every third one wrong.
    assert fewshot.lsr_accuracy(cache, test_features, other, l2_reg) == np.mean(
        other == predicted)


def test_shot_selection_equals_a_hand_rerun_of_default_rng_per_class():
    # Class 2 has 3 examples (short of 5 shots); class 3 has none, so the classes after it
    # follow a gap, as in big_vision's loop over range(num_classes).
    labels = np.array([0] * 9 + [1] * 7 + [2] * 3 + [4] * 6)
    np.random.default_rng(0).shuffle(labels)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(5)]
        for shots in (1, 5):
            expected = np.concatenate([p[:shots] for p in per_class])
            np.testing.assert_array_equal(
                fewshot.select_shots(labels, shots, seed, num_classes=5), expected)
    assert len(fewshot.select_shots(labels, 5, 0, 5)) == 5 + 5 + 3 + 0 + 5


def test_fewshot_accuracies_score_the_hand_drawn_shots_per_seed():
    features, labels = _random(80, 6, 4, seed=6)
    test_features, test_labels = _random(40, 6, 4, seed=7)
    result = fewshot.fewshot_accuracies(features, labels, test_features, test_labels,
                                        shots=(2, 6), seeds=2, l2_reg=3.0)
    for shots in (2, 6):
        for seed in range(2):
            rng = np.random.default_rng(seed)
            index = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots]
                                    for c in range(4)])
            truth, augment = _ridge_lstsq(features[index], labels[index], 4, 3.0)
            expected = np.mean(np.argmax(augment(test_features) @ truth, axis=1) == test_labels)
            assert result.per_seed[shots][seed] == expected
        assert result.accuracy[shots] == np.mean(result.per_seed[shots])


def test_a_short_class_is_named_in_one_warning(caplog):
    labels = np.array([0] * 30 + [1] * 30 + [2] * 4)
    features = np.random.default_rng(8).normal(size=(len(labels), 5))
    with caplog.at_level(logging.WARNING, logger="absl"):
        fewshot.fewshot_accuracies(features, labels, features, labels, shots=(1, 5, 10),
                                   seeds=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "class 2 has 4" in warnings[0] and "10 shots" in warnings[0]


def test_num_classes_defaults_to_the_largest_label_of_either_set():
    train = _separable(100, 3, seed=9)
    test_features = np.zeros((2, 3))
    result = fewshot.fewshot_accuracies(*train, test_features, np.array([0, 5]), shots=(1,),
                                        seeds=1)
    assert result.num_classes == 6


def _arrays(n=10, d=4):
    return np.ones((n, d)), np.zeros(n, np.int64)


@pytest.mark.parametrize("change,found", [
    (dict(train_features=np.zeros((0, 4)), train_labels=np.zeros(0, np.int64)), "(0, 4)"),
    (dict(train_labels=np.zeros(9, np.int64)), "(9,)"),
    (dict(test_features=np.ones((10, 5))), "4 dimensions, test features 5"),
    (dict(shots=(1, 0)), "(1, 0)"),
    (dict(shots=(2.5,)), "2.5"),
    (dict(seeds=0), "found 0"),
    (dict(l2_reg=0.0), "found 0.0"),
    (dict(l2_reg=float("nan")), "found nan"),
    (dict(train_features=np.full((10, 4), np.nan)), "10 of 10 examples"),
    (dict(test_labels=np.full(10, -1)), "found -1"),
    (dict(test_labels=np.full(10, 0.5)), "dtype float64"),
    (dict(num_classes=1, test_labels=np.ones(10, np.int64)), "[0, 1), found 1..1"),
])
def test_unusable_inputs_raise_a_fewshot_error_naming_what_was_found(change, found):
    arguments = dict(zip(["train_features", "train_labels"], _arrays()))
    arguments.update(zip(["test_features", "test_labels"], _arrays()))
    arguments.update(change)
    with pytest.raises(FewshotError) as error:
        fewshot.fewshot_accuracies(**arguments)
    assert found in str(error.value)
    assert isinstance(error.value, keras_vit.UserError)


# --- Linear probe -------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features():
    assert fewshot.linear_probe(*_separable(300, 5, 0), *_separable(200, 5, 1)) == 1.0


def _blobs(num_examples, seed, offset=0.4, dim=10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num_examples)
    return rng.normal(size=(num_examples, dim)) + offset * (2 * labels[:, None] - 1), labels


def test_linear_probe_on_two_gaussian_blobs_reaches_the_bayes_accuracy():
    # Means +-0.4 in each of 10 unit-variance dimensions: the best rule has accuracy
    # Phi(distance / 2) = Phi(0.4 sqrt(10)) = 0.897; chance is 0.5.
    bayes = norm.cdf(0.4 * math.sqrt(10))
    num_test = 2000
    accuracy = fewshot.linear_probe(*_blobs(1000, 10), *_blobs(num_test, 11))
    sampling = 4 * math.sqrt(bayes * (1 - bayes) / num_test)
    assert bayes - sampling - 0.02 < accuracy < bayes + sampling, (accuracy, bayes)


def test_linear_probe_on_random_labels_scores_chance():
    train, test = _random(500, 16, 4, seed=12), _random(1000, 16, 4, seed=13)
    assert abs(fewshot.linear_probe(*train, *test) - 0.25) < _chance_margin(4, 1000)


def test_linear_probe_refuses_a_single_class_and_bad_settings():
    features, labels = _arrays()
    with pytest.raises(FewshotError, match="at least 2 classes"):
        fewshot.linear_probe(features, labels, features, labels)
    train = _separable(20, 2, 0)
    with pytest.raises(FewshotError, match="c must be > 0"):
        fewshot.linear_probe(*train, *train, c=0.0)
    with pytest.raises(FewshotError, match="max_iter"):
        fewshot.linear_probe(*train, *train, max_iter=0)


# --- Features from a model ----------------------------------------------------------------------


def _dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2, 2, 3))
    return keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(inputs)))


def _assert_equal_to_rounding(actual, expected):
    """Equal up to float32 rounding of the largest feature: a batch cut to 3 runs other matmul
    kernels than one of 4 or 7, so a feature near zero may move by ~1e-8 of the row's largest
    (features here reach 440; one 0.4905 moved by 7.6e-6 on an AVX2 CPU)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-6,
                               atol=1e-6 * float(np.abs(expected).max()))


def _image_batches(num_examples=10, batch_size=4, num_classes=3):
    rng = np.random.default_rng(14)
    images = rng.uniform(0, 255, (num_examples, 2, 2, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, num_examples)
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    dataset = tf.data.Dataset.from_tensor_slices((images, one_hot)).batch(batch_size)
    return images, labels, dataset


def test_extract_features_equals_the_model_and_the_argmax_labels(caplog):
    model = _dense_model()
    images, labels, dataset = _image_batches()
    with caplog.at_level(logging.INFO, logger="absl"):  # whatever verbosity another test left
        features, found = fewshot.extract_features(model, dataset, log_every=1)
    assert features.dtype == np.float32 and found.dtype == np.int64
    _assert_equal_to_rounding(features, keras.ops.convert_to_numpy(model(images)))
    np.testing.assert_array_equal(found, labels)
    assert any("images/s" in r.getMessage() for r in caplog.records)


def test_extract_features_stops_after_max_examples_cutting_the_last_batch():
    model = _dense_model()
    images, labels, dataset = _image_batches()
    features, found = fewshot.extract_features(model, dataset, max_examples=7)
    _assert_equal_to_rounding(features, keras.ops.convert_to_numpy(model(images[:7])))
    np.testing.assert_array_equal(found, labels[:7])


def test_extract_features_runs_a_callable_in_inference_mode_on_int_labels():
    calls = []

    def feature_fn(images, training):
        calls.append(training)
        return np.asarray(images).reshape(len(images), -1)[:, :3]

    batches = [(np.full((2, 1, 4), i, np.float32), np.array([i, i + 1])) for i in range(3)]
    features, labels = fewshot.extract_features(feature_fn, batches)
    assert calls == [False] * 3
    np.testing.assert_array_equal(features[:, 0], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(labels, [0, 1, 1, 2, 2, 3])


def test_extract_features_of_a_tiny_vit_equals_its_pre_logits_extractor():
    config = keras_vit.ViTConfig(patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                                 mlp_dim=32)
    keras.utils.set_random_seed(15)
    model = keras_vit.create_model(config, image_size=8, num_classes=3)
    extractor = keras_vit.feature_extractor(model, output="pre_logits")
    images = np.random.default_rng(16).uniform(0, 255, (5, 8, 8, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.arange(5) % 3)).batch(2)
    features, labels = fewshot.extract_features(extractor, dataset)
    assert features.shape == (5, 16)
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(extractor(images)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(5) % 3)


def test_extract_features_refuses_token_and_multiple_outputs_naming_pre_logits():
    inputs = keras.Input((4, 3))
    tokens = keras.Model(inputs, keras.layers.Dense(5)(inputs))  # (batch, 4, 5)
    two = keras.Model(inputs, [keras.layers.Flatten()(inputs), keras.layers.Flatten()(inputs)])
    batches = [(np.zeros((2, 4, 3), np.float32), np.zeros(2, np.int64))]
    for model, found in [(tokens, "(None, 4, 5)"), (two, "2 outputs"),
                         (lambda x, training: np.zeros((2, 4, 5)), "(2, 4, 5)")]:
        with pytest.raises(FewshotError) as error:
            fewshot.extract_features(model, batches)
        assert found in str(error.value) and 'output="pre_logits"' in str(error.value)


@pytest.mark.parametrize("batches,kwargs,found", [
    ([], {}, "no examples"),
    ([(np.zeros((2, 2, 2, 3)), np.zeros((2, 1)))], {}, "(2, 1)"),
    ([(np.zeros((2, 2, 2, 3)), np.zeros(3, np.int64))], {}, "2 images but 3 labels"),
    ([np.zeros((2, 2, 2, 3))], {}, "(images, labels) pairs"),
    ([(np.zeros((2, 2, 2, 3)), np.zeros(2, np.int64))], dict(max_examples=0), "found 0"),
])
def test_extract_features_refuses_unusable_datasets(batches, kwargs, found):
    with pytest.raises(FewshotError) as error:
        fewshot.extract_features(_dense_model(), batches, **kwargs)
    assert found in str(error.value)
