"""`tf.distribute` strategies from a name, and which process of a cluster this one is.

Strategy names: "default" (one device), "mirrored" (all local GPUs, or all logical CPUs when
there is no GPU), "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from
`TF_CONFIG`), "tpu" (TPUStrategy on `tpu`), "auto" (TPU if `tpu` is given, multi_worker if
`TF_CONFIG` names more than one task, mirrored if there are several GPUs, else default).
`Model.fit` under multi_worker needs the Keras workaround of `multi_worker_fix`.
"""

import json
import os

import tensorflow as tf
from absl import logging

from pipelines.errors import UserError

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def _cluster_size(tf_config):
    cluster = tf_config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def tf_config():
    """The parsed `TF_CONFIG` environment variable.

    Returns:
        The dict it holds ({} when it is unset or empty).

    Raises:
        UserError: TF_CONFIG is not valid JSON.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}") from error


def _auto_strategy_name(tpu):
    """The strategy "auto" stands for on this machine (see the module docstring)."""
    if tpu:
        return "tpu"
    if _cluster_size(tf_config()) > 1:
        return "multi_worker"
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def _tpu_strategy(tpu):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _multi_worker_strategy():
    if _cluster_size(tf_config()) < 1:
        raise UserError(
            "--strategy=multi_worker needs TF_CONFIG naming the cluster, e.g. "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}; it is unset or names no worker.'
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def _mirrored_strategy():
    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=cpus)


def create_strategy(name="auto", tpu=None):
    """The `tf.distribute.Strategy` called `name`.

    Args:
        name: one of STRATEGIES (see the module docstring).
        tpu: the TPU name or grpc:// address ('local' on a TPU VM); None = no TPU.

    Returns:
        The strategy; "default" is `tf.distribute.get_strategy()`.

    Raises:
        UserError: an unknown `name`, a TF_CONFIG that is not JSON, or "multi_worker" without
            a TF_CONFIG naming a worker.
    """
    if name not in STRATEGIES:
        raise UserError(f"--strategy must be one of {STRATEGIES}, got {name!r}.")
    if name == "auto":
        name = _auto_strategy_name(tpu)
        logging.info("--strategy=auto chose %s.", name)
    if name == "tpu":
        return _tpu_strategy(tpu)
    if name == "multi_worker":
        return _multi_worker_strategy()
    if name == "mirrored":
        return _mirrored_strategy()
    return tf.distribute.get_strategy()


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy (one of several processes)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_index(strategy):
    """(task_type, task_id) of this process; ("worker", 0) outside multi-worker training."""
    if is_multi_worker(strategy):
        resolver = strategy.cluster_resolver
        return resolver.task_type or "worker", resolver.task_id or 0
    return "worker", 0


def smallest_over_workers(strategy, value):
    """The smallest of every worker's `value` (an int) in a multi-worker run, `value` itself
    otherwise. A collective: every worker must call it, at the same point of its program."""
    if not is_multi_worker(strategy):
        return int(value)

    @tf.function
    def gather():
        def replica_values():
            context = tf.distribute.get_replica_context()
            return context.all_gather(tf.constant([int(value)], tf.int64), axis=0)

        return strategy.run(replica_values)

    gathered = strategy.experimental_local_results(gather())[0]
    return int(tf.reduce_min(gathered))


def is_chief(strategy):
    """True for the one process that writes the model directory's shared files: the "chief"
    task, or worker 0 of a cluster without one (and the only process outside multi-worker)."""
    if not is_multi_worker(strategy):
        return True
    task_type, task_id = worker_index(strategy)
    has_chief = "chief" in (strategy.cluster_resolver.cluster_spec().as_dict() or {})
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
