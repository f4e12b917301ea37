"""Evaluating and exporting the EMA of the weights that the optimizer keeps.

`build_optimizer(ema_decay=...)` turns on Keras's optimizer EMA (one moving-average optimizer
variable per trainable variable, stepped once per update: `fused_optimizers`). Those averages
are optimizer variables, so `model.save_weights` and the backups of `backup.py` hold them and a
resumed run continues the same average. This module puts them to use:

  - `ema_weights(model)`: a context in which the model's trainable variables hold the EMA;
  - `evaluate_with_ema(model, data)`: `model.evaluate` inside it;
  - `EmaEvaluation`: a `fit` callback adding `val_<metric>_ema` beside each `val_<metric>`
    (DeiT and timm validate the EMA model beside the raw one: timm train.py's
    `eval_metrics_ema`);
  - `copy_ema_into_model(model)`: the EMA becomes the weights (--export_ema).

As in Keras's `SwapEMAWeights` (keras/src/callbacks/swap_ema_weights.py) the values are swapped
between the optimizer's `_trainable_variables` and `_model_variables_moving_average`; here the
raw weights wait in host memory (one copy of the trainable weights, 344 MB for ViT-B/16) and an
exception inside the context still restores them. Assignments run in the cross-replica
context, where a `tf.distribute` variable takes the value on every replica.
"""

import contextlib

import keras
import numpy as np

from pipelines.errors import UserError


class EmaError(UserError):
    """The model's optimizer keeps no EMA of the weights (or has not been built)."""


def _ema_optimizer(model):
    """The optimizer holding the EMA (inside a `LossScaleOptimizer` for float16)."""
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if optimizer is None or not getattr(optimizer, "use_ema", False):
        raise EmaError(
            f"model {model.name!r} has no EMA of its weights: compile it with an optimizer of "
            "use_ema=True (keras_vit.training.build_optimizer(..., ema_decay=0.9999), "
            "--ema_decay in tools/train.py).")
    if not optimizer.built:
        raise EmaError(f"the optimizer of {model.name!r} is not built, so it holds no EMA yet: "
                       "train first (or call model.optimizer.build(model.trainable_variables) "
                       "and load a state).")
    return optimizer


def _pairs(model):
    """(trainable variable, its moving average) of each averaged variable of `model`."""
    optimizer = _ema_optimizer(model)
    return [(variable, average) for variable, average in
            zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)
            if average is not None]


@contextlib.contextmanager
def ema_weights(model):
    """A context in which `model`'s trainable variables hold the optimizer's EMA values.

    The raw values come back on exit, also when the body raises. Call outside a replica
    context (as Keras calls callbacks), under any strategy.

    Raises:
        EmaError: the optimizer keeps no EMA.
    """
    pairs = _pairs(model)
    raw = [keras.ops.convert_to_numpy(variable) for variable, _ in pairs]
    try:
        for variable, average in pairs:
            variable.assign(average)
        yield model
    finally:
        for (variable, _), value in zip(pairs, raw):
            variable.assign(value)


def evaluate_with_ema(model, data, **evaluate_kwargs):
    """`model.evaluate(data, return_dict=True, **evaluate_kwargs)` with the EMA weights.

    Args:
        model: a compiled model whose optimizer keeps an EMA.
        data: a dataset (distributed or not) of (inputs, labels), or an (inputs, labels) or
            (inputs, labels, sample weights) tuple, as `fit`'s `validation_data`.
        **evaluate_kwargs: for `model.evaluate` (verbose, steps, callbacks, batch_size).

    Returns:
        evaluate's dict of metrics {name: float}, such as {"loss": ..., "top1": ...}.

    Raises:
        EmaError: the optimizer keeps no EMA.
    """
    evaluate_kwargs["return_dict"] = True
    arrays = (dict(zip(("x", "y", "sample_weight"), data)) if isinstance(data, tuple)
              else {"x": data})
    with ema_weights(model):
        return model.evaluate(**arrays, **evaluate_kwargs)


def copy_ema_into_model(model):
    """Makes the EMA values the model's trainable weights, for good (--export_ema).

    Raises:
        EmaError: the optimizer keeps no EMA.
    """
    for variable, average in _pairs(model):
        variable.assign(average)


def ema_values(model):
    """{variable.path: NumPy array of its EMA} of each averaged trainable variable."""
    return {variable.path: keras.ops.convert_to_numpy(average)
            for variable, average in _pairs(model)}


class EmaEvaluation(keras.callbacks.Callback):
    """Adds `val_<name>_ema` to the epoch logs: the validation metrics of the EMA weights.

    At the end of each epoch whose logs hold `val_*` entries (`fit` validated) and that
    `validation_freq` selects, evaluates the model on `eval_data` with the EMA weights and
    adds `val_<name>_ema` for each metric evaluate returns (val_loss_ema, val_top1_ema, ...).
    Put it before TensorBoard, CSVLogger and the like in the callback list: they read the logs
    after it.

    Args:
        eval_data: what `fit` validates on (a dataset, distributed or not).
        validation_freq: an int n (every n-th epoch, as `fit`'s) or a collection of 1-based
            epoch numbers.
        verbose: `evaluate`'s verbosity.
        evaluate_callbacks: callbacks for that `evaluate` (e.g. the engine's
            `QuietEndOfEvaluationData`).

    Raises (at the first evaluation):
        EmaError: the optimizer keeps no EMA.
    """

    def __init__(self, eval_data, validation_freq=1, verbose=0, evaluate_callbacks=None):
        super().__init__()
        self.eval_data = eval_data
        self.validation_freq = validation_freq
        self.verbose = verbose
        self.evaluate_callbacks = list(evaluate_callbacks or [])

    def _selected(self, epoch):
        if isinstance(self.validation_freq, int):
            return (epoch + 1) % self.validation_freq == 0
        return epoch + 1 in self.validation_freq

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._selected(epoch):
            return
        if not any(name.startswith("val_") for name in logs):
            return
        results = evaluate_with_ema(self.model, self.eval_data, verbose=self.verbose,
                                    callbacks=self.evaluate_callbacks)
        logs.update({f"val_{name}_ema": float(np.asarray(value))
                     for name, value in results.items()})
