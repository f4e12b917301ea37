"""The README's main command, run as written: train the embedded demo, evaluate it, export it.

The demo (configs/demo.flags) must reach eval top-1 >= 0.95 in under 5 minutes on 2 CPUs. The
commands are read from README.md, so the front door cannot drift from what is tested; only the
output root /tmp/keras_vit is moved into the test's temporary directory.
"""

import json
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.train_helpers import REPO, subprocess_env

DEMO_ROOT = "/tmp/keras_vit"
# The demo model's pooled features: 10 training digits per class, then the 359 test digits.
# Measured 0.975 on this machine (2026-12-01; 1-shot 0.976 too: the trained features cluster by
# class); the margin leaves room for another machine's run.
DEMO_FEWSHOT_MARGIN = 0.7


def readme_main_commands():
    """The `python tools/...` steps of the README's first bash block (the main command)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1)
    steps = [step.strip() for step in block.replace("\\\n", " ").split("&&")]
    assert steps[0].startswith("pip install -e ."), steps[0]
    return [shlex.split(step) for step in steps[1:]]


def test_readme_main_command_is_train_evaluate_export():
    tools = [argv[1] for argv in readme_main_commands()]
    assert tools == ["tools/train.py", "tools/evaluate.py", "tools/export.py"]
    assert "--flagfile=configs/demo.flags" in readme_main_commands()[0]


@pytest.mark.slow
def test_readme_main_command(tmp_path):
    root = str(tmp_path)
    durations = {}
    for argv in readme_main_commands():
        argv = [sys.executable] + [arg.replace(DEMO_ROOT, root) for arg in argv[1:]]
        if argv[1] == "tools/train.py":
            # The flagfile names /tmp/keras_vit; later flags override it.
            argv += [f"--train_data={root}/digits", f"--eval_data={root}/digits",
                     f"--model_dir={root}/demo"]
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                                env=subprocess_env(), cwd=REPO)
        durations[argv[1]] = time.perf_counter() - start
        assert result.returncode == 0, f"{argv}\n{result.stderr[-3000:]}"

    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["eval_top1"] >= 0.95, results
    assert results["steps"] == 1800
    # The 5-minute budget holds on an idle 2-core machine (148 s measured under load 7); allow
    # slack for a shared CI runner rather than fail on a busy neighbour.
    assert durations["tools/train.py"] < 600, durations

    evaluation = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert evaluation["num_examples"] == 359  # the digits test split, each example once
    # The same model on the same split: the evaluate tool agrees with training's final eval.
    assert evaluation["top1"] == pytest.approx(results["eval_top1"], abs=1e-6)
    assert (tmp_path / "export" / "1" / "saved_model.pb").exists()

    # Issue 18's few-shot probe of the demo model: 10 digits per class against chance (0.1).
    probe = tmp_path / "probe.json"
    result = subprocess.run(
        [sys.executable, "tools/evaluate.py", f"--checkpoint={root}/demo",
         f"--fewshot_train={root}/digits", "--fewshot_shots=10", f"--output={probe}"],
        capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(probe.read_text())["fewshot"]["10"] > 0.1 + DEMO_FEWSHOT_MARGIN
