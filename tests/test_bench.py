"""bench/model.py and bench/gpu.py run end to end on a tiny ViT and print what they promise.

The benchmarks' numbers are not tested (they are measurements); what is: that every case runs,
the table has one row per (implementation, precision, XLA, mode), images/s agrees with ms/step
and the batch, GFLOP/s agrees with keras_vit.flops, and the last lines have their fixed format.
"""

import os
import re
import subprocess
import sys

import pytest

import keras_vit
from keras_vit import flops
from conftest import REPO

TINY = "d32_l1_h2_m64_p8"  # hidden 32, 1 layer, 2 heads, MLP 64, patch 8
SIZE, BATCH = 16, 4
NUMBER = r"(\d+(?:\.\d+)?)"
# Makes `import tensorflow` fail as on a machine without it (Keras checks sys.modules, so the
# module is refused by an import hook rather than set to None there).
_HIDE_TENSORFLOW = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_text", "tf_keras"):
            raise ImportError(f"{name} is hidden by the test: the GPU machine has no TensorFlow")
sys.meta_path.insert(0, _NoTensorFlow())
"""


def _run(args, env_overrides=None, prelude=""):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_overrides or {})}
    # As `python SCRIPT` runs it: the script's own folder first on sys.path (for bench/timing.py).
    code = (prelude + "import os, runpy, sys; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0]))); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_model_benchmark_on_a_tiny_variant():
    output = _run([
        "bench/model.py", f"--variant={TINY}", f"--image_size={SIZE}", f"--batch_size={BATCH}",
        "--num_classes=10", "--repeats=2", "--warmup=1", "--compare=keras_hub"])
    lines = output.strip().splitlines()
    rows = [line.split() for line in lines if re.match(r"^(keras_vit|keras_hub|matmul) +(fp32|bf16) ", line)]
    keras_hub = any(row[0] == "keras_hub" for row in rows)
    # keras_vit trains with its trainer's optimizer, keras-hub with Keras's (the header says so).
    optimizers = "keras_vit with FusedAdamW" + (", keras_hub with AdamW" if keras_hub else "")
    assert f"train: {optimizers}\n" in output
    implementations = 2 if keras_hub else 1
    # Per precision: 2 matmul rows + per implementation 2 XLA settings x 2 modes.
    assert len(rows) == 2 * (2 + implementations * 4)
    # Each implementation's own work: keras_vit's last block runs the class token alone.
    forward = {name: flops.forward_flops(keras_vit.parse_variant(TINY), image_size=SIZE,
                                         num_classes=10, class_token_only=name == "keras_vit")
               for name in ("keras_vit", "keras_hub")}
    for name, precision, xla, mode, ms, images, gflops, percent in rows:
        assert precision in ("fp32", "bf16") and xla in ("on", "off")
        assert float(ms) > 0 and float(gflops) > 0 and float(percent.rstrip("%")) > 0
        if name != "matmul":
            assert abs(float(images) - BATCH / (float(ms) / 1e3)) <= 0.01 * float(images) + 0.01
            work = forward[name] * BATCH * (3 if mode == "train" else 1)
            # GFLOP/s = work / seconds, within the rounding of the printed ms.
            assert float(gflops) == pytest.approx(work / (float(ms) / 1e3) / 1e9, rel=0.1, abs=0.05)
    assert re.fullmatch(rf"keras_vit bf16_train/fp32_train={NUMBER}", lines[-2])
    value = NUMBER if keras_hub else "n/a"
    match = re.fullmatch(
        rf"speedup_vs_keras_hub fp32_infer={value} bf16_infer={value} fp32_train={value}", lines[-1])
    assert match, lines[-1]
    if keras_hub:
        assert all(float(group) > 0 for group in match.groups())


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_under_jax_without_tensorflow():
    # The GPU machine has no TensorFlow: hide it, as if it were not installed.
    output = _run(
        ["bench/gpu.py", f"--variant={TINY}", f"--image_size={SIZE}", f"--batch_size={BATCH}",
         "--num_classes=10", "--repeats=2", "--warmup=1"],
        env_overrides={"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
        prelude=_HIDE_TENSORFLOW)
    last = output.strip().splitlines()[-1]
    match = re.fullmatch(rf"gpu_train images_per_s={NUMBER} mfu={NUMBER} device=(\S+)", last)
    assert match, last
    assert float(match.group(1)) > 0 and float(match.group(2)) > 0
    assert match.group(3).lower() == "cpu"


@pytest.mark.slow
def test_memory_benchmark_on_a_tiny_variant():
    output = _run([
        "bench/memory.py", f"--variant={TINY}", f"--image_size={SIZE}", f"--batch_size={BATCH}",
        "--num_classes=10", "--repeats=2", "--warmup=1"])
    lines = output.strip().splitlines()
    table = [line.split() for line in lines if "=" not in line]  # not the summary line
    rows = {row[0]: [float(value) for value in row[1:5]] for row in table
            if len(row) == 6 and row[0] in ("plain", "remat", "ema", "layer_decay")}
    assert sorted(rows) == ["ema", "layer_decay", "plain", "remat"]  # one child process each
    for case, (ms, images, peak, step) in rows.items():
        assert ms > 0 and peak > 0 and 0 <= step <= peak, case
        # ms/step is printed to 0.1 ms, images/s to 0.01.
        assert images == pytest.approx(BATCH / (ms / 1e3), rel=0.05 / ms + 1e-3, abs=0.01), case
    match = re.fullmatch(
        rf"remat peak_rss=([+-]{NUMBER})% step_rss=([+-]{NUMBER})% step_time=([+-]{NUMBER})% "
        rf"ema_step_time=([+-]{NUMBER})% layer_decay_step_time=([+-]{NUMBER})%", lines[-1])
    assert match, lines[-1]
    # Each change is the table's own ratio against the plain row: times from images/s (printed
    # to 0.01), memory from whole MiB, so within the printed rounding.
    plain = rows["plain"]

    def rounding(found, base, half_unit):
        return 100 * half_unit * (1 / base + found / base**2) + 0.1

    checks = [(rows["remat"][2], plain[2], 0.5), (rows["remat"][3], plain[3], 0.5)]
    for (found, base, half_unit), change in zip(checks, (1, 3)):
        assert float(match.group(change)) == pytest.approx(
            100 * (found / base - 1), abs=rounding(found, base, half_unit)), lines[-1]
    for case, group in (("remat", 5), ("ema", 7), ("layer_decay", 9)):
        # ms ratio = inverse images/s ratio
        ratio = plain[1] / rows[case][1]
        assert float(match.group(group)) == pytest.approx(100 * (ratio - 1), rel=0.02, abs=0.5), case
