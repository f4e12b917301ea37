r"""CPU inference speed of every export format and precision that installs here.

    python bench/serving.py                                   # ViT-B/16 224, batch 1 and 8
    python bench/serving.py --variant=S/16 --repeats=5        # quicker
    python bench/serving.py --variant=d32_l2_h4_m64_p4 --image_size=16 --repeats=3   # seconds

Exports the keras_vit classifier (its random initial weights: speed does not depend on them)
in this process, then times, in one child process, alternating round by round (the order
rotating) after warm-up, one call per case and round of:
  - saved_model: the SavedModel's `predict_pixels` signature, loaded with `tf.saved_model.load`
    (TensorFlow only, no Keras, no keras_vit); float32, and bfloat16 where
    `export_classifier` takes `precision`;
  - litert: LiteRT's interpreter with XNNPACK (float32, float16, int8, int8_full);
  - onnx: ONNX Runtime, CPU provider (float32);
  - openvino: OpenVINO CPU with the precision's inference hint (float32, bfloat16; int8 with
    NNCF installed);
  - timm_openvino: timm's `vit_base_patch16_224` (random weights) exported to ONNX by torch and
    run by OpenVINO, as the outside reference (needs torch and timm: `pip install torch timm`,
    a bench-only extra; the row is skipped with a message otherwise). Only for B/16 at 224.
Each format's runtime is used with its default thread count (all cores). Prints per case:
images/s (batch / median seconds) and the median (p50) and 99th-percentile (p99) latency of a
call, and the ratios the issue targets. Rows whose runtime is missing are skipped with a
message.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

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
_TIME_CASES = flags.DEFINE_string("time_cases", None, "Internal: the child's JSON case list.")

EXTENSIONS = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}


def export_all(directory):
    """Exports every format and precision asked for; returns the case list for the child."""
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
    from keras_vit.serving import export_classifier, runtimes

    if file_format == "saved_model":
        kwargs = {} if precision == "float32" else {"precision": precision}
        return export_classifier(model, os.path.join(directory, f"saved_model_{precision}"),
                                 **kwargs).path
    path = os.path.join(directory, f"{file_format}_{precision}{EXTENSIONS[file_format]}")
    kwargs = {"calibration_images": calibration} if "int8" in precision else {}
    runtimes.EXPORTERS[file_format](model, path, precision=precision, **kwargs)
    return path


def _export_timm(directory):
    """timm's ViT-B/16 as ONNX, both OpenVINO precisions; [] with a message without timm."""
    if _VARIANT.value.upper().replace("VIT-", "") != "B/16" or _IMAGE_SIZE.value != 224:
        print("skipped timm_openvino: the reference is timm's vit_base_patch16_224 (B/16, 224)")
        return []
    try:
        import timm
        import torch
    except ImportError as error:
        print(f"skipped timm_openvino: {error} (pip install torch timm, a bench-only extra)")
        return []
    path = os.path.join(directory, "timm_vit_b16.onnx")
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), path, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}},
                      opset_version=17)
    return [{"format": "timm_openvino", "precision": precision, "path": path}
            for precision in ("float32", "bfloat16")]


def _timm_call(path, precision):
    """OpenVINO running timm's ONNX on NCHW [0, 1]-normalised input (its own layout)."""
    import numpy as np
    import openvino as ov

    hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    return lambda images: request.infer({0: np.ascontiguousarray(images.transpose(0, 3, 1, 2))})


def _saved_model_call(path):
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures["predict_pixels"]
    return lambda images: signature(images=tf.constant(images))["probabilities"].numpy()


def time_cases(spec_path):
    """Child process: loads every model in its runtime and times them interleaved."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_exported", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                     "keras_vit", "serving", "run_exported.py"))
    run_exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_exported)
    with open(spec_path) as stream:
        spec = json.load(stream)
    rng = np.random.default_rng(0)
    cases = {}
    for entry in spec["models"]:
        if entry["format"] == "saved_model":
            call = _saved_model_call(entry["path"])
        elif entry["format"] == "timm_openvino":
            call = _timm_call(entry["path"], entry["precision"])
        else:
            try:
                call = run_exported.load(entry["path"])
            except ImportError as error:
                print(f"skipped {entry['format']} {entry['precision']}: {error}")
                continue
        for batch in spec["batch_sizes"]:
            images = rng.uniform(0, 255, (batch, spec["image_size"], spec["image_size"], 3))
            images = images.astype(np.float32)
            cases[(entry["format"], entry["precision"], batch)] = (
                lambda call=call, images=images: call(images))
    return _interleaved(cases, spec["repeats"], spec["warmup"])


def _interleaved(cases, repeats, warmup):
    """[{format, precision, batch, seconds: [per round]}]: `timing.interleaved_medians`,
    keeping every round's time (for the p99)."""
    from timing import interleaved_medians  # bench/timing.py, beside this file

    times = {name: [] for name in cases}

    def keep(round_index, this_round):
        for name, seconds in this_round.items():
            times[name].append(seconds)
        logging.info("round %d of %d done", round_index + 1, repeats)

    interleaved_medians(cases, repeats=repeats, warmup=warmup, on_round=keep)
    return [{"format": f, "precision": p, "batch": b, "seconds": s}
            for (f, p, b), s in times.items()]


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


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
    if _TIME_CASES.value:
        results = time_cases(_TIME_CASES.value)
        with open(_TIME_CASES.value + ".out", "w") as stream:
            json.dump(results, stream)
        return
    with tempfile.TemporaryDirectory() as directory:
        models = export_all(directory)
        spec_path = os.path.join(directory, "cases.json")
        with open(spec_path, "w") as stream:
            json.dump({"models": models, "batch_sizes": [int(b) for b in _BATCH_SIZES.value],
                       "image_size": _IMAGE_SIZE.value, "repeats": _REPEATS.value,
                       "warmup": _WARMUP.value}, stream)
        load_before = os.getloadavg()
        subprocess.run([sys.executable, os.path.abspath(__file__), f"--time_cases={spec_path}"],
                       check=True)
        with open(spec_path + ".out") as stream:
            results = json.load(stream)
    print(f"variant={_VARIANT.value} image_size={_IMAGE_SIZE.value} "
          f"num_classes={_NUM_CLASSES.value} repeats={_REPEATS.value} cpus={os.cpu_count()} "
          f"load_before={load_before[0]:.2f} load_after={os.getloadavg()[0]:.2f} "
          f"date={time.strftime('%Y-%m-%d')}")
    print(format_table(results))
    for batch in sorted({r["batch"] for r in results}):
        print("\n".join(ratios(results, batch)))


if __name__ == "__main__":
    app.run(main)
