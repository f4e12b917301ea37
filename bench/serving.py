r"""CPU inference speed of every export format and precision that installs here.

    python bench/serving.py                                   # ViT-B/16 224, batch 1 and 8
    python bench/serving.py --variant=S/16 --repeats=5        # quicker
    python bench/serving.py --variant=d32_l2_h4_m64_p4 --image_size=16 --repeats=3   # seconds
    python bench/serving.py --timm_python=/tmp/benchvenv/bin/python   # torch + timm live there

Exports the keras_vit classifier (its random initial weights: speed does not depend on them)
in this process, then loads the files in one persistent worker process per runtime, each of
which imports only NumPy and its runtime (and keras_vit/serving/run_exported.py, loaded by
file path: it imports no TensorFlow or Keras):
  - tensorflow: the SavedModels' `predict_pixels` signature, loaded with `tf.saved_model.load`
    in a process where `keras`, `keras_vit` and `pipelines` cannot be imported (as in TF
    Serving); float32 and bfloat16 (`export_classifier(precision=...)`);
  - litert: LiteRT's interpreter with XNNPACK (float32, float16, int8, int8_full);
  - onnxruntime: ONNX Runtime, CPU provider (float32, int8);
  - openvino: OpenVINO CPU with the precision's inference hint (float32, bfloat16, and int8
    from NNCF), and timm_openvino: timm's `vit_base_patch16_224` (random weights) exported to
    ONNX (opset 17, dynamic batch) by torch and run by OpenVINO with f32 and bf16 hints on its
    own NCHW layout, as the outside reference. The export runs in `--timm_python` (an
    interpreter with torch and timm, kept apart from keras-vit: a bench-only extra); the rows
    are skipped with a message when it lacks them, and for anything but B/16 at 224.
The parent times all cases alternating round by round, the order rotating, after warm-up
(`bench/timing.py`): it sends a worker "run case X once" (a JSON line on its stdin) and gets
back the seconds the call took in the worker (a JSON line on its stdout), so only one worker
computes at a time and the pipe's round trip is not counted; between its requests a worker is
stopped (SIGSTOP), so idle runtimes' spinning threads take no CPU (`Worker`). Each runtime uses
its default thread count (all cores). Prints the modules among tensorflow/keras/keras_vit/torch
each worker had imported when timing ended, then per case: images/s (batch / median seconds), the
median (p50) and 99th-percentile (p99) latency of a call, and the ratios the issue targets.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# --- The worker side. It runs before absl and the flags are imported (see the end of this
# section), so that a worker or the timm export imports nothing but its runtime and NumPy. ---

# The format each worker runs -> the runtime (and worker) that runs it.
RUNTIME_OF_FORMAT = {"saved_model": "tensorflow", "litert": "litert", "onnx": "onnxruntime",
                     "openvino": "openvino", "timm_openvino": "openvino"}
REPORTED_MODULES = ("tensorflow", "keras", "keras_vit", "torch")
# Kept out of the TensorFlow worker: a SavedModel must run without them (TF Serving has
# neither). `import tensorflow` imports keras when it can, and goes on without it.
_BLOCKED_IN_TENSORFLOW = ("keras", "keras_vit", "pipelines")
_TIMM_MODEL = "vit_base_patch16_224"
_TIMM_EXTRA = "pip install torch timm (torchvision too: timm imports it)"
_MISSING_EXTRA_EXIT = 3
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_PARENT_PID_VARIABLE = "KERAS_VIT_BENCH_PARENT_PID"  # set by `Worker` for `_die_with_the_parent`


def _run_exported_module():
    """keras_vit/serving/run_exported.py loaded by path: no keras_vit (hence no Keras)."""
    import importlib.util

    repository = os.path.dirname(_BENCH_DIR)
    if repository not in sys.path:  # for its `pipelines.errors`, without an installed package
        sys.path.insert(0, repository)
    spec = importlib.util.spec_from_file_location(
        "run_exported", os.path.join(_BENCH_DIR, "..", "keras_vit", "serving", "run_exported.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_model_call(path):
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures["predict_pixels"]
    return lambda images: signature(images=tf.constant(images))["probabilities"].numpy()


def _timm_call(path, precision):
    """OpenVINO running timm's ONNX on NCHW input (its own layout; the transpose is timed)."""
    import numpy as np
    import openvino as ov

    hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    return lambda images: request.infer({0: np.ascontiguousarray(images.transpose(0, 3, 1, 2))})


def _load_case(model, run_exported):
    """A callable(images) for one exported model entry {format, precision, path}."""
    if model["format"] == "saved_model":
        return _saved_model_call(model["path"])
    if model["format"] == "timm_openvino":
        return _timm_call(model["path"], model["precision"])
    return run_exported.load(model["path"])


def _imported_modules():
    """The REPORTED_MODULES this process holds (a blocked one is None there, not imported)."""
    return [name for name in REPORTED_MODULES if sys.modules.get(name) is not None]


def _worker_load(message, run_exported):
    """{"models": [{format, precision, path}], "batch_sizes", "image_size"} -> the callables
    {case id: callable()} and the reply (ids loaded, models skipped with the reason)."""
    import numpy as np

    rng = np.random.default_rng(0)
    cases, skipped = {}, []
    for model in message["models"]:
        try:
            call = _load_case(model, run_exported)
        except ImportError as error:  # run_exported's MissingExtraError is an ImportError
            skipped.append(f"{model['format']} {model['precision']}: {error}")
            continue
        for batch in message["batch_sizes"]:
            size = message["image_size"]
            images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
            case_id = f"{model['format']}:{model['precision']}:{batch}"
            cases[case_id] = lambda call=call, images=images: call(images)
    return cases, {"loaded": list(cases), "skipped": skipped}


def _die_with_the_parent():
    """Has Linux kill this worker when the parent dies: a worker the parent stopped (`Worker`)
    cannot read the end of its input, and would otherwise stay stopped, holding its models,
    after a parent killed with SIGKILL. Elsewhere a no-op.

    A parent that died before this call sends no signal: the worker was already re-parented,
    so it exits when its parent is not the one `Worker` named in `_PARENT_PID_VARIABLE`.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        expected = os.environ.get(_PARENT_PID_VARIABLE)
        if expected is not None and os.getppid() != int(expected):
            sys.exit(f"bench/serving.py worker: the parent {expected} died before the worker "
                     f"started (its parent is now {os.getppid()}); exiting.")


def _worker_main(runtime):
    """A worker's loop: one JSON request per stdin line, one JSON reply per line.

    Requests: {"op": "load", ...} (see `_worker_load`), {"op": "run", "case": id} -> {"seconds":
    the call's wall time}, {"op": "modules"} -> {"modules": [...]}. Ends at end of input.
    """
    _die_with_the_parent()
    # The replies get their own copy of stdout; what the runtimes print goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if runtime == "tensorflow":
        for name in _BLOCKED_IN_TENSORFLOW:
            sys.modules[name] = None
    run_exported = None if runtime == "tensorflow" else _run_exported_module()
    cases = {}
    for line in sys.stdin:
        message = json.loads(line)
        if message["op"] == "load":
            cases, reply = _worker_load(message, run_exported)
        elif message["op"] == "run":
            start = time.perf_counter()
            cases[message["case"]]()
            reply = {"seconds": time.perf_counter() - start}
        elif message["op"] == "modules":
            reply = {"modules": _imported_modules()}
        else:
            raise ValueError(f"unknown request {message!r}")
        replies.write(json.dumps(reply) + "\n")
    return 0


def _export_timm_main(path):
    """In --timm_python: timm's ViT-B/16 (random weights) as ONNX at `path`, batch dynamic."""
    try:
        import timm
        import torch
    except ImportError as error:
        print(f"{sys.executable} cannot export timm's {_TIMM_MODEL}: {error}. Install the "
              f"bench-only extra there: {_TIMM_EXTRA}; or pass --timm_python=an interpreter "
              "that has them.", file=sys.stderr)
        return _MISSING_EXTRA_EXIT
    model = timm.create_model(_TIMM_MODEL, pretrained=False).eval()
    # The TorchScript exporter (dynamo=False) needs neither onnxscript nor onnx installed.
    # Renamed when complete: a killed export leaves no file that --export_dir would reuse.
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), path + ".partial",
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    os.replace(path + ".partial", path)
    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__}))
    return 0


_CHILD_MODES = {"worker": _worker_main, "export_timm": _export_timm_main}
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] in _CHILD_MODES:
    sys.exit(_CHILD_MODES[sys.argv[1]](sys.argv[2]))

# --- The parent: flags, exports, timing, the table. ---

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "B/16", "keras_vit variant (or a custom d.._l.. name).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side in pixels.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Width of the classification head.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Images per call.")
_FORMATS = flags.DEFINE_list(
    "formats", ["saved_model", "litert", "onnx", "openvino", "timm_openvino"], "What to time.")
_SKIP_PRECISIONS = flags.DEFINE_list(
    "skip", [], "format:precision pairs not to time, e.g. litert:int8_full.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds; medians and p99 over them.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each case first.")
_TIMM_PYTHON = flags.DEFINE_string(
    "timm_python", sys.executable,
    "Python interpreter with torch and timm that exports the timm reference to ONNX (default: "
    "this one), e.g. a venv kept apart from keras-vit.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None,
    "Directory the exports are written to and kept in; those already there from an earlier "
    "run with the same --variant, --image_size and --num_classes are reused (to time again "
    "without exporting again). Default: a temporary directory, removed at the end.")

EXTENSIONS = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}


def _check_reusable(directory):
    """Records in `directory` which model its exports are of; UsageError if another one's."""
    spec = {"variant": _VARIANT.value, "image_size": _IMAGE_SIZE.value,
            "num_classes": _NUM_CLASSES.value}
    path = os.path.join(directory, "exports.json")
    if os.path.exists(path):
        with open(path) as stream:
            found = json.load(stream)
        if found != spec:
            raise app.UsageError(f"--export_dir={directory} holds the exports of {found}, not "
                                 f"{spec}: pass another directory or remove that one.")
        return
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as stream:
        json.dump(spec, stream)


def export_all(directory):
    """Exports every format and precision asked for into `directory` (reusing finished
    exports found there: `_check_reusable`).

    Returns:
        [{format, precision, path}], the models the workers load.
    """
    import numpy as np

    import keras_vit
    from keras_vit.serving import runtimes

    model = keras_vit.create_model(_VARIANT.value, image_size=_IMAGE_SIZE.value,
                                   num_classes=_NUM_CLASSES.value)
    calibration = np.random.default_rng(1).uniform(
        0, 255, (16, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)).astype(np.float32)
    models = []
    for file_format in _FORMATS.value:
        if file_format == "timm_openvino":
            models += _export_timm(directory)
            continue
        precisions = (("float32", "bfloat16") if file_format == "saved_model"
                      else runtimes.PRECISIONS[file_format])
        for precision in precisions:
            if f"{file_format}:{precision}" in _SKIP_PRECISIONS.value:
                continue
            try:
                path = _export(model, file_format, precision, directory, calibration)
            except (ImportError, TypeError, ValueError) as error:  # missing extra, no precision
                print(f"skipped {file_format} {precision}: {type(error).__name__}: {error}")
                continue
            models.append({"format": file_format, "precision": precision, "path": path})
    return models


def _export(model, file_format, precision, directory, calibration):
    from keras_vit.serving import export_classifier, existing_versions, runtimes

    if file_format == "saved_model":
        export_dir = os.path.join(directory, f"saved_model_{precision}")
        if os.path.isdir(export_dir) and existing_versions(export_dir):
            return _reused(os.path.join(export_dir, str(existing_versions(export_dir)[-1])))
        kwargs = {} if precision == "float32" else {"precision": precision}
        return export_classifier(model, export_dir, **kwargs).path
    path = os.path.join(directory, f"{file_format}_{precision}{EXTENSIONS[file_format]}")
    if os.path.exists(path):  # published last, when complete (OpenVINO's .xml after its .bin)
        return _reused(path)
    kwargs = {"calibration_images": calibration} if "int8" in precision else {}
    runtimes.EXPORTERS[file_format](model, path, precision=precision, **kwargs)
    return path


def _reused(path):
    print(f"reused {path}")
    return path


def _export_timm(directory):
    """timm's ViT-B/16 as ONNX (exported by --timm_python), both OpenVINO precisions; [] with
    a message when the variant is not B/16 at 224 or that interpreter lacks torch or timm."""
    if _VARIANT.value.upper().replace("VIT-", "") != "B/16" or _IMAGE_SIZE.value != 224:
        print(f"skipped timm_openvino: the reference is timm's {_TIMM_MODEL} (B/16, 224)")
        return []
    path = os.path.join(directory, "timm_vit_b16.onnx")
    if os.path.exists(path):
        return [{"format": "timm_openvino", "precision": precision, "path": _reused(path)}
                for precision in ("float32", "bfloat16")]
    result = subprocess.run([_TIMM_PYTHON.value, os.path.abspath(__file__), "export_timm", path],
                            capture_output=True, text=True)
    if result.returncode == _MISSING_EXTRA_EXIT:
        print(f"skipped timm_openvino: {result.stderr.strip().splitlines()[-1]}")
        return []
    if result.returncode:
        raise RuntimeError(f"Exporting timm's {_TIMM_MODEL} with --timm_python="
                           f"{_TIMM_PYTHON.value} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    print(f"timm_openvino: exported with {result.stdout.strip().splitlines()[-1]}")
    return [{"format": "timm_openvino", "precision": precision, "path": path}
            for precision in ("float32", "bfloat16")]


class Worker:
    """One runtime's worker process (`_worker_main`), spoken to in JSON lines.

    Between requests the worker is stopped (SIGSTOP), so that while another worker computes,
    its runtime's idle threads take no CPU: ONNX Runtime's and TensorFlow's thread pools spin
    after a call, and on 2 cores an idle ONNX Runtime worker made the SavedModel's bfloat16
    calls 22% slower (bench/NOTES.md, "LayerNorm form, and workers that take turns").
    """

    def __init__(self, runtime):
        self.runtime = runtime
        # stderr is inherited: the runtime's own messages and a worker's traceback show.
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker", runtime],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, _PARENT_PID_VARIABLE: str(os.getpid())})

    def _signal(self, name):
        """Sends signal `name` ("SIGSTOP", "SIGCONT") if the worker lives and the OS has it."""
        if hasattr(signal, name) and self._process.poll() is None:
            self._process.send_signal(getattr(signal, name))

    def request(self, **message):
        """Sends one request; returns the worker's reply (RuntimeError if it died)."""
        self._signal("SIGCONT")
        try:
            return self._exchange(message)
        finally:
            self._signal("SIGSTOP")

    def _exchange(self, message):
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"The {self.runtime} worker (bench/serving.py worker "
                               f"{self.runtime}) exited (code {self._process.wait()}) on "
                               f"{message['op']}; its traceback is above.")
        return json.loads(line)

    def close(self):
        """Ends the worker (end of its input) and waits for it."""
        self._signal("SIGCONT")
        try:
            self._process.stdin.close()
        except BrokenPipeError:  # it had died already
            pass
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a runtime that hangs on exit: the others still close
            self._process.kill()
            self._process.wait()


def time_cases(models, batch_sizes, image_size, repeats, warmup):
    """Loads `models` in one worker per runtime and times every case interleaved.

    Returns:
        (results [{format, precision, batch, seconds: [per timed round]}],
         {runtime: the REPORTED_MODULES its worker had imported after timing}).
    """
    workers = {}
    for runtime in dict.fromkeys(RUNTIME_OF_FORMAT[m["format"]] for m in models):
        workers[runtime] = Worker(runtime)
    try:
        cases, seconds = {}, {}
        for runtime, worker in workers.items():
            reply = worker.request(
                op="load", models=[m for m in models if RUNTIME_OF_FORMAT[m["format"]] == runtime],
                batch_sizes=batch_sizes, image_size=image_size)
            for line in reply["skipped"]:
                print(f"skipped {line}")
            for case_id in reply["loaded"]:
                seconds[case_id] = []
                cases[case_id] = lambda worker=worker, case_id=case_id: seconds[case_id].append(
                    worker.request(op="run", case=case_id)["seconds"])
        _interleaved(cases, repeats, warmup)
        modules = {runtime: worker.request(op="modules")["modules"]
                   for runtime, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    results = []
    for case_id, values in seconds.items():
        file_format, precision, batch = case_id.split(":")
        # The first `warmup` calls are interleaved_medians' untimed ones.
        results.append({"format": file_format, "precision": precision, "batch": int(batch),
                        "seconds": values[warmup:]})
    return results, modules


def _interleaved(cases, repeats, warmup):
    """`timing.interleaved_medians` over `cases` (each appends its worker's seconds)."""
    from timing import interleaved_medians  # bench/timing.py, beside this file

    def progress(round_index, this_round):
        logging.info("round %d of %d done", round_index + 1, repeats)

    interleaved_medians(cases, repeats=repeats, warmup=warmup, on_round=progress)


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def format_imports(modules):
    """One line: each worker and the REPORTED_MODULES it had imported ('none' if none)."""
    return "worker imports: " + "; ".join(
        f"{runtime}: {', '.join(names) or 'none'}" for runtime, names in modules.items())


def format_table(results):
    header = (f"{'format':<15}{'precision':<11}{'batch':>6}{'images/s':>10}{'p50 ms':>10}"
              f"{'p99 ms':>10}")
    lines = [header, "-" * len(header)]
    for row in results:
        p50 = statistics.median(row["seconds"])
        lines.append(f"{row['format']:<15}{row['precision']:<11}{row['batch']:>6}"
                     f"{row['batch'] / p50:>10.2f}{p50 * 1e3:>10.2f}"
                     f"{_percentile(row['seconds'], 0.99) * 1e3:>10.2f}")
    return "\n".join(lines)


def ratios(results, batch):
    """The issue's target ratios at `batch`, as text ('n/a' where a row is missing)."""
    rate = {(r["format"], r["precision"]): r["batch"] / statistics.median(r["seconds"])
            for r in results if r["batch"] == batch}
    ours = {key: value for key, value in rate.items() if key[0] != "timm_openvino"}
    lines = []
    for precision in ("float32", "bfloat16"):
        reference = rate.get(("timm_openvino", precision))
        candidates = [v for (f, p), v in ours.items() if p == precision]
        best = max(candidates, default=None)
        lines.append(f"batch {batch} {precision}: fastest keras_vit / timm on OpenVINO = "
                     + (f"{best / reference:.2f}" if best and reference else "n/a"))
    saved = rate.get(("saved_model", "bfloat16"))
    reference = rate.get(("timm_openvino", "bfloat16"))
    lines.append(f"batch {batch}: SavedModel bfloat16 / timm on OpenVINO bfloat16 = "
                 + (f"{saved / reference:.2f}" if saved and reference else "n/a"))
    for file_format in ("litert", "openvino", "onnx"):
        for precision in ("int8", "int8_full"):
            if (file_format, precision) in rate and (file_format, "float32") in rate:
                speedup = rate[(file_format, precision)] / rate[(file_format, "float32")]
                lines.append(f"batch {batch}: {file_format} {precision} / float32 = {speedup:.2f}")
    return lines


def main(argv):
    del argv
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    with tempfile.TemporaryDirectory() as temporary:
        directory = _EXPORT_DIR.value or temporary
        _check_reusable(directory)
        models = export_all(directory)
        load_before = os.getloadavg()
        results, modules = time_cases(models, batch_sizes, _IMAGE_SIZE.value,
                                      _REPEATS.value, _WARMUP.value)
    print(f"variant={_VARIANT.value} image_size={_IMAGE_SIZE.value} "
          f"num_classes={_NUM_CLASSES.value} repeats={_REPEATS.value} warmup={_WARMUP.value} "
          f"cpus={os.cpu_count()} load_before={load_before[0]:.2f} "
          f"load_after={os.getloadavg()[0]:.2f} date={time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(format_imports(modules))
    print(format_table(results))
    for batch in sorted({r["batch"] for r in results}):
        print("\n".join(ratios(results, batch)))


if __name__ == "__main__":
    app.run(main)
