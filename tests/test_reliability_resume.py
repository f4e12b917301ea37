"""Training resume under failure (issue 14): kill -9 at any instant, inside a backup write too;
damaged backups; a full disk. The truth: a run restarted with the same flags ends at exactly
--total_steps, resumed from a step a complete backup recorded."""

import errno
import json
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_vit.training import ConfigError, train, validate
from keras_vit.training import backup
from tests.train_helpers import (REPO, TINY_FLAGS, TRAIN, convert_digits, flag_list,
                                 newest_backup_step, run_train, subprocess_env, tiny_config)

RESUMED = "Resumed from "


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return convert_digits(tmp_path_factory.mktemp("digits"))


def _results(model_dir):
    return json.loads((model_dir / "results.json").read_text())


def _resumed_step(stderr):
    """The step the run's "Resumed from .../step-N (update step N)." log line names (0: none)."""
    lines = [line for line in stderr.splitlines() if RESUMED in line]
    return int(lines[-1].rsplit("update step ", 1)[1].rstrip(").")) if lines else 0


def _backup_names(model_dir):
    return sorted(name for name in os.listdir(model_dir / "backup") if name.startswith("step-"))


def test_shuffle_buffer_zero_is_refused_naming_the_flag(tmp_path):
    # tf.data's shuffle(0) fails inside the pipeline; 1 is "no record shuffle".
    with pytest.raises(ConfigError) as error:
        validate(tiny_config("data", tmp_path, shuffle_buffer=0))
    assert str(error.value).startswith("--shuffle_buffer=0")
    validate(tiny_config("data", tmp_path, shuffle_buffer=1))


def _assert_disk_full_stop(result, model_dir):
    """A UserError: one "error:" line naming the directory and the space, exit status 2."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: Not enough disk space in {model_dir / 'backup'}" in result.stderr
    assert "MB needed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_full_disk_and_kills_inside_backup_writes_resume_at_a_backed_up_step(digits, tmp_path):
    flags = TINY_FLAGS | dict(train_data=digits, eval_data=digits, model_dir=tmp_path,
                              total_steps=60, eval_every_steps=60)
    result = run_train(env=subprocess_env(**{backup.FAULT_ENV: "weights:enospc:20"}), **flags)
    _assert_disk_full_stop(result, tmp_path)
    assert _backup_names(tmp_path) == ["step-0000010"]
    # (kill point, backup step it interrupts) -> the newest complete backup it leaves.
    for fault, left in [("weights:kill:30", 20), ("manifest:kill:40", 30),
                        ("renamed:kill:50", 50)]:
        result = run_train(env=subprocess_env(**{backup.FAULT_ENV: fault}), **flags)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-3000:])
        assert newest_backup_step(tmp_path) == left, (fault, _backup_names(tmp_path))
    result = run_train(**flags)
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    assert _resumed_step(result.stderr) == results["resumed_from_step"] == 50
    assert results["steps"] == 60
    # The newest and the one before it are kept; interrupted writes are cleaned up.
    assert _backup_names(tmp_path) == ["step-0000050", "step-0000060"]
    assert not [name for name in os.listdir(tmp_path / "backup") if name.startswith(".tmp")]


def _kill_at_random(flags, rng, after_step, log):
    """Starts a run, kills it -9 a random 0-1 s after it backs up beyond `after_step`.

    Returns:
        (resumed, reached): the step the run said it resumed from (0: none), and the newest
        complete backup's step after the kill.
    """
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, TRAIN, *flag_list(**flags)],
                                   env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + 120
            while (newest_backup_step(flags["model_dir"]) <= after_step
                   and process.poll() is None and time.time() < deadline):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))  # ~10 backups a second: often inside a write
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return _resumed_step(open(log).read()), newest_backup_step(flags["model_dir"])


@pytest.mark.slow
def test_kill_9_at_random_instants_resumes_to_the_exact_total(digits, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    flags = TINY_FLAGS | dict(train_data=digits, eval_data=digits, model_dir=tmp_path,
                              total_steps=400, eval_every_steps=400, steps_per_execution=5)
    reached = 0
    for attempt in range(2):
        resumed, newest = _kill_at_random(flags, rng, reached, tmp_path / f"run{attempt}.log")
        assert resumed == reached and reached < newest < 400, f"seed {seed}"
        reached = newest
    result = run_train(**flags)
    assert result.returncode == 0, f"seed {seed}: {result.stderr[-3000:]}"
    results = _results(tmp_path)
    assert _resumed_step(result.stderr) == results["resumed_from_step"] == reached, f"seed {seed}"
    assert results["steps"] == 400, f"seed {seed}"


@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory):
    """A 30-step run's model directory: backups at steps 20 and 30."""
    model_dir = tmp_path_factory.mktemp("finished")
    train(tiny_config(digits, model_dir, total_steps=30))
    return model_dir


def _truncate(path):
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(path):
    with open(path, "r+b") as stream:
        stream.seek(os.path.getsize(path) // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))


DAMAGES = {
    "truncated weights": lambda d: _truncate(d / backup.STATE_FILENAME),
    "flipped byte": lambda d: _flip_a_byte(d / backup.STATE_FILENAME),
    "truncated manifest": lambda d: _truncate(d / backup.MANIFEST_FILENAME),
    "no manifest": lambda d: os.remove(d / backup.MANIFEST_FILENAME),
    # Valid JSON of another shape: a list, and an entry without its sha256.
    "manifest a list": lambda d: (d / backup.MANIFEST_FILENAME).write_text("[1, 2]"),
    "manifest entry incomplete": lambda d: (d / backup.MANIFEST_FILENAME).write_text(
        '{"step": 30, "epoch": 3, "files": {"state.weights.h5": {"size": 1}}}'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_backup_is_named_and_the_older_one_used(
        digits, finished_run, tmp_path, caplog, damage):
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, symlinks=True)
    os.remove(model_dir / "results.json")
    newest = model_dir / "backup" / "step-0000030"
    DAMAGES[damage](newest)
    results = train(tiny_config(digits, model_dir, total_steps=30))
    assert results["resumed_from_step"] == 20 and results["steps"] == 30
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"Skipping backup {newest}" in message for message in warnings), warnings


def _replace_state_keeping_the_manifest_valid(source, destination):
    """`destination`'s state file becomes `source`'s, its manifest rewritten to vouch for it:
    a backup that passes every check of its manifest and still does not load as its step."""
    state = destination / backup.STATE_FILENAME
    shutil.copyfile(source / backup.STATE_FILENAME, state)
    manifest = json.loads((destination / backup.MANIFEST_FILENAME).read_text())
    manifest["files"][backup.STATE_FILENAME] = {"size": os.path.getsize(state),
                                                "sha256": backup._sha256(str(state))}
    (destination / backup.MANIFEST_FILENAME).write_text(json.dumps(manifest))


def test_a_backup_that_does_not_load_is_skipped_with_the_data_of_the_older_one(
        digits, finished_run, tmp_path, caplog):
    # Truth: `finished_run`, the uninterrupted 30-step run of the same flags (TINY_FLAGS train
    # deterministically). Step 30's backup holds step 20's state under a manifest that vouches
    # for it, so it is found only when loaded; resuming from 20 with the data positioned for 30
    # (480 examples skipped instead of 320) would end with other weights.
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, symlinks=True)
    os.remove(model_dir / "results.json")
    newest = model_dir / "backup" / "step-0000030"
    _replace_state_keeping_the_manifest_valid(model_dir / "backup" / "step-0000020", newest)
    assert backup.newest_complete_step(str(model_dir / "backup")) == 30  # passes its checks
    with caplog.at_level("INFO", logger="absl"):
        results = train(tiny_config(digits, model_dir, total_steps=30))
    assert results["resumed_from_step"] == 20 and results["steps"] == 30
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"Skipping backup {newest}: its optimizer state is at step 20, not 30" in m
               for m in messages), messages
    assert any("the training data skips the 320 examples" in m for m in messages), messages
    for expected, found in zip(_final_weights(finished_run), _final_weights(model_dir)):
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)


def test_no_readable_backup_stops_instead_of_training_anew(digits, finished_run, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, symlinks=True)
    for step in (20, 30):
        _truncate(model_dir / "backup" / f"step-{step:07d}" / backup.STATE_FILENAME)
    with pytest.raises(backup.BackupError, match="None of the backups in .*step-0000030"):
        train(tiny_config(digits, model_dir, total_steps=30))
    assert _backup_names(model_dir) == ["step-0000020", "step-0000030"]  # left for the user


def test_model_directory_follows_the_users_umask(digits, tmp_path):
    # Truth: with umask 022 a file is created 0644 and a directory 0755, readable by a
    # TF Serving or a colleague running as another user; nothing of the run may be 0700/0600.
    previous = os.umask(0o022)
    try:
        model_dir = tmp_path / "model"
        train(tiny_config(digits, model_dir, total_steps=20))
    finally:
        os.umask(previous)
    for root, directories, files in os.walk(model_dir):
        for name in directories:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o755, (root, name)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_a_backup_of_keras_backup_and_restore_is_resumed(digits, finished_run, tmp_path):
    # The layout before atomic backups: a run started then continues after the upgrade.
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, symlinks=True)
    os.remove(model_dir / "results.json")
    backup_dir = model_dir / "backup"
    os.remove(backup_dir / backup.LATEST_LINK)
    shutil.move(backup_dir / "step-0000020" / backup.STATE_FILENAME,
                backup_dir / backup.LATEST_LINK)
    (backup_dir / backup.KERAS_METADATA).write_text(json.dumps({"epoch": 2, "batch": 0}))
    for name in _backup_names(model_dir):
        shutil.rmtree(backup_dir / name)
    results = train(tiny_config(digits, model_dir, total_steps=30))
    assert results["resumed_from_step"] == 20 and results["steps"] == 30
    assert _backup_names(model_dir) == ["step-0000030"]
    assert not (backup_dir / backup.KERAS_METADATA).exists()
    assert os.path.islink(backup_dir / backup.LATEST_LINK)


def _small_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("adam", "mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), verbose=0)
    return model


def test_checkpoint_write_checks_free_space_and_keeps_the_old_file(tmp_path, monkeypatch):
    model = _small_model()
    path = tmp_path / "ckpt-0000010.weights.h5"
    backup.write_weights_atomically(model, str(path), backup.state_bytes(model))
    before = path.read_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(backup.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(backup.BackupError,
                       match=f"Not enough disk space in {re.escape(str(tmp_path))} .* needed"):
        backup.write_weights_atomically(model, str(path), backup.state_bytes(model))
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_failed_write_leaves_neither_a_temporary_file_nor_a_damaged_one(tmp_path, monkeypatch):
    model = _small_model()
    path = tmp_path / "ckpt-0000010.weights.h5"
    backup.write_weights_atomically(model, str(path), 0)
    before = path.read_bytes()

    def full_disk(model, filepath):
        with open(filepath, "wb") as stream:
            stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backup, "write_state_file", full_disk)
    with pytest.raises(backup.BackupError, match="No space left on device"):
        backup.write_weights_atomically(model, str(path), 0)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def _limit_file_size(limit):
    """In a child before exec: writes beyond `limit` bytes fail with EFBIG, as on a full disk
    (the signal that would kill the process instead is ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_real_failed_write_stops_cleanly_and_keeps_the_last_backup(digits, tmp_path):
    # HDF5 writing to a file that cannot grow crashed Keras's BackupAndRestore with SIGSEGV.
    flags = TINY_FLAGS | dict(train_data=digits, eval_data=digits, model_dir=tmp_path,
                              total_steps=20)
    train(tiny_config(digits, tmp_path, total_steps=10))
    os.remove(tmp_path / "results.json")
    state = tmp_path / "backup" / "step-0000010" / backup.STATE_FILENAME
    result = subprocess.run(
        [sys.executable, TRAIN, *flag_list(**flags)], capture_output=True, text=True,
        timeout=300, env=subprocess_env(), cwd=REPO,
        preexec_fn=lambda: _limit_file_size(os.path.getsize(state) // 2))
    _assert_disk_full_stop(result, tmp_path)
    assert "File too large" in result.stderr
    assert _backup_names(tmp_path) == ["step-0000010"] and newest_backup_step(tmp_path) == 10


def _fit_with_remote_callbacks(model_dir, epochs, seed):
    """`fit` of a small model for `epochs` one-update epochs, backed up into and checkpointed to
    `model_dir` (a `ram://` path, as a remote model directory), with a fresh model and callback.

    Returns:
        (model, the `AtomicBackupAndRestore` callback).
    """
    keras.utils.set_random_seed(seed)  # a model other than the one backed up, until restored
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("adam", "mse")
    restore = backup.AtomicBackupAndRestore(f"{model_dir}/backup", updates_per_epoch=1)
    checkpoint = backup.AtomicWeightsCheckpoint(f"{model_dir}/ckpt-{{step:07d}}.weights.h5")
    x = np.random.default_rng(seed).normal(size=(8, 4))
    model.fit(x, np.zeros((8, 3)), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[restore, checkpoint])
    return model, restore


def test_backups_on_a_remote_file_system_resume_and_skip_a_damaged_one(tmp_path, caplog):
    # TensorFlow's in-memory file system stands for gs://: only tf.io.gfile can reach it.
    gfile = backup.tf.io.gfile
    model_dir = f"ram://{tmp_path}/model"
    backup_dir = f"{model_dir}/backup"
    try:
        trained, _ = _fit_with_remote_callbacks(model_dir, epochs=3, seed=1)
        # The newest two backups, no temporary names, no link (object stores have none).
        assert sorted(gfile.listdir(backup_dir)) == ["step-0000002", "step-0000003"]
        assert sorted(gfile.listdir(model_dir)) == [
            "backup", "ckpt-0000001.weights.h5", "ckpt-0000002.weights.h5",
            "ckpt-0000003.weights.h5"]
        resumed, restore = _fit_with_remote_callbacks(model_dir, epochs=3, seed=2)
        assert restore.restored_step == 3
        for saved, loaded in zip(trained.get_weights(), resumed.get_weights()):
            np.testing.assert_array_equal(saved, loaded)

        newest = f"{backup_dir}/step-0000003"
        state = f"{newest}/{backup.STATE_FILENAME}"
        with gfile.GFile(state, "rb") as stream:
            data = stream.read()
        with gfile.GFile(state, "wb") as stream:
            stream.write(data[: len(data) // 2])
        resumed, restore = _fit_with_remote_callbacks(model_dir, epochs=3, seed=3)
        assert restore.restored_step == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(f"Skipping backup {newest}: " in message for message in warnings), warnings
        # Epoch 3 ran again from step 2 and wrote a good backup of step 3 over the damaged one.
        assert int(resumed.optimizer.iterations.numpy()) == 3
        assert backup.check_backup(newest, 3)["epoch"] == 3
    finally:
        if gfile.exists(model_dir):
            gfile.rmtree(model_dir)


class _Killed(Exception):
    """Stands for a kill -9: no handler of the backup's runs (unlike an OSError's)."""


def test_a_remote_backup_without_its_manifest_is_incomplete(tmp_path, monkeypatch, caplog):
    # No directory rename there: the manifest, written last, is what makes a backup complete.
    gfile = backup.tf.io.gfile
    model_dir = f"ram://{tmp_path}/model"
    interrupted = f"{model_dir}/backup/step-0000003"

    def kill_after_the_state_file_of_step_3(stage, step):
        if (stage, step) == ("weights", 3):
            raise _Killed()

    try:
        monkeypatch.setattr(backup, "_fault_point", kill_after_the_state_file_of_step_3)
        with pytest.raises(_Killed):
            _fit_with_remote_callbacks(model_dir, epochs=3, seed=1)
        assert gfile.listdir(interrupted) == [backup.STATE_FILENAME]
        monkeypatch.undo()
        _, restore = _fit_with_remote_callbacks(model_dir, epochs=3, seed=2)
        assert restore.restored_step == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(f"Skipping backup {interrupted}: no readable {backup.MANIFEST_FILENAME}"
                   in message for message in warnings), warnings
        assert backup.check_backup(interrupted, 3)["epoch"] == 3
    finally:
        if gfile.exists(model_dir):
            gfile.rmtree(model_dir)


def _final_weights(model_dir):
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"))
    return [np.asarray(weight) for weight in model.weights]


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_examples_an_uninterrupted_run_sees(digits, tmp_path):
    # Truth: an uninterrupted run. TINY_FLAGS train deterministically (fixed data order, no
    # dropout or augmentation), so equal final weights mean the resumed run saw the same
    # batches in the same order; a run that restarts its data from the beginning does not.
    flags = TINY_FLAGS | dict(train_data=digits, eval_data=digits, total_steps=40,
                              eval_every_steps=40)
    result = run_train(**flags, model_dir=tmp_path / "whole")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _final_weights(tmp_path / "whole")
    for resume_data_position in (True, False):
        model_dir = tmp_path / f"resumed_{resume_data_position}"
        killed = run_train(env=subprocess_env(**{backup.FAULT_ENV: "renamed:kill:20"}),
                           **flags, model_dir=model_dir)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        result = run_train(**flags, model_dir=model_dir, resume_data_position=resume_data_position)
        assert result.returncode == 0, result.stderr[-3000:]
        assert _results(model_dir)["resumed_from_step"] == 20
        # 20 updates of 16 images were consumed before the kill.
        skipped = "the training data skips the 320 examples" in result.stderr
        assert skipped == resume_data_position, result.stderr[-3000:]
        same = all(np.allclose(a, b, rtol=0, atol=1e-6)
                   for a, b in zip(expected, _final_weights(model_dir)))
        assert same == resume_data_position


def _with_undecodable_images(source, destination, every=40):
    """A copy of the digits records in `source` whose every `every`-th training record holds
    bytes that are no image (a valid Example: it parses, then fails to decode)."""
    import tensorflow as tf

    from pipelines import records

    shutil.copytree(source, destination)
    for shard in sorted(destination.glob("train-*")):
        examples = [tf.train.Example.FromString(record.numpy())
                    for record in tf.data.TFRecordDataset(str(shard))]
        for example in examples[::every]:
            example.features.feature[records.IMAGE_ENCODED].bytes_list.value[0] = b"no image"
        with tf.io.TFRecordWriter(str(shard)) as writer:
            for example in examples:
                writer.write(example.SerializeToString())
    return str(destination)


@pytest.mark.slow
def test_a_resumed_run_skips_past_the_records_it_dropped(digits, tmp_path):
    # Truth: an uninterrupted run on the same data, with undecodable records that the training
    # pipeline drops (skip mode, counted and logged); the backup records where, so the resumed
    # run's data goes on where the killed one's stopped and the final weights agree.
    data = _with_undecodable_images(pathlib.Path(digits), tmp_path / "data")
    flags = TINY_FLAGS | dict(train_data=data, eval_data=data, total_steps=40,
                              eval_every_steps=40)
    result = run_train(**flags, model_dir=tmp_path / "whole")
    assert result.returncode == 0, result.stderr[-3000:]
    model_dir = tmp_path / "resumed"
    killed = run_train(env=subprocess_env(**{backup.FAULT_ENV: "renamed:kill:20"}), **flags,
                       model_dir=model_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    manifest = json.loads((model_dir / "backup" / "step-0000020" / backup.MANIFEST_FILENAME)
                          .read_text())
    dropped = manifest["data"]["dropped_positions"]["0"]
    assert dropped == sorted(dropped) and dropped[0] < 320, dropped  # some among the first 320
    result = run_train(**flags, model_dir=model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    among = sum(position < 320 + len(dropped) for position in dropped)  # an upper bound
    found = re.search(r"skips the 320 examples it delivered before and the (\d+) undecodable "
                      r"records it dropped among them", result.stderr)
    assert found and 0 < int(found.group(1)) <= among, result.stderr[-3000:]
    for a, b in zip(_final_weights(tmp_path / "whole"), _final_weights(model_dir)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _fit_agreeing(backup_dir, epochs, resume_step=None):
    """One-update epochs of a small model backed up into `backup_dir`, the callback told the
    step the run resumes from (in a multi-worker run, the one the workers agreed on); returns
    the callback."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("adam", "mse")
    restore = backup.AtomicBackupAndRestore(str(backup_dir), updates_per_epoch=1,
                                            resume_step=resume_step)
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[restore])
    return restore


def test_an_agreed_step_restores_that_backup_or_stops(tmp_path):
    """Multi-worker resume: the backup of the agreed step, not this worker's newer one; a
    worker without it stops rather than train anew beside the others."""
    _fit_agreeing(tmp_path / "worker", epochs=2)  # backups of steps 1 and 2
    assert _fit_agreeing(tmp_path / "worker", epochs=3, resume_step=1).restored_step == 1
    assert _fit_agreeing(tmp_path / "other", epochs=1, resume_step=0).restored_step is None
    with pytest.raises(backup.BackupError, match="holds no backup of it"):
        _fit_agreeing(tmp_path / "worker", epochs=4, resume_step=1)  # pruned by the run above
    # Backups of 2 and 3 remain; 3 holds 2's state under a manifest that vouches for it.
    _replace_state_keeping_the_manifest_valid(tmp_path / "worker" / "step-0000002",
                                              tmp_path / "worker" / "step-0000003")
    with pytest.raises(backup.UnloadableBackupError, match="step-0000003 does not load") as error:
        _fit_agreeing(tmp_path / "worker", epochs=4, resume_step=3)
    assert error.value.step == 3
