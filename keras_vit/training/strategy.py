"""`tf.distribute` strategies from a name, and the one Keras bug that multi-worker `fit` needs fixed.

Strategy names: "default" (one device), "mirrored" (all local GPUs, or all logical CPUs when
there is no GPU), "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from
`TF_CONFIG`), "tpu" (TPUStrategy on `tpu`), "auto" (TPU if `tpu` is given, multi_worker if
`TF_CONFIG` names more than one task, mirrored if there are several GPUs, else default).
"""

import json
import os
import types

import keras
import tensorflow as tf
from absl import logging

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")

# keras-team/keras#20585: `Model.fit` under MultiWorkerMirroredStrategy fails twice in Keras 3:
# 1. `_maybe_symbolic_build` takes the first batch and all-reduces it with
#    `strategy.reduce("MEAN", batch)` in eager mode; the collective cross-device ops cannot
#    convert the PerReplica value ("ValueError: Attempt to convert a value (PerReplica...) to a
#    Tensor"). The batch is only used for its shapes and dtypes: we build from the local
#    replica's batch instead.
# 2. the train/test step reduces its scalar logs (loss, metrics) with
#    `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar ("Invalid reduction
#    dimension 0 for input with 0 dimensions"); we reduce scalars with axis=None, the mean over
#    replicas that MirroredStrategy gets.
# Applied to the Keras versions known to have the bug; tests/test_strategy_multi_worker.py fails
# when a newer Keras still has it (extend the range) or when this one no longer has it.
FIT_BUG_KERAS_VERSIONS = ((3, 0), (3, 15))


def _cluster_size(tf_config):
    cluster = tf_config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def tf_config():
    """The parsed `TF_CONFIG` environment variable ({} when unset)."""
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}") from None


def create_strategy(name="auto", tpu=None):
    """Returns the `tf.distribute.Strategy` called `name` (see the module docstring)."""
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {name!r}.")
    if name == "auto":
        if tpu:
            name = "tpu"
        elif _cluster_size(tf_config()) > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
        logging.info("--strategy=auto chose %s.", name)
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        if _cluster_size(tf_config()) < 1:
            raise ValueError(
                "--strategy=multi_worker needs TF_CONFIG naming the cluster, e.g. "
                '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}; it is unset or names no worker.'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    return tf.distribute.get_strategy()


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_index(strategy):
    """(task_type, task_id) of this process; ("worker", 0) outside multi-worker training."""
    if is_multi_worker(strategy):
        resolver = strategy.cluster_resolver
        return resolver.task_type or "worker", resolver.task_id or 0
    return "worker", 0


def is_chief(strategy):
    """True for the one process that writes the model directory's shared files."""
    if not is_multi_worker(strategy):
        return True
    task_type, task_id = worker_index(strategy)
    has_chief = "chief" in (strategy.cluster_resolver.cluster_spec().as_dict() or {})
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def keras_has_fit_bug(version=None):
    """True when keras (`version` or the installed one) is in FIT_BUG_KERAS_VERSIONS."""
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

    Only for a multi-worker strategy on an affected Keras version (`force` overrides the version
    check): replaces `_maybe_symbolic_build` on this model object, and wraps Keras's
    `reduce_per_replica` (a no-op for every other strategy). Returns True when applied.
    """
    needed = keras_has_fit_bug() if force is None else force
    if not (needed and is_multi_worker(strategy)):
        return False
    model._maybe_symbolic_build = types.MethodType(_local_symbolic_build, model)
    _install_scalar_reduction_fix()
    return True
