"""keras_vit.serving.export and tools/export.py: the TF Serving SavedModel contract.

Truths checked against: the Keras model's own probabilities on the pixels the shared eval
preprocessing gives (max abs diff < 1e-5), the independent NumPy ViT of vit_reference, the
checkpoint's array bytes (each weight stored once), `saved_model_cli`'s listing, and a
separate Python process that can load TensorFlow but not our packages.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
import pipelines
from keras_vit import serving
from serving_helpers import encode_image as _encode
from vit_reference import forward, random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIR = os.path.dirname(sys.executable)
IMAGE_SIZE = 16  # patch 4, grid 4
NUM_CLASSES = 7
TOP_K = 3
CLASS_NAMES = ["airplane", "bird", "cat", "deer", "dog", "frog", "ship"]

# Run in a fresh interpreter. Our packages are made unimportable, so the SavedModel must load
# and run with TensorFlow alone, as in TF Serving. (`import tensorflow` itself imports keras
# for tf.keras, so keras cannot be blocked; the script never uses it.)
_TF_ONLY_SCRIPT = r"""
import json, sys
sys.modules["keras_vit"] = None
sys.modules["pipelines"] = None
import numpy as np
import tensorflow as tf

saved_model_dir, inputs_path, outputs_path = sys.argv[1:]
inputs = np.load(inputs_path)
model = tf.saved_model.load(saved_model_dir)
serve = model.signatures["serving_default"]
pixels = model.signatures["predict_pixels"]
results = {}


def to_numpy(tensor):
    # Fixed-width bytes, so the string outputs round-trip through np.savez without pickle.
    return tensor.numpy().astype("S") if tensor.dtype == tf.string else tensor.numpy()


encoded = [inputs[name].tobytes() for name in sorted(inputs.files) if name.startswith("encoded_")]
for name, value in serve(image_bytes=tf.constant(encoded)).items():
    results["bytes_" + name] = to_numpy(value)
for name, value in pixels(images=tf.constant(inputs["pixels"])).items():
    results["pixels_" + name] = to_numpy(value)
try:
    serve(image_bytes=tf.constant([encoded[0], b"<html>not an image</html>"]))
    error = None
except tf.errors.InvalidArgumentError as caught:
    error = str(caught)
# The same loaded model keeps answering after the bad request.
after = serve(image_bytes=tf.constant(encoded[:1]))["probabilities"].numpy()
# An empty batch gets empty outputs of the right shapes from both signatures.
empty_bytes = serve(image_bytes=tf.constant([], tf.string))
empty_pixels = pixels(images=tf.zeros([0] + list(inputs["pixels"].shape[1:]), tf.float32))
for prefix, outputs in (("empty_bytes_", empty_bytes), ("empty_pixels_", empty_pixels)):
    results.update({prefix + name: to_numpy(value) for name, value in outputs.items()})
np.savez(outputs_path, error=np.array(error or ""), after_error=after,
         loaded_our_code=np.array([m for m in ("keras_vit", "pipelines") if sys.modules.get(m)], "U"),
         **results)
"""


def _test_images():
    """Encoded test images of several formats and sizes (none at the model's resolution)."""
    rng = np.random.default_rng(7)
    smooth = np.linspace(0, 255, 40 * 24 * 3).reshape(40, 24, 3).astype(np.uint8)
    return {
        "encoded_0_png": _encode(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "PNG"),
        "encoded_1_jpeg": _encode(smooth, "JPEG"),
        "encoded_2_png_large": _encode(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), "PNG"),
        "encoded_3_gif": _encode(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), "GIF"),
        "encoded_4_bmp": _encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "BMP"),
        "encoded_5_jpeg_gray": _encode(np.ascontiguousarray(smooth[::-1, :, 0]), "JPEG"),
    }


def _softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def _run(args, **kwargs):
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, cwd=kwargs.pop("cwd", REPO), **kwargs)


def _tree_digest(directory):
    """{relative path: (sha256, mtime_ns)} of every file under `directory`."""
    digest = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as stream:
                digest[os.path.relpath(path, directory)] = (
                    hashlib.sha256(stream.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return digest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random ViT (patch 4, 16x16 input, 7 classes) as a Google-layout .npz checkpoint."""
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=NUM_CLASSES, seed=3)
    path = str(tmp_path_factory.mktemp("checkpoint") / "tiny.npz")
    np.savez(path, **arrays)
    names_path = os.path.join(os.path.dirname(path), "names.txt")
    with open(names_path, "w") as stream:
        stream.write("\n".join(CLASS_NAMES) + "\n")
    return arrays, path, names_path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """tools/export.py run on the .npz checkpoint directly (no training): EXPORT_DIR/1."""
    _, path, names_path = checkpoint
    export_dir = str(tmp_path_factory.mktemp("exports") / "vit")
    result = _run([sys.executable, "tools/export.py", f"--checkpoint={path}",
                   f"--class_names={names_path}", f"--export_dir={export_dir}",
                   f"--top_k={TOP_K}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return export_dir, summary


@pytest.mark.slow
def test_tool_exports_npz_checkpoint_as_version_1(exported):
    export_dir, summary = exported
    assert summary["export_path"] == os.path.join(export_dir, "1")
    assert summary["version"] == 1
    assert (summary["image_size"], summary["num_classes"], summary["top_k"]) == (
        IMAGE_SIZE, NUM_CLASSES, TOP_K)
    assert sorted(os.listdir(export_dir)) == ["1"]  # no temporary directory left behind
    with open(os.path.join(export_dir, "1", "assets", serving.CLASS_NAMES_ASSET)) as stream:
        assert stream.read().splitlines() == CLASS_NAMES


@pytest.mark.slow
def test_each_weight_stored_once(checkpoint, exported):
    arrays, _, _ = checkpoint
    export_dir, summary = exported
    # Truth: the bytes of the checkpoint's float32 arrays, which are exactly the model's weights.
    checkpoint_bytes = sum(array.nbytes for array in arrays.values())
    assert summary["weight_bytes"] == checkpoint_bytes
    stored = serving.variables_bytes(os.path.join(export_dir, "1"))
    assert stored == summary["variables_bytes"]
    assert checkpoint_bytes <= stored <= 1.1 * checkpoint_bytes


@pytest.mark.slow
def test_saved_model_cli_lists_both_signatures_with_dynamic_batch(exported):
    export_dir, _ = exported
    result = _run([os.path.join(PYTHON_DIR, "saved_model_cli"), "show",
                   "--dir", os.path.join(export_dir, "1"), "--all"])
    assert result.returncode == 0, result.stderr[-3000:]
    listing = result.stdout

    def signature(name):
        match = re.search(
            rf"signature_def\['{name}'\]:\n(.*?)Method name is: (\S+)", listing, re.DOTALL)
        assert match, f"{name} missing from:\n{listing}"
        assert match.group(2) == "tensorflow/serving/predict"
        tensors = re.findall(r"(inputs|outputs)\['(\w+)'\] tensor_info:\n\s+dtype: (\w+)\n"
                             r"\s+shape: \(([^)]*)\)", match.group(1))
        return {(kind, key): (dtype, shape) for kind, key, dtype, shape in tensors}

    outputs = {
        ("outputs", "probabilities"): ("DT_FLOAT", f"-1, {NUM_CLASSES}"),
        ("outputs", "classes"): ("DT_INT32", f"-1, {TOP_K}"),
        ("outputs", "scores"): ("DT_FLOAT", f"-1, {TOP_K}"),
        ("outputs", "labels"): ("DT_STRING", f"-1, {TOP_K}"),
    }
    assert signature("serving_default") == {
        ("inputs", "image_bytes"): ("DT_STRING", "-1"), **outputs}
    assert signature("predict_pixels") == {
        ("inputs", "images"): ("DT_FLOAT", f"-1, {IMAGE_SIZE}, {IMAGE_SIZE}, 3"), **outputs}


@pytest.mark.slow
def test_tensorflow_alone_serves_the_same_answers_as_keras(checkpoint, exported, tmp_path):
    arrays, path, _ = checkpoint
    export_dir, _ = exported
    images = _test_images()
    rng = np.random.default_rng(11)
    pixels = rng.uniform(0, 255, (5, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    inputs_path, outputs_path = str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")
    np.savez(inputs_path, pixels=pixels,
             **{name: np.frombuffer(data, np.uint8) for name, data in images.items()})
    result = _run([sys.executable, "-c", _TF_ONLY_SCRIPT, os.path.join(export_dir, "1"),
                   inputs_path, outputs_path], cwd=str(tmp_path),
                  env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(outputs_path)
    assert served["loaded_our_code"].size == 0

    model, _ = keras_vit.load_classifier(path)
    decoded = np.stack([
        pipelines.preprocess_for_eval(tf.constant(images[name]), IMAGE_SIZE).numpy()
        for name in sorted(images)])
    for prefix, batch in (("bytes_", decoded), ("pixels_", pixels)):
        probabilities = served[prefix + "probabilities"]
        assert probabilities.dtype == np.float32 and probabilities.shape == (len(batch), NUM_CLASSES)
        keras_probabilities = keras.ops.convert_to_numpy(
            keras.ops.softmax(model(batch, training=False)))
        assert np.abs(probabilities - keras_probabilities).max() < 1e-5
        # And against the independent float64 NumPy ViT.
        assert np.abs(probabilities - _softmax(forward(arrays, batch))).max() < 1e-4
        # top-k by hand from the served probabilities: order, scores, labels.
        expected_classes = np.argsort(-probabilities, axis=-1, kind="stable")[:, :TOP_K]
        classes = served[prefix + "classes"]
        assert classes.dtype == np.int32
        np.testing.assert_array_equal(classes, expected_classes)
        np.testing.assert_array_equal(
            served[prefix + "scores"], np.take_along_axis(probabilities, expected_classes, -1))
        labels = [[label.decode() for label in row] for row in served[prefix + "labels"]]
        assert labels == [[CLASS_NAMES[index] for index in row] for row in expected_classes]
    # The images differ, so the served rows must too (guards against a constant model).
    assert np.unique(served["bytes_probabilities"].round(6), axis=0).shape[0] == len(images)

    for prefix in ("empty_bytes_", "empty_pixels_"):
        assert served[prefix + "probabilities"].shape == (0, NUM_CLASSES)
        for name in ("classes", "scores", "labels"):
            assert served[prefix + name].shape == (0, TOP_K), (prefix, name)

    error = str(served["error"])
    assert "not a decodable image" in error and "image_bytes[1]" in error, error
    np.testing.assert_allclose(served["after_error"], served["bytes_probabilities"][:1], atol=1e-6)


@pytest.mark.slow
def test_second_export_is_version_2_and_leaves_version_1_untouched(checkpoint, exported):
    _, path, names_path = checkpoint
    export_dir, _ = exported
    before = _tree_digest(os.path.join(export_dir, "1"))
    result = _run([sys.executable, "tools/export.py", f"--checkpoint={path}",
                   f"--class_names={names_path}", f"--export_dir={export_dir}", "--top_k=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["version"] == 2
    assert sorted(os.listdir(export_dir)) == ["1", "2"]
    assert _tree_digest(os.path.join(export_dir, "1")) == before
    assert tf.saved_model.load(os.path.join(export_dir, "2")).signatures[
        "predict_pixels"](images=tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3]))["classes"].shape == (1, 2)


@pytest.mark.slow
def test_tool_refuses_an_existing_version_and_bad_flags(checkpoint, exported):
    _, path, _ = checkpoint
    export_dir, _ = exported
    result = _run([sys.executable, "tools/export.py", f"--checkpoint={path}",
                   f"--export_dir={export_dir}", "--version=1"])
    assert result.returncode != 0
    assert "already exists" in result.stderr and "Versions are immutable" in result.stderr
    result = _run([sys.executable, "tools/export.py", f"--export_dir={export_dir}"])
    assert result.returncode != 0 and "exactly one of --model_dir or --checkpoint" in result.stderr


@pytest.mark.slow
def test_tool_exports_a_model_directory_trained_under_mixed_bfloat16(tmp_path):
    """A training model directory (model.keras + class_names.json), as tools/train.py writes."""
    rng = np.random.default_rng(8)
    images = rng.uniform(0, 255, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = keras_vit.create_model(
            keras_vit.ViTConfig(4, 32, 2, 4, 64), image_size=IMAGE_SIZE, num_classes=3)
        model.compile(optimizer="sgd",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(images, rng.integers(0, 3, 8), batch_size=4, epochs=1, verbose=0)
    finally:
        keras.config.set_dtype_policy(previous)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    keras_vit.write_class_names(["circle", "square", "triangle"], str(model_dir))
    export_dir = tmp_path / "export"
    result = _run([sys.executable, "tools/export.py", f"--model_dir={model_dir}",
                   f"--export_dir={export_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["top_k"] == 3  # --top_k=5 capped at the 3 classes
    outputs = tf.saved_model.load(summary["export_path"]).signatures["predict_pixels"](
        images=tf.constant(images))
    assert outputs["probabilities"].dtype == tf.float32 and outputs["scores"].dtype == tf.float32
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%): the graph and eager runs may
    # round differently (measured 2e-4), so the float32 bound of 1e-5 cannot apply here.
    assert np.abs(outputs["probabilities"].numpy() - keras.ops.convert_to_numpy(
        keras.ops.softmax(model(images, training=False)))).max() < 2e-3
    assert sorted(outputs["labels"].numpy()[0].astype(str)) == ["circle", "square", "triangle"]
