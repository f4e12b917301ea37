"""LiteRT, ONNX and OpenVINO exports (keras_vit.serving.runtimes), run by their own runtimes
(keras_vit.serving.run_exported) in processes that import no TensorFlow.

The truth is the Keras model itself: softmax of its logits in float32, in this process.
Bounds (max |probability difference|, design of issue 16): float32 1e-4; float16 and
bfloat16 2e-2; int8 1e-1.
"""

import builtins
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from conftest import REPO, shared_data  # noqa: E402
from keras_vit.checkpoints import build_model  # noqa: E402
from keras_vit.serving import (  # noqa: E402
    ExportError, remove_stale_exports, run_exported, runtimes)
from pipelines.errors import MissingExtraError  # noqa: E402
from vit_reference import random_checkpoint  # noqa: E402

NUM_CLASSES = 10
EXTENSIONS = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
RUNTIME_PACKAGES = {"litert": "ai_edge_litert", "onnx": "onnxruntime", "openvino": "openvino"}
CONVERTER_PACKAGES = {"litert": "tensorflow", "onnx": "tf2onnx", "openvino": "openvino"}
BOUNDS = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2, "int8": 1e-1, "int8_full": 1e-1}
IMAGENET_OPTIONS = dict(approximate_gelu=False, input_mean=(0.485, 0.456, 0.406),
                        input_std=(0.229, 0.224, 0.225))


def _require_format(file_format):
    for package in {RUNTIME_PACKAGES[file_format], CONVERTER_PACKAGES[file_format]}:
        pytest.importorskip(package, reason=f"{package} is not installed (the export extra)")


def tiny_model(options=None):
    """16 px, patch 4, D=32, 2 layers, 4 heads, 10 classes, random non-zero weights."""
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=NUM_CLASSES, seed=3)
    return build_model(arrays, "random test checkpoint", options=options)


def generated_images(batch, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, 16, 16, 3)).astype(np.float32)


def keras_probabilities(model, images):
    return tf.nn.softmax(tf.cast(model(images, training=False), tf.float32)).numpy()


@pytest.fixture(scope="module")
def models():
    return {"tanh_gelu": tiny_model(), "exact_gelu_imagenet": tiny_model(IMAGENET_OPTIONS)}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """export(format, precision, model_name="tanh_gelu") -> path, each exported once."""
    directory = tmp_path_factory.mktemp("exports")
    paths = {}

    def export(file_format, precision, model_name="tanh_gelu"):
        key = (file_format, precision, model_name)
        if key not in paths:
            _require_format(file_format)
            if (file_format, precision) == ("openvino", "int8"):
                pytest.importorskip("nncf", reason="nncf is not installed (the export extra)")
            path = str(directory / f"{model_name}_{precision}{EXTENSIONS[file_format]}")
            kwargs = {}
            if "int8" in precision:
                kwargs["calibration_images"] = generated_images(16, seed=9)
            runtimes.EXPORTERS[file_format](models[model_name], path, precision=precision, **kwargs)
            paths[key] = path
        return paths[key]

    return export


@pytest.mark.parametrize("model_name", ["tanh_gelu", "exact_gelu_imagenet"])
@pytest.mark.parametrize("file_format", ["litert", "onnx", "openvino"])
def test_float32_equals_keras_in_a_process_without_tensorflow(exported, models, file_format,
                                                             model_name):
    path = exported(file_format, "float32", model_name)
    for batch in (1, 3):
        images = generated_images(batch, seed=batch)
        outputs = run_exported.predict_in_subprocess(path, images)
        assert outputs["imported"] == [], f"the runner imported {outputs['imported']}"
        expected = keras_probabilities(models[model_name], images)
        assert outputs["probabilities"].shape == (batch, NUM_CLASSES)
        np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-4, rtol=0)
        best = np.argsort(-expected, axis=-1)[:, :5]
        np.testing.assert_array_equal(outputs["classes"], best)
        np.testing.assert_allclose(outputs["scores"],
                                   np.take_along_axis(expected, best, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("file_format, precision", [
    ("litert", "float16"), ("litert", "int8"), ("litert", "int8_full"),
    ("onnx", "int8"), ("openvino", "bfloat16"), ("openvino", "int8"),
])
def test_reduced_precision_within_its_bound(exported, models, file_format, precision):
    path = exported(file_format, precision)
    images = generated_images(3, seed=5)
    outputs = run_exported.predict_in_subprocess(path, images)
    assert outputs["imported"] == []
    difference = np.abs(outputs["probabilities"] - keras_probabilities(models["tanh_gelu"], images))
    assert difference.max() <= BOUNDS[precision], difference.max()


def test_openvino_records_its_precision_hint(exported):
    ov = pytest.importorskip("openvino")
    for precision, hint in (("float32", "f32"), ("bfloat16", "bf16")):
        model = ov.Core().read_model(exported("openvino", precision))
        assert run_exported.openvino_precision_hint(model) == hint


def test_openvino_runs_every_layer_norm_as_one_mvn(exported, models):
    """keras_vit.layers.LayerNorm's form is the one OpenVINO's MVN fusion matches: the compiled
    CPU graph holds one MVN op per LayerNorm of the model and no separate reductions."""
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(exported("openvino", "float32"), "CPU")
    layer_types = [op.get_rt_info()["layerType"].astype(str)
                   for op in compiled.get_runtime_model().get_ops()]
    model = models["tanh_gelu"]
    norms = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.LayerNormalization)]
    assert len(norms) == 2 * 2 + 1  # two per block, the encoder's last
    assert layer_types.count("MVN") == len(norms)
    assert "Reduce" not in layer_types


def test_openvino_int8_weights_use_seven_bits(exported):
    """NNCF's overflow fix in every layer: no int8 weight constant of the IR exceeds 64 in
    magnitude, so on CPUs without VNNI a pair of u8 x s8 products (at most 2 * 255 * 64 =
    32640) cannot saturate the 16-bit sum (bench/NOTES.md)."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf", reason="nncf is not installed (the export extra)")
    model = ov.Core().read_model(exported("openvino", "int8"))
    weights = [op.get_data() for op in model.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
               and op.get_output_partial_shape(0).rank.get_length() == 2]
    assert len(weights) >= 2 * 4  # at least the four matmuls of each of the two blocks
    magnitudes = [np.abs(w.astype(np.int32)).max() for w in weights]
    assert max(magnitudes) <= 64 and min(magnitudes) > 32  # 7 bits, and all of them used


def test_precision_on_real_images(exported, models):
    """Top-1 agreement and max probability difference of every precision on real photos."""
    from keras_vit.inference import load_images

    directory = shared_data("imagenet", "sample_images")
    names = sorted(os.listdir(directory))[::10]
    images = load_images([str(directory / name) for name in names], 16)
    expected = keras_probabilities(models["tanh_gelu"], images)
    rows = []
    for file_format, precisions in runtimes.PRECISIONS.items():
        for precision in precisions:
            path = exported(file_format, precision)
            probabilities = run_exported.load(path)(images)["probabilities"]
            difference = float(np.abs(probabilities - expected).max())
            agreement = float(np.mean(probabilities.argmax(-1) == expected.argmax(-1)))
            rows.append((file_format, precision, difference, agreement))
            assert difference <= BOUNDS[precision], rows[-1]
    print("\n".join(f"{row[0]:9s} {row[1]:10s} max|dp|={row[2]:.2e} top-1={row[3]:.3f}"
                    for row in rows))


@pytest.mark.parametrize("file_format", ["litert", "onnx", "openvino"])
def test_runner_refuses_bad_input_before_the_runtime(exported, file_format):
    runner = run_exported.load(exported(file_format, "float32"))
    good = generated_images(2)
    nan = good.copy()
    nan[1, 3, 4, 0] = np.nan
    bad_inputs = {
        "rank": good[0], "channels": good[..., :1], "size": good[:, :8],
        "uint8": good.astype(np.uint8), "float64": good.astype(np.float64), "nan": nan,
        "list": good.tolist(),
    }
    for what, images in bad_inputs.items():
        try:
            runner(images)
        except run_exported.ExportedInputError as error:
            assert "float32 (batch, 16, 16, 3)" in str(error), (what, error)
        else:
            pytest.fail(f"{what}: accepted")
    empty = runner(good[:0])
    assert empty["probabilities"].shape == (0, NUM_CLASSES) and empty["classes"].shape == (0, 5)
    assert runner(good)["probabilities"].shape == (2, NUM_CLASSES)  # still usable


def test_runner_names_the_extra_when_a_runtime_is_missing(exported, monkeypatch):
    path = exported("onnx", "float32")
    _hide_module(monkeypatch, "onnxruntime")
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[export\]"'):
        run_exported.load(path)


@pytest.mark.parametrize("file_format, module", [("onnx", "tf2onnx"), ("openvino", "openvino")])
def test_export_names_the_extra_when_a_converter_is_missing(models, tmp_path, monkeypatch,
                                                            file_format, module):
    _hide_module(monkeypatch, module)
    path = tmp_path / f"model{EXTENSIONS[file_format]}"
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[export\]"'):
        runtimes.EXPORTERS[file_format](models["tanh_gelu"], str(path))
    assert os.listdir(tmp_path) == []


def test_openvino_int8_needs_nncf(models, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    _hide_module(monkeypatch, "nncf")
    with pytest.raises(MissingExtraError, match="pip install nncf"):
        runtimes.export_openvino(models["tanh_gelu"], str(tmp_path / "m.xml"), precision="int8",
                                 calibration_images=generated_images(4))


def _hide_module(monkeypatch, name):
    real_import = builtins.__import__

    def fake_import(module, *args, **kwargs):
        if module == name or module.startswith(name + "."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return real_import(module, *args, **kwargs)

    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize("call, message", [
    (lambda m, d: runtimes.export_litert(m, str(d / "m.tflite"), precision="bfloat16"),
     "LiteRT export supports precision float32, float16, int8, int8_full"),
    (lambda m, d: runtimes.export_onnx(m, str(d / "m.onnx"), precision="float16"),
     "ONNX export supports precision float32, int8"),
    (lambda m, d: runtimes.export_litert(m, str(d / "m.onnx")), "written to a .tflite file"),
    (lambda m, d: runtimes.export_litert(m, str(d / "m.tflite"), precision="int8_full"),
     "needs calibration_images"),
    (lambda m, d: runtimes.export_litert(m, str(d / "m.tflite"), precision="int8_full",
                                         calibration_images=np.zeros((2, 8, 8, 3))),
     r"must be \(n, 16, 16, 3\)"),
])
def test_export_refuses_what_it_cannot_do(models, tmp_path, call, message):
    with pytest.raises(ExportError, match=message):
        call(models["tanh_gelu"], tmp_path)
    assert os.listdir(tmp_path) == []


def test_export_never_overwrites(models, tmp_path):
    pytest.importorskip("openvino")
    (tmp_path / "m.bin").write_bytes(b"someone else's weights")
    with pytest.raises(ExportError, match="already exists"):
        runtimes.export_openvino(models["tanh_gelu"], str(tmp_path / "m.xml"))
    assert sorted(os.listdir(tmp_path)) == ["m.bin"]


def test_failed_conversion_or_verification_publishes_nothing(models, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("tf2onnx")

    def half_written(model_proto, path):
        with open(path, "wb") as stream:
            stream.write(model_proto.SerializeToString()[:100])
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(onnx, "save_model", half_written)
        with pytest.raises(OSError, match="disk full"):
            runtimes.export_onnx(models["tanh_gelu"], str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []

    def refuse(path):
        assert path.endswith("m.onnx") and os.path.getsize(path) > 1000
        raise ExportError("probabilities differ")

    with pytest.raises(ExportError, match="probabilities differ"):
        runtimes.export_onnx(models["tanh_gelu"], str(tmp_path / "m.onnx"), verify=refuse)
    assert os.listdir(tmp_path) == []


def test_onnx_export_refuses_a_graph_with_ops_onnx_lacks(models, tmp_path, monkeypatch):
    """tf2onnx only logs an op it cannot convert (exact GELU's Erfc without our handler)."""
    pytest.importorskip("tf2onnx")
    monkeypatch.setattr(runtimes, "_erfc_as_one_minus_erf", lambda *args: None)
    with pytest.raises(ExportError, match="invalid ONNX graph.*Erfc"):
        runtimes.export_onnx(models["exact_gelu_imagenet"], str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


def test_killed_export_leaves_nothing_a_loader_would_take(tmp_path):
    """SIGKILL once the OpenVINO files are written, before they are published."""
    pytest.importorskip("openvino")
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO)!r}]
        from test_runtimes import tiny_model
        from keras_vit.serving import runtimes
        def wait_for_kill(path):
            print("WRITTEN", flush=True)
            time.sleep(600)
        runtimes.export_openvino(tiny_model(), {str(tmp_path / 'm.xml')!r}, verify=wait_for_kill)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        for line in child.stdout:
            if line.strip() == "WRITTEN" or time.time() > deadline:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    leftovers = os.listdir(tmp_path)
    assert "m.xml" not in leftovers and "m.bin" not in leftovers, leftovers
    assert all(name.startswith(".tmp-export-") for name in leftovers), leftovers
    assert len(remove_stale_exports(str(tmp_path))) == len(leftovers) == 1
    assert os.listdir(tmp_path) == []


def test_runner_module_imports_neither_tensorflow_nor_keras():
    """Loading run_exported.py by path (as a TensorFlow-free process does) imports neither."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "run_exported", {str(REPO / 'keras_vit' / 'serving' / 'run_exported.py')!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(sorted(m for m in ("tensorflow", "keras", "keras_vit") if m in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("file_format, precision, nan_out", [
    ("litert", "float32", True), ("litert", "int8", False), ("onnx", "float32", True),
    ("onnx", "int8", False), ("openvino", "float32", True), ("openvino", "int8", False),
])
def test_what_each_runtime_does_with_nan_pixels_unchecked(exported, file_format, precision,
                                                          nan_out):
    """docs/serving.md's table: the runtimes themselves pass NaN to NaN probabilities, except
    the int8 models (LiteRT's, ONNX Runtime's and OpenVINO's), which quantise it into a finite,
    plausible answer; the other images
    of the batch are unaffected. (`run_exported` refuses such images before the runtime.)"""
    runner = run_exported.load(exported(file_format, precision))
    images = generated_images(2)
    images[0, 5, 5, 1] = np.nan
    probabilities = runner._call(images)["probabilities"]
    assert np.all(np.isnan(probabilities[0])) == nan_out
    assert np.all(np.isfinite(probabilities[0])) != nan_out
    np.testing.assert_allclose(probabilities[1], runner._call(images[1:])["probabilities"][0],
                               atol=BOUNDS[precision])


def test_an_output_appearing_during_the_export_is_kept(models, tmp_path):
    """Another writer's .xml appears before ours is published: ours (.bin included) is dropped."""
    pytest.importorskip("openvino")

    def other_export_finishes(path):
        (tmp_path / "m.xml").write_text("another export's model")

    with pytest.raises(ExportError, match="appeared while exporting"):
        runtimes.export_openvino(models["tanh_gelu"], str(tmp_path / "m.xml"),
                                 verify=other_export_finishes)
    assert os.listdir(tmp_path) == ["m.xml"]
    assert (tmp_path / "m.xml").read_text() == "another export's model"
