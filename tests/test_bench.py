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
