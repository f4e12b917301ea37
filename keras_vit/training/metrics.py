"""Top-k accuracy that accepts int labels `(batch,)` or soft labels `(batch, K)` (mixup)."""

import keras
from keras import ops


def top_k_accuracy(y_true, y_pred, k=1):
    """Whether each example's true class is among its k largest logits.

    Args:
        y_true: int class indices `(batch,)` or `(batch, 1)`, or soft labels `(batch, K)`
            whose argmax is the true class.
        y_pred: logits or probabilities `(batch, K)`.
        k: how many of the largest count as a hit.

    Returns:
        float32 `(batch,)`: 1.0 for a hit, 0.0 otherwise.
    """
    if len(y_true.shape) == 2 and y_true.shape[-1] == y_pred.shape[-1] and y_true.shape[-1] > 1:
        y_true = ops.argmax(y_true, axis=-1)
    y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    return ops.cast(ops.in_top_k(y_true, ops.cast(y_pred, "float32"), k), "float32")


@keras.saving.register_keras_serializable(package="keras_vit")
class TopKAccuracy(keras.metrics.MeanMetricWrapper):
    """Mean top-k accuracy over all examples seen, a fraction in [0, 1].

    Args:
        k: how many of the largest logits count as a hit.
        name: the metric's name in the logs; default "top{k}" ("top1", "top5").
        dtype: the dtype of the running mean.
    """

    def __init__(self, k=1, name=None, dtype=None):
        super().__init__(top_k_accuracy, name=name or f"top{k}", dtype=dtype, k=k)
        self.k = k

    def get_config(self):
        return {"k": self.k, "name": self.name, "dtype": self.dtype}
