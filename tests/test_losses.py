"""ClassificationLoss and TopKAccuracy against NumPy formulas."""

import keras
import numpy as np
import pytest

from keras_vit.training.losses import ClassificationLoss
from keras_vit.training.metrics import TopKAccuracy

LOGITS = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], np.float32)
LABELS = np.array([0, 1], np.int32)


def numpy_softmax_xent(logits, targets):
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -(targets * log_probs).sum(-1).mean()


def numpy_sigmoid_xent(logits, targets):
    p = 1 / (1 + np.exp(-logits))
    return -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(-1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_matches_numpy(smoothing):
    targets = np.eye(3)[LABELS] * (1 - smoothing) + smoothing / 3
    loss = ClassificationLoss("softmax", 3, smoothing)(LABELS, LOGITS)
    assert float(loss) == pytest.approx(numpy_softmax_xent(LOGITS, targets), rel=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sigmoid_matches_numpy_summed_over_classes(smoothing):
    targets = np.eye(3)[LABELS] * (1 - smoothing) + smoothing / 2
    loss = ClassificationLoss("sigmoid", 3, smoothing)(LABELS, LOGITS)
    assert float(loss) == pytest.approx(numpy_sigmoid_xent(LOGITS, targets), rel=1e-5)


def test_soft_labels_equal_one_hot_and_stay_finite_for_huge_logits():
    soft = np.eye(3, dtype=np.float32)[LABELS]
    for kind in ("softmax", "sigmoid"):
        loss = ClassificationLoss(kind, 3)
        assert float(loss(soft, LOGITS)) == pytest.approx(float(loss(LABELS, LOGITS)), rel=1e-6)
        assert np.isfinite(float(loss(LABELS, LOGITS * 1e4)))


def test_keras_serialization_round_trip():
    loss = ClassificationLoss("sigmoid", 7, 0.1)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (clone.kind, clone.num_classes, clone.label_smoothing) == ("sigmoid", 7, 0.1)


def test_top_k_accuracy_int_and_soft_labels():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], np.float32)
    labels = np.array([1, 1, 0])  # right, second-best, worst
    top1, top2 = TopKAccuracy(1), TopKAccuracy(2)
    top1.update_state(labels, logits)
    top2.update_state(np.eye(3)[labels] * 0.8 + 0.1, logits)  # mixup-like soft labels
    assert float(top1.result()) == pytest.approx(1 / 3)
    assert float(top2.result()) == pytest.approx(2 / 3)


def test_rejects_unknown_kind():
    with pytest.raises(ValueError, match="loss must be one of"):
        ClassificationLoss("hinge", 3)
