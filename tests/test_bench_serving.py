"""bench/serving.py: one worker process per runtime, each importing only its runtime.

The benchmark's speeds are measurements and are not tested; what is: one row per format x
precision x batch that installs here (against a hand list of what each format offers, filtered
by the packages importable here), images/s agreeing with p50 and the batch, ratio lines agreeing
with the table, the workers' import report (TensorFlow only in the SavedModel's worker, and no
Keras or keras_vit there), the worker protocol itself on a hand-built ONNX model, and the timm
export's message when its interpreter lacks torch or timm.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

SCRIPT = str(REPO / "bench" / "serving.py")
TINY = "d32_l2_h4_m64_p4"  # hidden 32, 2 layers, 4 heads, MLP 64, patch 4
BATCHES = (1, 2)
# What each format offers (docs/serving.md) and the packages its export and runtime need.
OFFERED = {
    "saved_model": {"float32": [], "bfloat16": []},
    "litert": {p: ["ai_edge_litert"] for p in ("float32", "float16", "int8", "int8_full")},
    "onnx": {p: ["tf2onnx", "onnxruntime"] for p in ("float32", "int8")},
    "openvino": {"float32": ["openvino"], "bfloat16": ["openvino"],
                 "int8": ["openvino", "nncf"]},
}
ROW = re.compile(r"^(\w+) +(\w+) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+)$")


def _installed(packages):
    return all(importlib.util.find_spec(name) is not None for name in packages)


def _bench(*args, check=True):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_serving_benchmark_on_a_tiny_variant(tmp_path):
    args = [f"--variant={TINY}", "--image_size=16", "--num_classes=10",
            f"--batch_sizes={','.join(map(str, BATCHES))}", "--repeats=2", "--warmup=0",
            f"--export_dir={tmp_path}"]
    first = _bench(*args)
    output = first.stdout
    _check_table(output)
    # Again on the same --export_dir: every file is reused (none exported: the exporters log
    # "Exported" to stderr), the same rows come out.
    again = _bench(*args)
    assert f"Exported {tmp_path}" in first.stderr and f"Exported {tmp_path}" not in again.stderr
    assert again.stdout.count("reused ") == len(_rows(output)) // len(BATCHES)
    assert set(_rows(again.stdout)) == set(_rows(output))
    # Exports of another model are refused, naming the directory.
    refused = _bench(*args, "--num_classes=11", check=False)
    assert refused.returncode != 0 and f"--export_dir={tmp_path} holds the exports of" in (
        refused.stdout + refused.stderr)


def _rows(output):
    """{(format, precision, batch): (images/s, p50 ms, p99 ms)} from the printed table."""
    return {(m[1], m[2], int(m[3])): tuple(map(float, m.group(4, 5, 6)))
            for m in map(ROW.match, output.splitlines()) if m}


def _check_table(output):
    lines = output.splitlines()
    rows = _rows(output)
    expected = {(f, p, b) for f, precisions in OFFERED.items()
                for p, packages in precisions.items() if _installed(packages) for b in BATCHES}
    assert set(rows) == expected, output
    for (_, _, batch), (images_per_s, p50_ms, p99_ms) in rows.items():
        # p50 is printed to 0.01 ms, images/s to 0.01: the bounds allow just that rounding.
        low = batch * 1e3 / (p50_ms + 0.005) - 0.005
        high = batch * 1e3 / max(p50_ms - 0.005, 1e-9) + 0.005
        assert low <= images_per_s <= high, (batch, images_per_s, p50_ms)
        assert p99_ms >= p50_ms
    assert "skipped timm_openvino: the reference is timm's vit_base_patch16_224" in output
    imports = next(line for line in lines if line.startswith("worker imports: "))
    reported = dict(part.split(": ") for part in imports[len("worker imports: "):].split("; "))
    runtimes = {"saved_model": "tensorflow", "litert": "litert", "onnx": "onnxruntime",
                "openvino": "openvino"}
    assert set(reported) == {runtimes[f] for f, _, _ in expected}
    assert reported.pop("tensorflow") == "tensorflow"  # neither keras nor keras_vit
    assert set(reported.values()) == {"none"}, imports
    for batch in BATCHES:
        if ("openvino", "int8", batch) in rows:
            ratio = rows[("openvino", "int8", batch)][0] / rows[("openvino", "float32", batch)][0]
            line = next(l for l in lines if l.startswith(f"batch {batch}: openvino int8 / "))
            assert abs(float(line.split("= ")[1]) - ratio) <= 0.01 + 1e-3 * ratio, line


def _onnx_classifier(path, size=2, top_k=2):
    """A hand-built model with run_exported's interface: images (N, size, size, 3) ->
    probabilities = softmax of the flattened pixels, classes/scores = their top-k."""
    import onnx
    from onnx import TensorProto, helper

    k = helper.make_tensor("k", TensorProto.INT64, [1], [top_k])
    nodes = [helper.make_node("Flatten", ["images"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["probabilities"], axis=1),
             helper.make_node("TopK", ["probabilities", "k"], ["scores", "indices"]),
             helper.make_node("Cast", ["indices"], ["classes"], to=TensorProto.INT32)]
    classes = size * size * 3
    graph = helper.make_graph(
        nodes, "hand_built", [helper.make_tensor_value_info(
            "images", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("classes", TensorProto.INT32, ["batch", top_k]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", top_k])],
        initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, path)


def test_worker_protocol_on_a_hand_built_onnx_model(tmp_path):
    """A worker answers load/run/modules in JSON lines; `seconds` is the call's time inside
    it (at most the round trip the parent sees); it imports no TensorFlow or keras."""
    pytest.importorskip("onnxruntime",
                        reason="onnxruntime is an export extra: pip install -e '.[export]'")
    pytest.importorskip("onnx", reason="onnx is an export extra: pip install -e '.[export]'")
    path = str(tmp_path / "hand.onnx")
    _onnx_classifier(path)
    worker = subprocess.Popen([sys.executable, SCRIPT, "worker", "onnxruntime"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(**message):
        start = time.perf_counter()
        worker.stdin.write(json.dumps(message) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline()), time.perf_counter() - start

    try:
        loaded, _ = ask(op="load", models=[{"format": "onnx", "precision": "float32",
                                            "path": path}], batch_sizes=[1, 3], image_size=2)
        assert loaded == {"loaded": ["onnx:float32:1", "onnx:float32:3"], "skipped": []}
        for case in loaded["loaded"]:
            reply, round_trip = ask(op="run", case=case)
            assert 0 < reply["seconds"] <= round_trip
        assert ask(op="modules")[0] == {"modules": []}
    finally:
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0


_STOPPED_WORKER_SCRIPT = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("serving_bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

def settled_state(pid):  # a signal is delivered asynchronously: poll for up to 5 s
    for _ in range(100):
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        if state == "T":
            break
        time.sleep(0.05)
    return state

worker = bench.Worker("onnxruntime")
loaded = worker.request(op="load", models=[{"format": "onnx", "precision": "float32",
                                            "path": sys.argv[2]}], batch_sizes=[1], image_size=2)
states = [settled_state(worker._process.pid)]
seconds = worker.request(op="run", case=loaded["loaded"][0])["seconds"]
states.append(settled_state(worker._process.pid))
worker.close()
print(json.dumps({"states": states, "seconds": seconds, "exit": worker._process.returncode}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/stat")
def test_workers_are_stopped_between_their_requests(tmp_path):
    """While one worker computes the others are stopped (SIGSTOP: their runtimes' idle
    threads spin and would take CPU); a stopped worker answers its next request, and closes."""
    pytest.importorskip("onnxruntime",
                        reason="onnxruntime is an export extra: pip install -e '.[export]'")
    pytest.importorskip("onnx", reason="onnx is an export extra: pip install -e '.[export]'")
    path = str(tmp_path / "hand.onnx")
    _onnx_classifier(path)
    result = subprocess.run([sys.executable, "-c", _STOPPED_WORKER_SCRIPT, SCRIPT, path],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["states"] == ["T", "T"]  # stopped after loading, and after running
    assert report["seconds"] > 0 and report["exit"] == 0


_ORPHANING_PARENT_SCRIPT = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("serving_bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
worker = bench.Worker("onnxruntime")
worker.request(op="modules")  # the worker is stopped after it
print(worker._process.pid, flush=True)
os._exit(0)  # as if killed: no close()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG, /proc")
def test_a_stopped_worker_dies_with_its_parent():
    """A parent killed without closing its workers leaves none behind, stopped or not."""
    pytest.importorskip("onnxruntime",
                        reason="onnxruntime is an export extra: pip install -e '.[export]'")
    result = subprocess.run([sys.executable, "-c", _ORPHANING_PARENT_SCRIPT, SCRIPT], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pid = int(result.stdout.strip().splitlines()[-1])
    state = None
    for _ in range(100):  # up to 5 s
        try:
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):  # dead (a zombie until init reaps it)
            break
        time.sleep(0.05)
    if state not in ("gone", "Z"):
        os.kill(pid, signal.SIGKILL)
    assert state in ("gone", "Z"), f"the orphaned worker {pid} is still alive, state {state}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_a_worker_whose_parent_died_before_it_started_exits():
    """The parent named in the environment is not the worker's: it died before the worker's
    PR_SET_PDEATHSIG, whose signal would never come. The worker exits without reading input."""
    result = subprocess.run(
        [sys.executable, SCRIPT, "worker", "onnxruntime"], cwd=REPO, capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "KERAS_VIT_BENCH_PARENT_PID": str(os.getpid() + 1_000_000)})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "died before the worker started" in result.stderr, result.stderr[-3000:]
    # Its own parent (this process) named, the same worker runs: it answers a request and ends
    # at the end of its input.
    result = subprocess.run(
        [sys.executable, SCRIPT, "worker", "onnxruntime"], cwd=REPO, capture_output=True,
        text=True, timeout=60, input=json.dumps({"op": "modules"}) + "\n",
        env={**os.environ, "KERAS_VIT_BENCH_PARENT_PID": str(os.getpid())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "modules" in json.loads(result.stdout.strip()), result.stdout


def test_timm_export_names_the_extra_when_torch_and_timm_are_missing(tmp_path):
    """--timm_python without torch/timm: exit 3 and a message naming the interpreter and
    what to install (the parent prints it as the skip reason); no file is written."""
    hide = ("import sys\n"
            "class _Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'timm'):\n"
            "            raise ImportError(f'No module named {name!r} (hidden by the test)')\n"
            "sys.meta_path.insert(0, _Hide())\n"
            "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
            "run_name='__main__')\n")
    path = tmp_path / "timm.onnx"
    result = subprocess.run([sys.executable, "-c", hide, SCRIPT, "export_timm", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert sys.executable in result.stderr
    assert "pip install torch timm" in result.stderr
    assert not path.exists()
