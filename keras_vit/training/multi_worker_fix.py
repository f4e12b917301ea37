"""A workaround for the Keras bug that breaks `Model.fit` under MultiWorkerMirroredStrategy.

keras-team/keras#20585: `Model.fit` under MultiWorkerMirroredStrategy fails twice in Keras 3:
1. `_maybe_symbolic_build` takes the first batch and all-reduces it with
   `strategy.reduce("MEAN", batch)` in eager mode; the collective cross-device ops cannot
   convert the PerReplica value ("ValueError: Attempt to convert a value (PerReplica...) to a
   Tensor"). The batch is only used for its shapes and dtypes: we build from the local
   replica's batch instead.
2. the train/test step reduces its scalar logs (loss, metrics) with
   `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar ("Invalid reduction
   dimension 0 for input with 0 dimensions"); we reduce scalars with axis=None, the mean over
   replicas that MirroredStrategy gets.
Applied to the Keras versions known to have the bug; tests/test_strategy_multi_worker.py fails
when a newer Keras still has it (extend the range) or when this one no longer has it.
"""

import types

import keras
import tensorflow as tf

from keras_vit.training.strategy import is_multi_worker

#: (major, minor) of the first and the last Keras release known to have the bug, inclusive.
FIT_BUG_KERAS_VERSIONS = ((3, 0), (3, 15))


def keras_has_fit_bug(version=None):
    """Whether a Keras version is one of FIT_BUG_KERAS_VERSIONS.

    Args:
        version: a Keras version string such as "3.15.1"; None = the installed Keras.

    Returns:
        True when its (major, minor) is in the FIT_BUG_KERAS_VERSIONS range.
    """
    version = version or keras.version()
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    first, last = FIT_BUG_KERAS_VERSIONS
    return first <= major_minor <= last


def _local_symbolic_build(self, iterator=None, data_batch=None):
    """`Trainer._maybe_symbolic_build` building from this worker's first replica's batch."""
    strategy = self.distribute_strategy
    if iterator is not None:
        for _, _, batches in iterator:
            batch = next(batches)
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues) else value,
                batch,
            )
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _install_scalar_reduction_fix():
    """Wraps Keras's TF `reduce_per_replica` so multi-worker scalar logs reduce with axis=None."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_keras_vit_fix", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if not (is_multi_worker(strategy) and reduction in ("auto", "mean")):
            return original(values, strategy, reduction)

        def reduce(value):
            # With one replica per worker the step's outputs are plain tensors, not PerReplica.
            local = value
            if isinstance(value, tf.distribute.DistributedValues):
                local = strategy.experimental_local_results(value)[0]
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    reduce_per_replica._keras_vit_fix = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def fix_multi_worker_fit(model, strategy, force=None):
    """Makes `model.fit/evaluate` work under MultiWorkerMirroredStrategy (keras#20585).

    Only for a multi-worker strategy on an affected Keras version: replaces
    `_maybe_symbolic_build` on this model object, and wraps Keras's `reduce_per_replica` (a
    no-op for every other strategy).

    Args:
        model: the compiled `keras.Model` about to be fit.
        strategy: the `tf.distribute.Strategy` it was built under.
        force: True or False overrides the Keras version check; None = `keras_has_fit_bug()`.

    Returns:
        True when the workaround was applied.
    """
    needed = keras_has_fit_bug() if force is None else force
    if not (needed and is_multi_worker(strategy)):
        return False
    model._maybe_symbolic_build = types.MethodType(_local_symbolic_build, model)
    _install_scalar_reduction_fix()
    return True
