"""bench/precision.py end to end on a tiny trained-model directory and a handful of images.

The truths, computed here without the script's code: the Keras model called directly on the
exact pixels (lossless PNGs at the model's size, so the eval preprocessing is the identity);
the labels, set by hand so that the Keras model gets exactly CORRECT of them right; each
exported file run again here in its runtime (TensorFlow for the SavedModel) on the same single
batch; the files' sizes read from the file system.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow",
                    reason="the precision bench exports with TensorFlow (a core dependency)")
import tensorflow as tf  # noqa: E402

from conftest import REPO  # noqa: E402
from keras_vit.checkpoints import build_model  # noqa: E402
from keras_vit.class_names import write_class_names  # noqa: E402
from keras_vit.serving import run_exported, verified  # noqa: E402
from serving_helpers import encode_image  # noqa: E402
from vit_reference import random_checkpoint  # noqa: E402

CLASS_NAMES = ["cat", "dog", "fox"]
NUM_IMAGES, CORRECT = 12, 8  # the first CORRECT images are filed under the Keras prediction
# What each format needs installed, to export and to run (as tests/test_runtimes.py).
PACKAGES = {"saved_model": ("tensorflow",), "litert": ("tensorflow", "ai_edge_litert"),
            "onnx": ("tf2onnx", "onnx", "onnxruntime"), "openvino": ("openvino",)}


def _installed(file_format, precision):
    packages = PACKAGES[file_format] + (("nncf",) if (file_format, precision) ==
                                        ("openvino", "int8") else ())
    return all(importlib.util.find_spec(package) for package in packages)


def _write_images(folder, pixels, classes):
    """Writes pixels[i] as folder/<class name>/<i>.png; returns the paths."""
    paths = []
    for index, (image, label) in enumerate(zip(pixels, classes)):
        os.makedirs(folder / CLASS_NAMES[label], exist_ok=True)
        paths.append(folder / CLASS_NAMES[label] / f"{index:02d}.png")
        paths[-1].write_bytes(encode_image(image, "PNG"))
    return paths


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Runs the script once; (its JSON, its stdout, pixels (n, 16, 16, 3), labels, model)."""
    root = tmp_path_factory.mktemp("precision")
    model = build_model(random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=3, seed=3),
                        "random test checkpoint")
    model_dir = root / "model"
    os.makedirs(model_dir)
    model.save(model_dir / "model.keras")
    write_class_names(CLASS_NAMES, str(model_dir))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (NUM_IMAGES, 16, 16, 3), dtype=np.uint8)
    predicted = np.argmax(model(pixels.astype(np.float32), training=False).numpy(), axis=1)
    labels = np.where(np.arange(NUM_IMAGES) < CORRECT, predicted, (predicted + 1) % 3)
    paths = _write_images(root / "images", pixels, labels)
    _write_images(root / "calibration", rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
                  [0] * 8)
    output = root / "rows.json"
    result = subprocess.run(
        [sys.executable, "bench/precision.py", f"--model_dir={model_dir}",
         f"--images={root / 'images'}", f"--calibration_images={root / 'calibration'}",
         f"--export_dir={root / 'exports'}", f"--output={output}", "--batch_size=64"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    order = np.argsort([str(path) for path in paths])  # the script reads files sorted by path
    return (json.loads(output.read_text()), result.stdout, pixels[order].astype(np.float32),
            labels[order], model)


@pytest.mark.slow
def test_one_row_per_installed_format_and_precision(measured):
    report, stdout, _, _, _ = measured
    expected = [("keras", "float32")] + [
        (file_format, precision) for file_format in verified.FORMATS
        for precision in verified.PRECISIONS[file_format] if _installed(file_format, precision)]
    assert [(row["format"], row["precision"]) for row in report["rows"]] == expected
    for file_format in verified.FORMATS:
        for precision in verified.PRECISIONS[file_format]:
            if not _installed(file_format, precision):
                assert f"skipped {file_format} {precision}: " in stdout
    table = [line.split() for line in stdout.splitlines()
             if line.split()[:2] in [list(case) for case in expected]]
    assert len(table) == len(expected)
    assert f"images={NUM_IMAGES} of " in stdout


@pytest.mark.slow
def test_float32_rows_agree_and_labels_are_counted_by_hand(measured):
    report, stdout, _, _, _ = measured
    for row in report["rows"]:
        assert row["images"] == NUM_IMAGES
        if row["precision"] == "float32":
            assert row["agree"] == NUM_IMAGES, row
            assert row["max_dp"] < 1e-4, row
            assert row["correct"] == CORRECT, row
    keras_line = next(line for line in stdout.splitlines() if line.startswith("keras "))
    assert f"({CORRECT}/{NUM_IMAGES})" in keras_line


@pytest.mark.slow
def test_every_row_matches_its_export_run_here(measured):
    """Agreement, accuracy and |dp| recomputed from the exported file and the Keras model."""
    report, _, pixels, labels, model = measured
    reference = tf.nn.softmax(model(pixels, training=False)).numpy()
    for row in report["rows"][1:]:
        if row["format"] == "saved_model":
            signature = tf.saved_model.load(row["path"]).signatures["predict_pixels"]
            probabilities = signature(images=tf.constant(pixels))["probabilities"].numpy()
        else:  # one batch of all the images, as the script sent them (ONNX int8 depends on it)
            probabilities = run_exported.load(row["path"])(pixels)["probabilities"]
        predicted = np.argmax(probabilities, axis=1)
        assert row["agree"] == np.sum(predicted == np.argmax(reference, axis=1)), row
        assert row["correct"] == np.sum(predicted == labels), row
        difference = np.abs(probabilities - reference)
        np.testing.assert_allclose([row["max_dp"], row["mean_dp"]],
                                   [difference.max(), difference.mean()], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_sizes_are_the_files_sizes(measured):
    report, _, _, _, _ = measured
    for row in report["rows"][1:]:
        path = row["path"]
        if os.path.isdir(path):  # a SavedModel version: every file below it
            expected = sum(os.stat(os.path.join(root, name)).st_size
                           for root, _, names in os.walk(path) for name in names)
        elif path.endswith(".xml"):
            expected = os.stat(path).st_size + os.stat(path[:-4] + ".bin").st_size
        else:
            expected = os.stat(path).st_size
        assert row["size"] == expected, row


def test_calibrating_on_the_measured_images_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/precision.py", f"--model_dir={tmp_path}",
         f"--images={tmp_path}", f"--calibration_images={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode != 0
    assert "The calibration images are the measured images" in result.stderr
