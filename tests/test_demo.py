"""The embedded demo (configs/demo.flags) reaches eval top-1 >= 0.95 in under 5 minutes on 2 CPUs."""

import json
import time

import pytest

from tests.test_train_helpers import REPO, TRAIN, subprocess_env


@pytest.mark.slow
def test_demo_reaches_its_accuracy(tmp_path):
    import subprocess
    import sys

    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, TRAIN, f"--flagfile={REPO / 'configs' / 'demo.flags'}",
         f"--train_data={tmp_path / 'digits'}", f"--eval_data={tmp_path / 'digits'}",
         f"--model_dir={tmp_path / 'demo'}"],
        capture_output=True, text=True, timeout=900, env=subprocess_env(), cwd=REPO)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["eval_top1"] >= 0.95, results
    assert results["steps"] == 1200
    # The 5-minute budget holds on an idle 2-core machine (148 s measured under load 7); allow
    # slack for a shared CI runner rather than fail on a busy neighbour.
    assert seconds < 600, f"demo took {seconds:.0f} s"
