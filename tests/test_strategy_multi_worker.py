"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 train to the same end.

Also watches keras-team/keras#20585 (`Model.fit` under MultiWorkerMirroredStrategy fails with
"Attempt to convert a value (PerReplica...) to a Tensor"): the plain-fit check fails once a
Keras release fixes it, the signal to narrow multi_worker_fix.FIT_BUG_KERAS_VERSIONS.
"""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from keras_vit.training import multi_worker_fix
from tests.train_helpers import (REPO, TINY_FLAGS, TRAIN, convert_digits, flag_list,
                                 free_ports, newest_backup_step, subprocess_env)


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def run_workers(command, timeout=300):
    """Runs `command` as worker 0 and 1 of a 2-worker cluster; returns both CompletedProcess-likes."""
    ports = free_ports(2)
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO, env=subprocess_env(TF_CONFIG=tf_config(ports, index)))
        for index in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            outputs.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def _last_json(stdout):
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def _weights(path):
    arrays = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.mark.slow
def test_two_workers_train_to_the_same_weights(tmp_path):
    data = convert_digits(tmp_path / "digits")
    model_dir = tmp_path / "model"
    flags = TINY_FLAGS | dict(train_data=data, eval_data=data, model_dir=model_dir,
                              strategy="multi_worker", total_steps=20, steps_per_execution=1)
    outputs = run_workers([sys.executable, TRAIN, *flag_list(**flags)])
    for code, _, stderr in outputs:
        assert code == 0, stderr[-3000:]
    chief, worker = (_last_json(stdout) for _, stdout, _ in outputs)
    assert chief["num_replicas"] == worker["num_replicas"] == 2
    assert chief["steps"] == worker["steps"] == 20
    assert chief["eval_loss"] == pytest.approx(worker["eval_loss"], rel=1e-6)
    assert chief["eval_loss"] < np.log(10)  # zero head starts at ln(10): it trained
    # Only the chief writes the model directory; each worker keeps its own backup.
    assert (model_dir / "model.keras").exists() and (model_dir / "results.json").exists()
    chief_state = _weights(model_dir / "backup" / "latest.weights.h5")
    worker_state = _weights(model_dir / "backup" / "worker_1" / "latest.weights.h5")
    assert chief_state.keys() == worker_state.keys() and len(chief_state) > 10
    for name in chief_state:  # synchronous all-reduce: identical weights and optimizer state
        np.testing.assert_array_equal(worker_state[name], chief_state[name], err_msg=name)


@pytest.mark.slow
def test_workers_one_backup_apart_resume_from_the_backup_they_share(tmp_path):
    """A worker killed after one backup while the chief wrote the next: both resume from the
    older one (each keeps two) and train in step to the end, instead of one interval apart."""
    data = convert_digits(tmp_path / "digits")
    model_dir = tmp_path / "model"
    flags = TINY_FLAGS | dict(train_data=data, eval_data=data, model_dir=model_dir,
                              strategy="multi_worker", total_steps=20, steps_per_execution=1)
    for code, _, stderr in run_workers([sys.executable, TRAIN, *flag_list(**flags)]):
        assert code == 0, stderr[-3000:]
    worker_backups = model_dir / "backup" / "worker_1"
    shutil.rmtree(worker_backups / "step-0000020")  # as if killed before writing it
    assert newest_backup_step(str(model_dir)) == 20

    outputs = run_workers([sys.executable, TRAIN, *flag_list(**(flags | dict(total_steps=30)))])
    for code, _, stderr in outputs:
        assert code == 0, stderr[-3000:]
    chief, worker = (_last_json(stdout) for _, stdout, _ in outputs)
    assert chief["resumed_from_step"] == worker["resumed_from_step"] == 10
    assert chief["steps"] == worker["steps"] == 30
    assert "every worker resumes from 10" in outputs[0][2]
    chief_state = _weights(model_dir / "backup" / "latest.weights.h5")
    worker_state = _weights(worker_backups / "latest.weights.h5")
    for name in chief_state:
        np.testing.assert_array_equal(worker_state[name], chief_state[name], err_msg=name)


PLAIN_FIT = r"""
import numpy as np, tensorflow as tf, keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
def dataset(context):
    x = np.ones((32, 4), np.float32); y = np.zeros(32, np.int32)
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(4)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
try:
    model.fit(strategy.distribute_datasets_from_function(dataset), steps_per_epoch=2, verbose=0)
    print("FIT OK")
except ValueError as error:
    print("FIT FAILED", "PerReplica" in str(error))
"""


@pytest.mark.slow
def test_keras_fit_bug_20585_is_still_there():
    if not multi_worker_fix.keras_has_fit_bug():
        pytest.skip("Keras outside FIT_BUG_KERAS_VERSIONS: the workaround is off; "
                    "test_two_workers_train_to_the_same_weights checks fit works without it.")
    outputs = run_workers([sys.executable, "-c", PLAIN_FIT])
    stdouts = [stdout for _, stdout, _ in outputs]
    assert all("FIT FAILED True" in out for out in stdouts), (
        "Model.fit under MultiWorkerMirroredStrategy now works in this Keras "
        "(keras-team/keras#20585 fixed?): narrow multi_worker_fix.FIT_BUG_KERAS_VERSIONS to end before "
        f"it and drop the workaround when no supported version needs it. Outputs: {stdouts}")


def test_fit_bug_version_range():
    assert multi_worker_fix.keras_has_fit_bug("3.15.1")
    assert not multi_worker_fix.keras_has_fit_bug("3.16.0")
    assert not multi_worker_fix.keras_has_fit_bug("2.15.0")
