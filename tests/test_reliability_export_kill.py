"""kill -9 during a SavedModel export (issue 14): TF Serving, watching the export directory,
never sees a partial version, and the next export cleans up and publishes the next one.

Each export is killed at another instant after its temporary directory appears: while the
SavedModel, its warmup file or its verification in a second process are being written. The
truth is what TF Serving would load: only integer directories count, and each one that exists
must pass `tools/export.py --verify` (its manifest's probe batch, re-run).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.serving_helpers import tiny_classifier
from tests.train_helpers import REPO, subprocess_env

EXPORT = str(REPO / "tools" / "export.py")
# Seconds between the temporary directory appearing and the kill: from "just created" to the
# verification subprocess (a tiny model's export takes about 10 s after TensorFlow starts).
KILL_DELAYS = (0.0, 0.5, 1.5, 3.0, 5.0)


def export_command(checkpoint, export_dir):
    return [sys.executable, EXPORT, f"--checkpoint={checkpoint}", f"--export_dir={export_dir}",
            "--warmup_batch_sizes=1,2"]


def temporary_dirs(export_dir):
    if not os.path.isdir(export_dir):
        return []
    return [name for name in os.listdir(export_dir) if name.startswith(".tmp-export-")]


def export_killed_after(command, export_dir, delay, timeout=120):
    """Starts the export, waits for its temporary directory, sleeps `delay` s, kills it -9.
    Returns False when the export finished before the kill."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=subprocess_env(), cwd=REPO)
    deadline = time.monotonic() + timeout
    while not temporary_dirs(export_dir) and process.poll() is None:
        assert time.monotonic() < deadline, "the export never created its temporary directory"
        time.sleep(0.02)
    time.sleep(delay)
    finished = process.poll() is not None
    if not finished:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return not finished


def versions(export_dir):
    return sorted(int(name) for name in os.listdir(export_dir) if name.isdigit())


def verify(path):
    result = subprocess.run([sys.executable, EXPORT, f"--verify={path}"], capture_output=True,
                            text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_killed_exports_leave_only_complete_versions(tmp_path):
    checkpoint = str(tmp_path / "tiny.npz")
    tiny_classifier(tmp_path)
    export_dir = str(tmp_path / "export")
    command = export_command(checkpoint, export_dir)
    kills = 0
    for delay in KILL_DELAYS:
        kills += export_killed_after(command, export_dir, delay)
        for version in versions(export_dir):  # what TF Serving would load
            verify(os.path.join(export_dir, str(version)))
    assert kills >= 3, f"only {kills} of {len(KILL_DELAYS)} exports were killed mid-way"
    assert temporary_dirs(export_dir), "no kill left a temporary directory behind"

    before = versions(export_dir)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert versions(export_dir) == before + [(before[-1] if before else 0) + 1]
    # The dead exports' directories are gone: their processes no longer run.
    assert temporary_dirs(export_dir) == []
