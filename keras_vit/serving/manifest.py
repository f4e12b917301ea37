"""Every export proves itself: a manifest beside it, and a check in its own runtime.

`keras_vit_export.json` records where the model came from (the source and its sha256), the
keras-vit version, the preprocessing, the format and precision, and the probabilities of the
float32 Keras model on a fixed probe batch of real images. Before an export is published it
runs that batch through the exported file in its own runtime, in a fresh process (one that
imports only TensorFlow for a SavedModel, and no TensorFlow for the other formats), and the
export is refused when the largest probability difference exceeds the precision's bound.
`tools/export.py --verify=PATH` repeats the check later, on another machine.

The probe batch is real handwritten digits (scikit-learn's bundled 8x8 scans, a dependency,
so every machine has them), upsampled to the model's input; or images the user gives.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np

from keras_vit.files import write_atomically
from pipelines.errors import UserError

MANIFEST_NAME = "keras_vit_export.json"
# Largest |probability difference| from the float32 Keras model that an export may show on the
# probe batch, per precision (bench/NOTES.md and docs/serving.md give the measured ones).
BOUNDS = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2, "int8": 1e-1, "int8_full": 1e-1}
PROBE_SIZE = 8
_VERIFY_TIMEOUT_S = 600


class VerificationError(UserError):
    """An export whose outputs differ from the Keras model's by more than its bound."""


def probe_images(image_size, paths=None):
    """The probe batch: float32 (N, image_size, image_size, 3) RGB in [0, 255].

    Args:
        image_size: the model's input side in pixels.
        paths: image files to use instead of the digits (decoded with the eval preprocessing).
    """
    if paths:
        from keras_vit import inference  # Here: it imports TensorFlow.

        return inference.load_images(list(paths), image_size)
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images[:PROBE_SIZE]  # (N, 8, 8), 0..16
    images = []
    for digit in digits:
        gray = Image.fromarray(np.uint8(digit * (255 / 16)))
        images.append(np.asarray(gray.resize((image_size, image_size), Image.BILINEAR)))
    gray = np.stack(images).astype(np.float32)
    # Colour, so that every input channel matters: the digit in red, its negative in blue.
    return np.stack([gray, np.full_like(gray, 128.0), 255.0 - gray], axis=-1)


def softmax(logits):
    """Row-wise softmax in float64, returned as float32: (N, K) -> (N, K)."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def file_sha256(path):
    """sha256 of a file, or of every file under a folder (sorted by relative path)."""
    digest = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names)
    for name in files:
        if os.path.isdir(path):
            digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_manifest(model, images, *, source, export_format, precision, preprocessing):
    """The manifest of an export of `model` (the float32 Keras model it was made from).

    Args:
        model: the float32 Keras classifier (logits out).
        images: the probe batch, float32 (N, H, W, 3) in [0, 255] (`probe_images`).
        source: the checkpoint or model directory exported, or None.
        export_format: "saved_model", "litert", "onnx" or "openvino".
        precision: a key of BOUNDS.
        preprocessing: what a caller must do to images before the model: a dict (input size,
            central crop, input range).
    """
    import keras_vit

    if precision not in BOUNDS:
        raise UserError(f"precision {precision!r} is none of {', '.join(BOUNDS)}.")
    probabilities = softmax(model.predict(images, verbose=0))
    return {
        "keras_vit_version": keras_vit.__version__,
        "source": None if source is None else os.path.abspath(source),
        "source_sha256": None if source is None or not os.path.exists(source)
        else file_sha256(source),
        "format": export_format,
        "precision": precision,
        "bound": BOUNDS[precision],
        "preprocessing": preprocessing,
        "probe_images": np.asarray(images, np.float32).round(3).tolist(),
        "reference_probabilities": probabilities.tolist(),
    }


def write_manifest(manifest, path):
    """Writes the manifest as JSON to `path`, atomically."""
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(manifest, file)

    return write_atomically(path, write)


def read_manifest(path):
    """The manifest at `path`, with errors naming the file."""
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except FileNotFoundError as error:
        raise UserError(f"{path} does not exist: expected the {MANIFEST_NAME} an export "
                        "wrote beside the model.") from error
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable export manifest ({error}).") from error
    missing = [key for key in ("format", "precision", "bound", "probe_images",
                               "reference_probabilities") if key not in manifest]
    if missing:
        raise UserError(f"{path} is not a keras_vit export manifest: it lacks {missing}.")
    return manifest


def verify(export_path, manifest, name=None):
    """Runs the manifest's probe batch through `export_path` in a fresh process.

    `name` is what messages call the export (the final path of one not yet published).

    Returns:
        {"max_abs_difference": float, "top1_agreement": float (0..1), "bound": float}.

    Raises:
        VerificationError: the difference exceeds the bound, or the runtime failed.
    """
    images = np.asarray(manifest["probe_images"], np.float32)
    expected = np.asarray(manifest["reference_probabilities"], np.float32)
    name = name or export_path
    found = _run_in_fresh_process(export_path, manifest["format"], images)
    if found.shape != expected.shape:
        raise VerificationError(
            f"{name} gave probabilities of shape {found.shape} for the probe batch, "
            f"expected {expected.shape}.")
    result = {
        "max_abs_difference": float(np.abs(found - expected).max()),
        "top1_agreement": float((found.argmax(-1) == expected.argmax(-1)).mean()),
        "bound": float(manifest["bound"]),
    }
    if not result["max_abs_difference"] <= result["bound"]:  # NaN fails too
        raise VerificationError(
            f"{name} ({manifest['format']}, {manifest['precision']}) differs from the "
            f"float32 Keras model by {result['max_abs_difference']:.3g} in probability on the "
            f"probe batch, more than the bound {result['bound']:g} (top-1 agreement "
            f"{result['top1_agreement']:.0%}); it is not published. Try another precision.")
    return result


# Run by `_run_in_fresh_process`: loads the export in its runtime alone and writes the
# probabilities of the images in argv[2] (an .npy) as an .npy to argv[3].
_RUNNER = """
import sys
import numpy as np
path, images_path, output_path, export_format = sys.argv[1:5]
images = np.load(images_path)
if export_format == "saved_model":
    import tensorflow as tf
    signature = tf.saved_model.load(path).signatures["predict_pixels"]
    probabilities = signature(images=tf.constant(images))["probabilities"].numpy()
else:  # the module by its file: importing the keras_vit package would import Keras
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_exported", sys.argv[5])
    run_exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_exported)
    probabilities = run_exported.predict_probabilities(path, images)
    assert "tensorflow" not in sys.modules, "the runtime's process imported TensorFlow"
np.save(output_path, np.asarray(probabilities, np.float32))
"""


def _run_in_fresh_process(export_path, export_format, images):
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        images_path = os.path.join(scratch, "images.npy")
        output_path = os.path.join(scratch, "probabilities.npy")
        np.save(images_path, images)
        # The repository root on the path: run_exported imports `pipelines.errors`, found so
        # even where the project is used from a checkout rather than installed.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [root, os.environ.get("PYTHONPATH")])))
        result = subprocess.run(
            [sys.executable, "-c", _RUNNER, export_path, images_path, output_path, export_format,
             os.path.join(os.path.dirname(__file__), "run_exported.py")],
            capture_output=True, text=True, timeout=_VERIFY_TIMEOUT_S, env=environment)
        if result.returncode != 0:
            raise VerificationError(
                f"{export_path} could not be run in its runtime ({export_format}):\n"
                + result.stderr.strip()[-2000:])
        return np.load(output_path)
