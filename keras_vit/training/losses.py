"""Classification losses of the paper: softmax or sigmoid cross-entropy, with label smoothing.

The paper pre-trains with sigmoid cross-entropy (one independent binary problem per class,
big_vision's `sigmoid_xent`: summed over classes, averaged over the batch) and fine-tunes with
softmax cross-entropy. Labels may be int class indices `(batch,)` or soft labels
`(batch, num_classes)` (mixup); logits are cast to float32 so the loss is float32 under any
mixed-precision policy.
"""

import keras
from keras import ops

LOSSES = ("softmax", "sigmoid")


def to_dense_labels(labels, num_classes):
    """Labels as float32 class probabilities.

    Args:
        labels: int class indices `(batch,)` or `(batch, 1)`, or soft labels
            `(batch, num_classes)` (mixup).
        num_classes: K, the number of classes.

    Returns:
        float32 `(batch, K)`: one-hot rows for indices, soft labels unchanged but cast.
    """
    if len(labels.shape) == 2 and labels.shape[-1] == num_classes:
        return ops.cast(labels, "float32")
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    return ops.one_hot(labels, num_classes, dtype="float32")


@keras.saving.register_keras_serializable(package="keras_vit")
class ClassificationLoss(keras.losses.Loss):
    """Softmax or sigmoid cross-entropy from logits, with label smoothing.

    Called with labels (int `(batch,)` or soft `(batch, K)`) and logits `(batch, K)`, it
    returns float32 `(batch,)` per example, which Keras reduces to the batch mean.

    Args:
        kind: "softmax" or "sigmoid".
        num_classes: K, the width of the logits `(batch, K)`.
        label_smoothing: eps in [0, 1); targets become `y * (1 - eps) + eps / K` for softmax
            and `y * (1 - eps) + eps / 2` for sigmoid (Keras's conventions).
        name, reduction, dtype: as for `keras.losses.Loss`.

    Raises:
        ValueError: `kind` is not one of LOSSES, or `label_smoothing` is outside [0, 1).
    """

    def __init__(self, kind="softmax", num_classes=1000, label_smoothing=0.0, name=None,
                 reduction="sum_over_batch_size", dtype=None):
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        super().__init__(name=name or f"{kind}_cross_entropy", reduction=reduction, dtype=dtype)
        self.kind = kind
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        targets = to_dense_labels(y_true, self.num_classes)
        eps = self.label_smoothing
        if self.kind == "softmax":
            if eps:
                targets = targets * (1.0 - eps) + eps / self.num_classes
            return -ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1)
        if eps:
            targets = targets * (1.0 - eps) + eps / 2.0
        # log(sigmoid(z)) = -softplus(-z), log(1 - sigmoid(z)) = -softplus(z): stable for any z.
        per_class = targets * ops.softplus(-logits) + (1.0 - targets) * ops.softplus(logits)
        return ops.sum(per_class, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(kind=self.kind, num_classes=self.num_classes,
                      label_smoothing=self.label_smoothing)
        return config
