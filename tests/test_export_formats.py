"""tools/export.py in every format: verified in its runtime before it is published.

Truths: the float32 Keras model's probabilities, recorded in the manifest and compared by a
fresh process running each export in its own runtime; an export whose check fails leaves
nothing behind.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_vit.serving import manifest, verified
from serving_helpers import tiny_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (format, precision, output name or None for a SavedModel)
EXPORTS = [("saved_model", "float32", None), ("saved_model", "bfloat16", None),
           ("litert", "float32", "m.tflite"), ("litert", "float16", "m16.tflite"),
           ("onnx", "float32", "m.onnx"), ("openvino", "float32", "m.xml"),
           ("openvino", "bfloat16", "mb.xml")]


def _tool(*flags):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "export.py"), *flags],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("export_format,precision,output", EXPORTS,
                         ids=[f"{f}-{p}" for f, p, _ in EXPORTS])
def test_tool_exports_verifies_and_rechecks(tmp_path, export_format, precision, output):
    pytest.importorskip({"saved_model": "tensorflow", "litert": "ai_edge_litert",
                         "onnx": "onnxruntime", "openvino": "openvino"}[export_format])
    tiny_classifier(tmp_path)
    target = ([f"--export_dir={tmp_path / 'export'}"] if output is None
              else [f"--output={tmp_path / output}"])
    result = _tool(f"--checkpoint={tmp_path / 'tiny.npz'}", f"--format={export_format}",
                   f"--precision={precision}", *target)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    check = summary["verification"]
    assert check["max_abs_difference"] <= manifest.BOUNDS[precision]
    assert check["top1_agreement"] == 1.0
    record = manifest.read_manifest(summary["manifest"])
    assert record["format"] == export_format and record["precision"] == precision
    assert record["source_sha256"] == manifest.file_sha256(str(tmp_path / "tiny.npz"))
    again = _tool(f"--verify={summary['export_path']}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == check


@pytest.mark.parametrize("export_format,output", [("saved_model", None), ("onnx", "m.onnx")])
def test_an_export_that_fails_its_check_is_not_published(tmp_path, monkeypatch,
                                                         export_format, output):
    pytest.importorskip("onnxruntime")
    model = tiny_classifier(tmp_path)
    monkeypatch.setitem(manifest.BOUNDS, "float32", -1.0)  # no export can meet it
    where = (dict(export_dir=str(tmp_path / "export")) if output is None
             else dict(output=str(tmp_path / output)))
    with pytest.raises(manifest.VerificationError, match="it is not published"):
        verified.export_verified(model, export_format, **where)
    left = sorted(os.listdir(tmp_path))
    assert left == ["tiny.npz"] or (left == ["export", "tiny.npz"]
                                    and os.listdir(tmp_path / "export") == []), left


def test_formats_and_precisions_are_checked_before_anything_is_written(tmp_path):
    tiny_classifier(tmp_path)
    result = _tool(f"--checkpoint={tmp_path / 'tiny.npz'}", "--format=onnx",
                   "--precision=bfloat16", f"--output={tmp_path / 'm.onnx'}")
    assert result.returncode == 2
    assert "onnx exports offer the precisions float32, int8, not 'bfloat16'" in result.stderr
    result = _tool(f"--checkpoint={tmp_path / 'tiny.npz'}", "--format=onnx",
                   f"--export_dir={tmp_path / 'x'}")
    assert result.returncode == 1 and "--format=onnx writes to --output" in result.stderr
    assert not np.any([name.endswith(".onnx") for name in os.listdir(tmp_path)])


@pytest.mark.slow
def test_calibrated_int8_is_verified_on_held_out_calibration_data_or_refused(tmp_path):
    """Full-integer LiteRT of the random test model, calibrated on 32 digits. By default it is
    verified on the next 8 images of the calibration data (the truth: the same split through
    the eval pipeline), and published; on out-of-distribution probe images (the coloured
    digits of the default probe batch, as files) its probabilities move beyond int8's 0.1,
    so nothing is published and the error says by how much."""
    pytest.importorskip("ai_edge_litert")
    from PIL import Image

    import pipelines
    from tests.train_helpers import convert_digits

    tiny_classifier(tmp_path)
    data = convert_digits(tmp_path / "digits")
    flags = [f"--checkpoint={tmp_path / 'tiny.npz'}", "--format=litert", "--precision=int8_full",
             f"--calibration_data={data}", "--calibration_examples=32"]
    missing = _tool(*flags[:3], f"--output={tmp_path / 'none.tflite'}")
    assert missing.returncode == 1 and "pass --calibration_data" in missing.stderr
    published = tmp_path / "m.tflite"
    result = _tool(*flags, f"--output={published}")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(open(verified.manifest_path(str(published))).read())
    batch = pipelines.build_dataset(data, split="train", image_size=16, batch_size=40,
                                    training=False)
    held_out = next(iter(batch))[0].numpy()[32:]
    np.testing.assert_allclose(record["probe_images"], held_out, atol=1e-3)

    colours = []
    for index, image in enumerate(manifest.probe_images(16)):
        colours.append(str(tmp_path / f"colour_{index}.png"))
        Image.fromarray(image.astype(np.uint8)).save(colours[-1])
    refused = tmp_path / "refused.tflite"
    result = _tool(*flags, f"--output={refused}", f"--probe_images={','.join(colours)}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{refused} (litert, int8_full) differs from the float32" in result.stderr
    assert "it is not published" in result.stderr
    assert not os.path.exists(refused)
    assert not os.path.exists(str(refused) + ".keras_vit_export.json")


def test_an_export_onto_an_existing_file_keeps_it_and_its_manifest(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_classifier(tmp_path)
    output = str(tmp_path / "m.onnx")
    verified.export_verified(model, "onnx", output=output)
    before = (open(output, "rb").read(), open(verified.manifest_path(output)).read())
    with pytest.raises(Exception, match="already exists"):
        verified.export_verified(model, "onnx", output=output)
    assert (open(output, "rb").read(), open(verified.manifest_path(output)).read()) == before


def test_a_model_trained_in_mixed_bfloat16_is_exported_and_checked_in_float32(tmp_path):
    """The reference of a float32 export is the float32 model, not the bfloat16 one it was
    trained as: else the check would compare the export with itself."""
    pytest.importorskip("onnxruntime")
    import keras

    import keras_vit

    tiny_classifier(tmp_path)
    float32 = keras_vit.from_npz(str(tmp_path / "tiny.npz"))
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = keras_vit.from_npz(str(tmp_path / "tiny.npz"))
    finally:
        keras.config.set_dtype_policy("float32")
    images = manifest.probe_images(16)
    _, record = verified.export_verified(mixed, "onnx", output=str(tmp_path / "m.onnx"))
    expected = manifest.softmax(float32.predict(images, verbose=0))
    np.testing.assert_allclose(record["reference_probabilities"], expected, atol=1e-6)
    assert np.abs(manifest.softmax(mixed.predict(images, verbose=0)) - expected).max() > 1e-5
    assert record["verification"]["max_abs_difference"] < 1e-4
