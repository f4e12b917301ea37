"""Runs an exported classifier in its own runtime, without TensorFlow or Keras.

    .tflite   LiteRT's interpreter (`ai-edge-litert`), XNNPACK delegate, signature runner
    .onnx     ONNX Runtime, CPU execution provider
    .xml      OpenVINO on CPU, with the inference precision hint the export recorded

    runner = load("vit.onnx")
    outputs = runner(images)      # {"probabilities": (batch, K), "classes", "scores": (batch, k)}
    predict_probabilities("vit.tflite", images)   # (batch, K) float32

`images` are float32 (batch, size, size, 3) RGB pixels in [0, 255], as `predict_pixels` takes.
They are checked here before any runtime sees them: the runtimes check less (ONNX Runtime
rank, size and dtype; OpenVINO rank and size but casts any dtype; LiteRT fails with an XNNPACK
reshape error on a wrong shape; a NaN pixel gives NaN probabilities in the float models and a
finite, plausible answer in the int8 ones: docs/serving.md).

This module imports only NumPy, `pipelines.errors` (no TensorFlow) and the runtime it needs.
`keras_vit/__init__.py` imports Keras, so a process without TensorFlow runs this file as a
script rather than importing it through the package:

    python keras_vit/serving/run_exported.py MODEL IMAGES.npy OUTPUTS.npz

`predict_in_subprocess` does that from any process, TensorFlow's included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

if __name__ == "__main__":
    # Run as a script, sys.path[0] is this file's directory; the directory holding
    # `pipelines` (the repository, or site-packages) must come first instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.errors import MissingExtraError, UserError  # noqa: E402  (after the path fix)

_EXPORT_EXTRA = 'pip install -e ".[export]"'
RUNTIMES = {".tflite": "litert", ".onnx": "onnxruntime", ".xml": "openvino"}
# Where export_openvino records the precision hint (keras_vit.serving.runtimes).
OPENVINO_HINT_KEY = ("runtime_options", "INFERENCE_PRECISION_HINT")
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "classes", "scores")


class ExportedInputError(UserError):
    """Images an exported model cannot take (wrong type, dtype, rank, size, or not finite)."""


def require(module_name: str, package: str, *, needed_by: str = "Running this model",
            install: str = f"the export extra: {_EXPORT_EXTRA}"):
    """Imports `module_name`; a MissingExtraError naming what to install when it is absent.

    Shared with `runtimes` (the exporters), which may import this TensorFlow-free module;
    the reverse would bring TensorFlow into the runtime's process.
    """
    try:
        return __import__(module_name, fromlist=["_"])
    except ImportError as error:
        raise MissingExtraError(
            f"{needed_by} needs {package}, which is not installed ({error}). Install "
            f"{install}") from error


def check_images(images, image_size: int) -> np.ndarray:
    """`images` if they are float32 (batch, size, size, 3) and finite, else ExportedInputError.

    Never casts: a uint8 or float64 array is refused, not silently converted (OpenVINO would).
    """
    expected = f"float32 (batch, {image_size}, {image_size}, 3) RGB pixels in [0, 255]"
    if not isinstance(images, np.ndarray):
        raise ExportedInputError(f"Expected a NumPy array of {expected}; got {type(images)}.")
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ExportedInputError(f"Expected {expected}; got shape {images.shape}. Resize and "
                                 "crop as the eval preprocessing does.")
    if images.dtype != np.float32:
        raise ExportedInputError(f"Expected {expected}; got dtype {images.dtype}. Convert "
                                 "with images.astype(np.float32), values unscaled.")
    if not np.all(np.isfinite(images)):
        raise ExportedInputError(f"The images hold NaN or Inf pixels; expected {expected}.")
    return images


class Runner:
    """A loaded exported classifier: `runner(images) -> {name: array}`, see the module doc.

    Attributes:
        path: the model file.
        runtime: "litert", "onnxruntime" or "openvino".
        image_size: side of the square input images, in pixels.
        num_classes: K of `probabilities` (batch, K).
        top_k: k of `classes` and `scores` (batch, k).
    """

    def __init__(self, path, runtime, call, image_size, num_classes, top_k):
        self.path, self.runtime, self._call = path, runtime, call
        self.image_size, self.num_classes, self.top_k = image_size, num_classes, top_k

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (batch, size, size, 3) in [0, 255] -> probabilities, classes, scores."""
        images = check_images(images, self.image_size)
        if not len(images):  # ONNX Runtime fails on an empty batch; the answer is known.
            return {"probabilities": np.zeros((0, self.num_classes), np.float32),
                    "classes": np.zeros((0, self.top_k), np.int32),
                    "scores": np.zeros((0, self.top_k), np.float32)}
        outputs = self._call(np.ascontiguousarray(images))
        return {name: np.asarray(outputs[name]) for name in OUTPUT_NAMES}


def _load_litert(path, num_threads):
    interpreter_module = require("ai_edge_litert.interpreter", "ai-edge-litert")
    interpreter = interpreter_module.Interpreter(model_path=path, num_threads=num_threads)
    runner = interpreter.get_signature_runner("serving_default")
    shape = runner.get_input_details()[INPUT_NAME]["shape_signature"]
    outputs = runner.get_output_details()

    def call(images):
        return runner(**{INPUT_NAME: images})

    return call, int(shape[1]), int(outputs["probabilities"]["shape_signature"][-1]), \
        int(outputs["classes"]["shape_signature"][-1])


def _load_onnx(path, num_threads):
    ort = require("onnxruntime", "onnxruntime")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    shapes = {output.name: output.shape for output in session.get_outputs()}

    def call(images):
        return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})))

    return call, int(session.get_inputs()[0].shape[1]), int(shapes["probabilities"][-1]), \
        int(shapes["classes"][-1])


def openvino_precision_hint(model) -> str | None:
    """The inference precision hint recorded in an OpenVINO model's rt_info, or None."""
    key = list(OPENVINO_HINT_KEY)
    return str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None


def _load_openvino(path, num_threads):
    ov = require("openvino", "openvino")
    core = ov.Core()
    model = core.read_model(path)
    config = {}
    hint = openvino_precision_hint(model)
    if hint:  # Without it the CPU plugin picks bf16 where the CPU has it, even for float32.
        config["INFERENCE_PRECISION_HINT"] = hint
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = num_threads
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    shapes = {output.get_any_name(): output.get_partial_shape() for output in compiled.outputs}

    def call(images):
        results = request.infer({INPUT_NAME: images})
        return {output.get_any_name(): results[output] for output in compiled.outputs}

    return call, compiled.input(0).get_partial_shape()[1].get_length(), \
        shapes["probabilities"][-1].get_length(), shapes["classes"][-1].get_length()


_LOADERS = {"litert": _load_litert, "onnxruntime": _load_onnx, "openvino": _load_openvino}


def runtime_of(path: str) -> str:
    """The runtime that runs `path`, from its extension; UserError for any other file."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in RUNTIMES:
        raise UserError(f"{path}: expected an exported model ending in "
                        f"{', '.join(RUNTIMES)}; got {extension or 'no extension'!r}. A "
                        "SavedModel is run by TensorFlow (tools/export.py --verify).")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist or is not a file.")
    return RUNTIMES[extension]


def load(path: str, *, num_threads: int | None = None) -> Runner:
    """Loads the exported model at `path` into its runtime (see the module doc).

    Args:
        path: a .tflite, .onnx or OpenVINO .xml (with its .bin beside it).
        num_threads: CPU threads the runtime may use; None for its default.
    """
    runtime = runtime_of(path)
    call, image_size, num_classes, top_k = _LOADERS[runtime](path, num_threads)
    return Runner(path, runtime, call, image_size, num_classes, top_k)


def predict_probabilities(path: str, images: np.ndarray) -> np.ndarray:
    """Class probabilities (batch, K) float32 of the exported model at `path` on `images`."""
    return load(path)(images)["probabilities"]


def predict_in_subprocess(path: str, images: np.ndarray, *, timeout: float = 600) -> dict:
    """`load(path)(images)` in a fresh Python that imports no TensorFlow and no Keras.

    Returns:
        The outputs, plus `imported` (the names among tensorflow and keras that the child
        process had imported: none, unless a runtime started importing them).

    Raises:
        UserError: the child failed; the message holds its last lines of output.
    """
    with tempfile.TemporaryDirectory() as directory:
        images_path = os.path.join(directory, "images.npy")
        outputs_path = os.path.join(directory, "outputs.npz")
        np.save(images_path, images)
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), path, images_path, outputs_path],
            capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            raise UserError(f"Running {path} in its runtime failed (exit {result.returncode}):"
                            f"\n{(result.stdout + result.stderr)[-3000:]}")
        with np.load(outputs_path) as stored:
            outputs = {name: stored[name] for name in stored.files}
    outputs["imported"] = [str(name) for name in outputs["imported"]]
    return outputs


def main(argv) -> int:
    """Script mode: MODEL IMAGES.npy OUTPUTS.npz; writes the outputs and `imported`."""
    if len(argv) != 4:
        print(f"usage: {argv[0]} MODEL IMAGES.npy OUTPUTS.npz", file=sys.stderr)
        return 2
    _, model_path, images_path, outputs_path = argv
    try:
        outputs = load(model_path)(np.load(images_path))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    imported = [name for name in ("tensorflow", "keras") if name in sys.modules]
    np.savez(outputs_path, **outputs, imported=np.array(imported, dtype="U"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
