"""Training state on disk, written atomically and checked on read.

`AtomicBackupAndRestore` replaces Keras's `BackupAndRestore`, whose `latest.weights.h5` and
`training_metadata.json` are overwritten in place, one after the other: a kill inside either
write leaves a file that fails every restart, and a kill between them resumes one interval
off. Here each backup is one directory, written under a temporary name and renamed into place
once complete:

    BACKUP_DIR/step-0000020/state.weights.h5   weights + optimizer state (`model.save_weights`)
    BACKUP_DIR/step-0000020/manifest.json      step, epoch, size and sha256 of the weights file,
                                               the input pipelines' state; written last
    BACKUP_DIR/step-0000010/                   the previous complete backup, kept as a fallback
    BACKUP_DIR/latest.weights.h5               a symbolic link to the newest state file

Restoring validates the newest backup against its manifest and falls back to the older one
with a warning naming what failed. `write_weights_atomically` gives the same guarantee to one
file (the checkpoints of `AtomicWeightsCheckpoint`).

Any file system of `tf.io.gfile` works: a path with a scheme ("gs://bucket/run", "ram://...")
goes through `tf.io.gfile`, a local one through `os`, which alone gives fsync, free space and
symbolic links. Object stores cannot rename a directory atomically, so there a backup is
written straight into `step-N/` and its manifest, written last, is what makes it complete
(`check_backup` refuses a directory without a valid one); a checkpoint file is still written
under a temporary name and renamed (an object appears whole); no fsync, no free-space check and
no `latest.weights.h5`.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras.src.saving import saving_lib

from pipelines.errors import UserError

STATE_FILENAME = "state.weights.h5"
MANIFEST_FILENAME = "manifest.json"
LATEST_LINK = "latest.weights.h5"
#: The epoch file of Keras's `BackupAndRestore` (its weights file is named as `LATEST_LINK`).
KERAS_METADATA = "training_metadata.json"
_BACKUP_NAME = re.compile(r"step-(\d{7,})")
_TEMPORARY_PREFIX = ".tmp-"
#: Test hook: "STAGE:ACTION:STEP" makes the backup of STEP kill itself (ACTION kill) or fail as
#: on a full disk (ACTION enospc) at STAGE ("weights", "manifest" or "renamed", after each).
FAULT_ENV = "KERAS_VIT_BACKUP_FAULT"
#: Bytes of h5 layout and names per variable (an upper bound of the size docs/training.md
#: measured), and the factor of room to spare on top, for the check of free space.
_BYTES_PER_VARIABLE = 2048
_SPACE_MARGIN = 1.05
#: No room for the file: a full disk, a full quota, a file-size limit (`ulimit -f`).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class BackupError(UserError):
    """A backup or checkpoint cannot be written (disk full) or none of them can be read."""


class UnloadableBackupError(BackupError):
    """The backup a run resumes from passed its manifest's checks but does not load (another
    model's state, an optimizer at another step). A single-worker run resumes from the next
    older backup instead (`engine.train`); `step` and `path` name this one."""

    def __init__(self, message, step, path):
        super().__init__(message)
        self.step, self.path = step, path


def _fault_point(stage, step):
    """Injects the fault that `FAULT_ENV` names for (`stage`, `step`); nothing when unset."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    fault_stage, action, fault_step = spec.split(":")
    if fault_stage != stage or int(fault_step) != step:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stage)


def _is_remote(path):
    """Whether `path` names a file system of `tf.io.gfile` by its scheme ("gs://...")."""
    return "://" in path


def _fsync_directory(path):
    """Makes the renames inside `path` durable (POSIX: a directory's entries are its data).

    Nothing on a remote file system: an object store has no directory entries to sync, and an
    object is durable once its write is closed.
    """
    if _is_remote(path):
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_file(path, data):
    """Writes the bytes `data` to the file `path`, fsynced on a local file system.

    Args:
        path: the file to write (created or overwritten).
        data: a bytes-like object.

    Raises:
        OSError, tf.errors.OpError: the file cannot be written (a partial one may be left).
    """
    if _is_remote(path):
        with tf.io.gfile.GFile(path, "wb") as stream:
            stream.write(bytes(data))  # GFile takes bytes, not a memoryview
        return
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _replace(source, destination):
    """Renames the file `source` to `destination`, replacing it (atomic on POSIX; on an object
    store a copy, which still makes `destination` appear whole)."""
    if _is_remote(source):
        tf.io.gfile.rename(source, destination, overwrite=True)
    else:
        os.replace(source, destination)


def _is_file(path):
    """Whether `path` exists and is not a directory (`tf.io.gfile` has no `isfile`)."""
    return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def _sha256(path):
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _megabytes(size):
    return f"{size / 2**20:.1f} MB"


def _disk_full_error(directory, needed, error=None):
    """The `BackupError` of a full disk: the directory, the space needed and what is free."""
    free = shutil.disk_usage(directory).free
    cause = f" ({error})" if error is not None else ""
    return BackupError(
        f"Not enough disk space in {directory} to save the training state{cause}: about "
        f"{_megabytes(needed)} needed, {_megabytes(free)} free. Training stopped; the last "
        "complete backup there is kept. Free some space and start the same command again "
        "to resume."
    )


@contextlib.contextmanager
def _removed_on_failure(partial, directory, needed):
    """Removes `partial` (a file or directory being written) when the body fails.

    Args:
        partial: what the body writes.
        directory: where it is written, named in the error of a full disk.
        needed: the bytes the write needs, named there too.

    Raises:
        BackupError: the local disk is full (or a quota or file-size limit is reached).
    """
    try:
        yield
    except (OSError, tf.errors.OpError) as error:
        _remove(partial)
        # No space to ask about on an object store: its errors go up as they are.
        if isinstance(error, OSError) and error.errno in _DISK_FULL and not _is_remote(directory):
            raise _disk_full_error(directory, needed, error) from error
        raise


def state_bytes(model):
    """About the size of `model.save_weights`'s file: its variables and optimizer's, with room.

    Args:
        model: a built `keras.Model`, compiled or not.

    Returns:
        The bytes the check of free space asks for.
    """
    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    if optimizer is not None:
        variables += list(optimizer.variables)
    data = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return int((data + _BYTES_PER_VARIABLE * len(variables)) * _SPACE_MARGIN)


def _check_free_space(directory, needed):
    """Raises the disk-full `BackupError` before writing when `needed` bytes do not fit (local
    file systems only: an object store has no free space to ask)."""
    if not _is_remote(directory) and shutil.disk_usage(directory).free < needed:
        raise _disk_full_error(directory, needed)


def write_state_file(model, path):
    """Writes what `model.save_weights(path)` writes (weights and optimizer state), fsynced
    on a local file system.

    The h5 file is built in memory and written with one Python file write: HDF5 writing
    straight to disk crashes the process (SIGSEGV, measured with h5py 3.14 / HDF5 1.14.6) when
    a write fails mid-file, as on a full disk, where a Python write raises an `OSError`. Costs
    host memory of one more copy of the state, briefly.

    Args:
        model: a built `keras.Model`.
        path: the file to write.

    Raises:
        OSError, tf.errors.OpError: the file cannot be written (a partial file may be left at
            `path`).
    """
    buffer = io.BytesIO()
    # Keras's own writer of `save_weights`, given a memory file (its `H5IOStore` takes one).
    store = saving_lib.H5IOStore(buffer, mode="w")
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                           visited_saveables=set())
    store.close()
    _write_file(path, buffer.getbuffer())


def write_weights_atomically(model, path, needed):
    """`model.save_weights(path)` through a temporary file, so `path` is whole or absent.

    Args:
        model: the `keras.Model` to save (its optimizer state too, as `save_weights` does).
        path: the file to write, ending in ".weights.h5".
        needed: bytes the file is expected to take, checked against the free space first.

    Raises:
        BackupError: the disk is full; the temporary file is removed and `path` untouched.
    """
    directory, name = os.path.split(path)
    tf.io.gfile.makedirs(directory)
    temporary = os.path.join(directory, _TEMPORARY_PREFIX + name)
    with _removed_on_failure(temporary, directory, needed):
        _check_free_space(directory, needed)
        write_state_file(model, temporary)
        _replace(temporary, path)
        _fsync_directory(directory)


def _remove(path):
    """Deletes a file or a directory tree (locally, a symbolic link itself) if it exists."""
    if _is_remote(path):
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def backup_name(step):
    """The directory name of the backup at update `step`, such as "step-0000020"."""
    return f"step-{step:07d}"


def _listdir(directory):
    """The names in `directory`, without the "/" that object stores append to directories."""
    return [name.rstrip("/") for name in tf.io.gfile.listdir(directory)]


def list_backups(backup_dir):
    """(step, path) of the backup directories in `backup_dir`, newest first, checked or not."""
    if not tf.io.gfile.isdir(backup_dir):
        return []
    found = []
    for name in _listdir(backup_dir):
        match = _BACKUP_NAME.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(backup_dir, name)))
    return sorted(found, reverse=True)


def newest_complete_step(backup_dir, below=None, earlier_failures=()):
    """The step of the newest backup in `backup_dir` that passes `check_backup`: the step a
    restart resumes from. Each backup that fails its check is named in a warning and skipped.

    Args:
        backup_dir: a directory of `step-N` backups (it may not exist).
        below: only backups of a smaller step count (None: all); the engine passes the step of
            a backup that did not load.
        earlier_failures: "path: why" of backups already found unusable, for the message.

    Returns:
        The step, or 0 when there is no backup (older than `below`) at all.

    Raises:
        BackupError: there are backups, but none passes its check: starting anew would prune
            them, so the user decides.
    """
    failures = list(earlier_failures)
    for step, path in list_backups(backup_dir):
        if below is not None and step >= below:
            continue
        try:
            check_backup(path, step)
        except (OSError, tf.errors.OpError, ValueError) as error:
            logging.warning("Skipping backup %s: %s.", path, error)
            failures.append(f"{path}: {error}")
            continue
        return step
    if failures:
        raise BackupError(
            f"None of the backups in {backup_dir} can be restored (" + "; ".join(failures)
            + "). Put a good copy back, or move the directory away to train anew.")
    return 0


def data_state(backup_dir, step):
    """The input pipelines' state saved with the backup of `step` in `backup_dir`
    (`AtomicBackupAndRestore(data_state=)`); {} when it has none or cannot be read (its
    restore then names what is wrong)."""
    path = os.path.join(backup_dir, backup_name(step), MANIFEST_FILENAME)
    try:
        with tf.io.gfile.GFile(path) as stream:
            manifest = json.load(stream)
    except (OSError, tf.errors.OpError, ValueError):
        return {}
    data = manifest.get("data") if isinstance(manifest, dict) else None
    return data if isinstance(data, dict) else {}


def keras_backup_step(backup_dir, updates_per_epoch):
    """The update step of the files Keras's `BackupAndRestore` left in `backup_dir` (this
    project's backup before this module), None when there are none.

    Raises:
        BackupError: its metadata file does not say an epoch.
    """
    state = os.path.join(backup_dir, LATEST_LINK)
    metadata = os.path.join(backup_dir, KERAS_METADATA)
    # A link is this module's own `latest.weights.h5` (local file systems only).
    if os.path.islink(state) or not (_is_file(state) and _is_file(metadata)):
        return None
    try:
        with tf.io.gfile.GFile(metadata) as stream:
            return int(json.load(stream)["epoch"]) * updates_per_epoch
    except (OSError, tf.errors.OpError, ValueError, KeyError, TypeError) as error:
        raise BackupError(
            f"The Keras backup in {backup_dir} ({LATEST_LINK}, {KERAS_METADATA}) cannot be "
            f"restored: {error}. Move the directory away to train anew.") from error


def check_backup(path, step):
    """The manifest of the backup directory `path`, once its files match it.

    Args:
        path: a backup directory, such as BACKUP_DIR/step-0000020.
        step: the update step its name says.

    Returns:
        The manifest dict: step, epoch, and the size and sha256 of each file.

    Raises:
        ValueError: the manifest is missing or unreadable, names another step, or a file's
            size or sha256 differs from it (a write that did not finish, or a damaged disk).
    """
    try:
        with tf.io.gfile.GFile(os.path.join(path, MANIFEST_FILENAME)) as stream:
            manifest = json.load(stream)
    except (OSError, tf.errors.OpError, json.JSONDecodeError) as error:
        raise ValueError(f"no readable {MANIFEST_FILENAME} ({error})") from error
    _check_manifest_layout(manifest)
    if manifest.get("step") != step:
        raise ValueError(f"its manifest is for step {manifest.get('step')}, not {step}")
    if STATE_FILENAME not in manifest.get("files", {}):
        raise ValueError(f"its manifest lists no {STATE_FILENAME}")
    for name, expected in manifest.get("files", {}).items():
        file_path = os.path.join(path, name)
        size = tf.io.gfile.stat(file_path).length if tf.io.gfile.exists(file_path) else None
        if size != expected["size"]:
            raise ValueError(f"{name} has {size} bytes, its manifest says {expected['size']}")
        if _sha256(file_path) != expected["sha256"]:
            raise ValueError(f"{name} does not match the sha256 of its manifest")
    return manifest


def _check_manifest_layout(manifest):
    """ValueError unless `manifest` is {"step": int, "files": {name: {"size", "sha256"}}, ...}:
    valid JSON of another shape is a damaged backup too, to be skipped like any other."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str) for entry in files.values()):
        raise ValueError(f"its {MANIFEST_FILENAME} is not a backup manifest")


class AtomicBackupAndRestore(keras.callbacks.Callback):
    """Backs up the training state at each epoch end; restores a backup at the start of `fit`.

    Keras epoch = `updates_per_epoch` optimizer updates (see `engine._fit`), so a backup sits
    on a chunk boundary and its step gives the epoch to resume at. The newest two complete
    backups are kept; an incomplete or damaged one is named in a warning and skipped.

    Args:
        backup_dir: the directory of this process's backups (each worker has its own).
        updates_per_epoch: optimizer updates per Keras epoch (--checkpoint_every_steps).
        resume_step: the step the run resumes from, as `engine._resume_step` chose it (the
            input pipeline skips that many updates' examples): that backup is restored, or
            `UnloadableBackupError` raised (0: start anew). In a multi-worker run the smallest
            of the workers' newest complete backups (`strategy.smallest_over_workers`), so this
            worker's newer ones are ignored. None: the newest backup that loads.
        verified: the backup of `resume_step` was checked against its manifest already
            (`newest_complete_step`), so it is not hashed again.
        data_state: a callable returning a JSON-able dict of the input pipelines' state, saved
            in each manifest under "data" (`data_state` reads it back); None: nothing.

    Attributes:
        restored_step: the update step restored at the start of `fit` (None: started anew).
    """

    def __init__(self, backup_dir, updates_per_epoch, resume_step=None, verified=False,
                 data_state=None):
        super().__init__()
        self.backup_dir = backup_dir
        self.updates_per_epoch = int(updates_per_epoch)
        self.resume_step = resume_step
        self.verified = verified
        self.data_state = data_state
        self.restored_step = None
        self._kept = None  # the newest complete backup, kept until the next one is complete

    def on_train_begin(self, logs=None):
        self.restored_step = None
        if self.resume_step is None:
            self._restore_newest()
        elif self.resume_step:
            self._restore_step(self.resume_step)

    def _restore_newest(self):
        """The newest backup that loads, else Keras's files, else nothing (a new run)."""
        failures = []
        for step, path in list_backups(self.backup_dir):
            failure = self._try_restore(step, path)
            if failure is None:
                return
            failures.append(f"{path}: {failure}")
        if failures:
            # Starting anew would prune them: the user decides.
            raise BackupError(
                f"None of the backups in {self.backup_dir} can be restored ("
                + "; ".join(failures) + "). Put a good copy back, or move the directory away "
                "to train anew.")
        step = keras_backup_step(self.backup_dir, self.updates_per_epoch)
        if step is not None:
            self._restore_keras_backup(step)

    def _restore_step(self, step):
        """The backup of `step` (or Keras's files of it); no other."""
        backups = list_backups(self.backup_dir)
        newer = [path for backup_step, path in backups if backup_step > step]
        if newer:
            logging.warning("Not resuming from %s: the run resumes from update step %d.",
                            ", ".join(newer), step)
        path = dict(backups).get(step)
        if path is not None:
            failure = self._try_restore(step, path, checked=self.verified)
            if failure is not None:
                raise UnloadableBackupError(
                    f"The run resumes from update step {step}, but its backup {path} does not "
                    f"load ({failure}). Put a good copy back (in a multi-worker run, another "
                    "worker's backup of the same step holds the same state), or move the backup "
                    "directory away to train anew.", step, path)
        elif keras_backup_step(self.backup_dir, self.updates_per_epoch) == step:
            self._restore_keras_backup(step)
        else:
            raise BackupError(
                f"The run resumes from update step {step} (the newest backup every worker "
                f"holds), but {self.backup_dir} holds no backup of it: copy another worker's "
                f"{backup_name(step)} there (the same synchronous state), or move every "
                "worker's backup directory away to train anew.")

    def _restore_keras_backup(self, step):
        """Resumes from the files of Keras's `BackupAndRestore` at `step` (`keras_backup_step`),
        so a run started before this module continues (its first new backup replaces them).

        Raises:
            BackupError: the files do not load, or disagree on the step.
        """
        state = os.path.join(self.backup_dir, LATEST_LINK)
        try:
            self._load(state, step)
        except (OSError, tf.errors.OpError, ValueError) as error:
            raise BackupError(
                f"The Keras backup in {self.backup_dir} ({LATEST_LINK}, {KERAS_METADATA}) "
                f"cannot be restored: {error}. Move the directory away to train anew.") from error
        self._resumed(step, state)

    def _resumed(self, step, path):
        self.restored_step = step
        self.model._initial_epoch = step // self.updates_per_epoch
        logging.info("Resumed from %s (update step %d).", path, step)

    def _try_restore(self, step, path, checked=False):
        """Loads the backup at `path` if it passes its checks (`checked`: they were done).

        Returns:
            None once loaded; otherwise why not (also logged as a warning).
        """
        try:
            if not checked:
                check_backup(path, step)
            if step % self.updates_per_epoch:
                raise ValueError(f"step {step} is not a multiple of --checkpoint_every_steps="
                                 f"{self.updates_per_epoch}")
            self._load(os.path.join(path, STATE_FILENAME), step)
        except (OSError, tf.errors.OpError, ValueError) as error:
            logging.warning("Skipping backup %s: %s.", path, error)
            return str(error)
        self._kept = path
        self._resumed(step, path)
        return None

    def _load(self, state_path, step):
        """Loads weights and optimizer state; checks the optimizer counts `step` updates."""
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(state_path)
        loaded = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if loaded != step:
            raise ValueError(f"its optimizer state is at step {loaded}, not {step}")

    def on_epoch_end(self, epoch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        path = self._write(step, epoch + 1)
        _fault_point("renamed", step)
        self._prune(keep=(path, self._kept))
        self._kept = path

    def _write(self, step, epoch):
        """Writes the backup of `step` under a temporary name and renames it into place; on a
        remote file system, straight into place (its manifest, written last, completes it).

        Returns:
            The path of the complete backup directory.

        Raises:
            BackupError: the disk is full; the partial backup is removed, older ones kept.
        """
        tf.io.gfile.makedirs(self.backup_dir)
        final = os.path.join(self.backup_dir, backup_name(step))
        # Object stores cannot rename a directory atomically (`ram://` even loses its files).
        partial = final if _is_remote(final) else os.path.join(
            self.backup_dir, _TEMPORARY_PREFIX + backup_name(step))
        needed = state_bytes(self.model)
        # Leftovers of an interrupted write; remote, also a damaged backup of this step (skipped
        # at restore), removed before a byte is written so that no old manifest vouches for it.
        _remove(partial)
        with _removed_on_failure(partial, self.backup_dir, needed):
            _check_free_space(self.backup_dir, needed)
            tf.io.gfile.makedirs(partial)
            self._write_contents(partial, step, epoch)
            if partial != final:
                _remove(final)  # a damaged backup of the same step, skipped at restore
                os.rename(partial, final)
                _fsync_directory(self.backup_dir)
        self._link_latest(final)
        return final

    def _write_contents(self, directory, step, epoch):
        """The state file, then the manifest (last: its presence means the rest is whole)."""
        state = os.path.join(directory, STATE_FILENAME)
        write_state_file(self.model, state)
        _fault_point("weights", step)
        size = tf.io.gfile.stat(state).length
        manifest = {
            "step": step,
            "epoch": epoch,
            "files": {STATE_FILENAME: {"size": size, "sha256": _sha256(state)}},
        }
        data = self.data_state() if self.data_state else {}
        if data:
            manifest["data"] = data
        _write_file(os.path.join(directory, MANIFEST_FILENAME),
                    json.dumps(manifest, indent=1).encode())
        _fsync_directory(directory)
        _fault_point("manifest", step)

    def _link_latest(self, final):
        """Points BACKUP_DIR/latest.weights.h5 at the newest state file (for people and tools;
        restoring never follows it). Local file systems only: object stores have no links."""
        if _is_remote(final):
            return
        link = os.path.join(self.backup_dir, LATEST_LINK)
        temporary = os.path.join(self.backup_dir, _TEMPORARY_PREFIX + LATEST_LINK)
        _remove(temporary)
        os.symlink(os.path.join(os.path.basename(final), STATE_FILENAME), temporary)
        os.replace(temporary, link)

    def _prune(self, keep):
        """Removes backups and leftovers of interrupted writes, except the paths in `keep`."""
        for _, path in list_backups(self.backup_dir):
            if path not in keep:
                _remove(path)
        for name in _listdir(self.backup_dir):
            if name.startswith(_TEMPORARY_PREFIX) or name == KERAS_METADATA:
                _remove(os.path.join(self.backup_dir, name))


class AtomicWeightsCheckpoint(keras.callbacks.Callback):
    """Saves `model.save_weights` to `pattern.format(step=...)` at each epoch end, atomically
    (a `Distiller`'s: its student's).

    Keras's `ModelCheckpoint` writes the file in place, so a kill leaves a truncated one.

    Args:
        pattern: the file name with a `{step}` field, such as "DIR/ckpt-{step:07d}.weights.h5";
            the step is the optimizer's update count.
    """

    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern

    def on_epoch_end(self, epoch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        path = self.pattern.format(step=step)
        # A Distiller's checkpoint is its student's weights: the teacher is not trained, and
        # the file loads into the model that MODEL_DIR/model.keras holds.
        model = getattr(self.model, "student", self.model)
        write_weights_atomically(model, path, state_bytes(model))
