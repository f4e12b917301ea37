"""Exporting a dynamic-size model (`create_model(dynamic_image_size=True)`).

Truths: the Keras dynamic model itself at 48x64 (test_dynamic_size checks it against offline
resampling and the NumPy reference); the fixed model of the same checkpoint at the built size;
`pipelines.preprocess_for_eval` to the built size for the signatures that decode; the
SignatureDef as the TensorFlow-only process (TF Serving's view) reads it.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_vit
import pipelines
from keras_vit import serving
from keras_vit.serving import runtimes
from serving_helpers import encode_image, serve_in_tensorflow_only_process, strings
from vit_reference import random_checkpoint

BUILT = 16
PATCH = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("npz") / "tiny.npz")
    np.savez(path, **random_checkpoint(PATCH, 32, 2, 4, 64, grid=4, num_classes=5, seed=1))
    return path


@pytest.fixture(scope="module")
def dynamic(checkpoint):
    model = keras_vit.from_npz(checkpoint, dynamic_image_size=True)
    assert model.input_shape == (None, None, None, 3)
    return model


@pytest.fixture(scope="module")
def exported(dynamic, tmp_path_factory):
    return serving.export_classifier(
        dynamic, str(tmp_path_factory.mktemp("exports")), top_k=2, warmup_batch_sizes=(1,),
        signatures=serving.ALL_SIGNATURES,
        feature_options=serving.FeatureOptions(output="spatial"))


def _pixels(height, width, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype(
        np.float32)


def _softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def test_dynamic_model_serves_any_multiple_of_the_patch(checkpoint, dynamic, exported, tmp_path):
    assert exported.image_size == BUILT
    large, built = _pixels(48, 64), _pixels(BUILT, BUILT, seed=1)
    rng = np.random.default_rng(2)
    encoded = [encode_image(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "PNG")]
    decoded = pipelines.preprocess_for_eval(tf.constant(encoded[0]), BUILT).numpy()[None]
    answers = serve_in_tensorflow_only_process(exported.path, {
        "predict_pixels:48x64": large, "predict_pixels:built": built,
        "predict_pixels:empty": np.zeros((0, 8, 12, 3), np.float32),
        "predict_pixels:17x17": _pixels(17, 17), "predict_pixels:16x18": _pixels(16, 18),
        "predict_pixels:rank3": _pixels(16, 16)[0],
        "serving_default:png": strings(*encoded), "features:png": strings(*encoded),
        "explain:png": strings(*encoded)},
        tmp_path, warmup_path=f"{exported.path}/{serving.WARMUP_FILE}", all_outputs=True)
    assert answers["input_shapes"]["predict_pixels"] == [-1, -1, -1, 3]
    assert answers["input_shapes"]["serving_default"] == [-1]
    np.testing.assert_allclose(answers["predict_pixels:48x64"]["probabilities"],
                               _softmax(dynamic(large)), rtol=1e-5, atol=1e-7)
    fixed = keras_vit.from_npz(checkpoint)
    assert fixed.input_shape == (None, BUILT, BUILT, 3)
    np.testing.assert_allclose(answers["predict_pixels:built"]["probabilities"],
                               _softmax(fixed(built)), rtol=1e-5, atol=1e-7)
    assert answers["predict_pixels:empty"]["probabilities"] == []  # (0, 5): no rows
    for case in ("17x17", "16x18", "rank3"):
        answer = answers[f"predict_pixels:{case}"]
        assert answer.get("code") == "INVALID_ARGUMENT", (case, answer)
        assert "input `images`" in answer["error"] and "patch size 4" in answer["error"], answer
    # The decoding signatures resize to the built size.
    for signature in ("serving_default", "explain"):
        np.testing.assert_allclose(answers[f"{signature}:png"]["probabilities"],
                                   _softmax(fixed(decoded)), rtol=1e-5, atol=1e-7)
    features = keras_vit.feature_extractor(dynamic, output="spatial")(decoded)
    np.testing.assert_allclose(answers["features:png"]["features"], features, rtol=1e-5,
                               atol=1e-5 * np.abs(features).max())
    assert np.asarray(answers["explain:png"]["heatmap"]).shape == (1, BUILT, BUILT)
    assert [record["signature"] for record in answers["warmup"]] == list(serving.ALL_SIGNATURES)
    assert all("code" not in record["outputs"] for record in answers["warmup"])


def test_non_square_built_size_is_refused(tmp_path):
    config = keras_vit.ViTConfig(patch_size=4, hidden_size=32, num_layers=1, num_heads=4,
                                 mlp_dim=64)
    model = keras_vit.create_model(config, image_size=(16, 24), num_classes=3,
                                   dynamic_image_size=True)
    with pytest.raises(serving.ExportError, match=r"built for \(16, 24\)"):
        serving.export_classifier(model, str(tmp_path), warmup_batch_sizes=())


def test_onnx_exports_a_dynamic_model_at_its_built_size(dynamic, tmp_path):
    pytest.importorskip("tf2onnx", reason="tf2onnx is an export extra: pip install -e '.[export]'")
    onnxruntime = pytest.importorskip(
        "onnxruntime", reason="onnxruntime is an export extra: pip install -e '.[export]'")
    path = runtimes.export_onnx(dynamic, str(tmp_path / "vit.onnx"), top_k=2)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (declared,) = session.get_inputs()
    assert list(declared.shape[1:]) == [BUILT, BUILT, 3]
    pixels = _pixels(BUILT, BUILT, seed=4)
    (probabilities,) = session.run(["probabilities"], {declared.name: pixels})
    np.testing.assert_allclose(probabilities, _softmax(dynamic(pixels)), rtol=1e-5, atol=1e-6)
