"""Top-k accuracy that accepts int labels `(batch,)` or soft labels `(batch, K)` (mixup)."""

import keras
from keras import ops


def top_k_accuracy(y_true, y_pred, k=1):
    """1.0 where the true class (argmax of a soft label) is among the k largest logits."""
    if len(y_true.shape) == 2 and y_true.shape[-1] == y_pred.shape[-1] and y_true.shape[-1] > 1:
        y_true = ops.argmax(y_true, axis=-1)
    y_true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    return ops.cast(ops.in_top_k(y_true, ops.cast(y_pred, "float32"), k), "float32")


@keras.saving.register_keras_serializable(package="keras_vit")
class TopKAccuracy(keras.metrics.MeanMetricWrapper):
    """Mean top-k accuracy; name "top1" / "top5" by default."""

    def __init__(self, k=1, name=None, dtype=None):
        super().__init__(top_k_accuracy, name=name or f"top{k}", dtype=dtype, k=k)
        self.k = k

    def get_config(self):
        return {"k": self.k, "name": self.name, "dtype": self.dtype}
