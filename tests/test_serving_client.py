"""keras_vit.serving.client: the REST JSON and gRPC PredictRequest it sends, field by field.

No server is started: requests are checked against TF Serving's documented formats (hand
computed base64, proto fields), and the gRPC request's tensors are fed by input name to a real
exported SavedModel's signature, as TF Serving does, to show the names and dtypes fit.
"""

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2

import keras_vit
from keras_vit import serving
from keras_vit.serving import client
from vit_reference import random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_LIKE = b"\x89PNG\r\n\x1a\nabc"


@pytest.fixture
def predict_pb2():
    """tensorflow-serving-api's request/response protos (a dependency of the gRPC client)."""
    return pytest.importorskip(
        "tensorflow_serving.apis.predict_pb2",
        reason="tensorflow-serving-api is absent (a test extra: pip install -e '.[test]')")


JPEG_LIKE = b"\xff\xd8\xff\xe0xyz"


def test_rest_url():
    assert client.rest_url("localhost:8501", "vit") == "http://localhost:8501/v1/models/vit:predict"
    assert client.rest_url("https://serving.example.com/", "vit", 3) == (
        "https://serving.example.com/v1/models/vit/versions/3:predict")


def test_rest_request_for_encoded_images():
    body = client.rest_request(image_bytes=[b"abc", JPEG_LIKE])
    # Base64 by hand: "abc" -> "YWJj"; the JPEG-like bytes via their hex.
    assert body == {
        "signature_name": "serving_default",
        "instances": [{"b64": "YWJj"}, {"b64": "/9j/4Hh5eg=="}],
    }
    assert base64.b64decode(body["instances"][1]["b64"]) == JPEG_LIKE
    assert json.loads(json.dumps(body)) == body  # JSON-serializable as is


def test_rest_request_for_pixels():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    body = client.rest_request(signature_name="predict_pixels", images=images)
    assert body["signature_name"] == "predict_pixels"
    assert body["instances"][1][0][1] == [15.0, 16.0, 17.0]  # image 1, row 0, column 1
    np.testing.assert_array_equal(np.array(body["instances"], np.float32), images)


@pytest.mark.parametrize("kwargs, message", [
    ({"signature_name": "serve", "image_bytes": [b"a"]}, "signature_name must be one of"),
    ({"image_bytes": [b"a"], "images": np.zeros((1, 2, 2, 3))}, "nothing else"),
    ({"signature_name": "predict_pixels", "image_bytes": [b"a"]}, "takes images"),
    ({"image_bytes": []}, "No images"),
    ({"signature_name": "predict_pixels", "images": np.zeros((2, 2, 3))}, "got shape"),
    ({"signature_name": "explain", "images": np.zeros((1, 2, 2, 3))}, "takes image_bytes"),
])
def test_bad_inputs_are_refused(kwargs, message, predict_pb2):
    with pytest.raises(ValueError, match=message):
        client.rest_request(**kwargs)
    with pytest.raises(ValueError, match=message):
        client.grpc_request("vit", **kwargs)


def test_grpc_request_for_encoded_images(predict_pb2):
    request = client.grpc_request("vit", image_bytes=[PNG_LIKE, JPEG_LIKE], version=4)
    assert isinstance(request, predict_pb2.PredictRequest)
    assert request.model_spec.name == "vit"
    assert request.model_spec.signature_name == "serving_default"
    assert request.model_spec.HasField("version") and request.model_spec.version.value == 4
    assert list(request.inputs) == ["image_bytes"]
    tensor = request.inputs["image_bytes"]
    assert tensor.dtype == types_pb2.DT_STRING
    assert [dim.size for dim in tensor.tensor_shape.dim] == [2]
    assert list(tensor.string_val) == [PNG_LIKE, JPEG_LIKE]
    # What goes on the wire parses back to the same request.
    assert predict_pb2.PredictRequest.FromString(request.SerializeToString()) == request


def test_grpc_request_for_pixels_without_version(predict_pb2):
    images = np.random.default_rng(0).uniform(0, 255, (3, 4, 4, 3)).astype(np.float32)
    request = client.grpc_request("other", signature_name="predict_pixels", images=images)
    assert request.model_spec.name == "other"
    assert request.model_spec.signature_name == "predict_pixels"
    assert not request.model_spec.HasField("version")  # the server picks the latest
    tensor = request.inputs["images"]
    assert tensor.dtype == types_pb2.DT_FLOAT
    assert [dim.size for dim in tensor.tensor_shape.dim] == [3, 4, 4, 3]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), images)


def test_parse_rest_response():
    body = {"predictions": [
        {"probabilities": [0.7, 0.2, 0.1], "classes": [0, 1], "scores": [0.7, 0.2],
         "labels": ["cat", "dog"]},
        {"probabilities": [0.1, 0.3, 0.6], "classes": [2, 1], "scores": [0.6, 0.3],
         "labels": ["fox", "dog"]},
    ]}
    assert client.parse_rest_response(body) == [
        client.Prediction(["cat", "dog"], [0.7, 0.2], [0, 1]),
        client.Prediction(["fox", "dog"], [0.6, 0.3], [2, 1]),
    ]
    with pytest.raises(client.ServingError, match="not a decodable image"):
        client.parse_rest_response({"error": "input is not a decodable image: ..."})
    with pytest.raises(client.ServingError, match="got keys"):
        client.parse_rest_response({"predictions": [[0.7, 0.3]]})


def test_explain_requests_carry_the_images_and_answers_their_rollout():
    body = client.rest_request(signature_name="explain", image_bytes=[b"abc"])
    assert body == {"signature_name": "explain", "instances": [{"b64": "YWJj"}]}
    answer = {"predictions": [{"classes": [1], "scores": [0.9], "labels": ["dog"],
                               "attention_rollout": [[1.0, 0.5], [0.25, 0.0]]}]}
    assert client.parse_rest_response(answer) == [
        client.Prediction(["dog"], [0.9], [1], attention_rollout=[[1.0, 0.5], [0.25, 0.0]])]


def test_parse_grpc_response(predict_pb2):
    response = predict_pb2.PredictResponse()
    response.outputs["labels"].CopyFrom(tf.make_tensor_proto([[b"cat", b"dog"]]))
    response.outputs["scores"].CopyFrom(tf.make_tensor_proto(np.array([[0.75, 0.25]], np.float32)))
    response.outputs["classes"].CopyFrom(tf.make_tensor_proto(np.array([[3, 0]], np.int32)))
    assert client.parse_grpc_response(response) == [client.Prediction(["cat", "dog"], [0.75, 0.25], [3, 0])]
    del response.outputs["labels"]
    with pytest.raises(client.ServingError, match=r"lacks outputs \['labels'\]"):
        client.parse_grpc_response(response)


class _Answer(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_predict_rest_posts_the_json(monkeypatch):
    sent = {}

    def urlopen(request, timeout):
        sent.update(url=request.full_url, method=request.get_method(), timeout=timeout,
                    content_type=request.get_header("Content-type"), body=json.loads(request.data))
        return _Answer(json.dumps({"predictions": [
            {"classes": [1], "scores": [0.5], "labels": ["dog"], "probabilities": [0.5, 0.5]}]}
        ).encode())

    monkeypatch.setattr(client.urllib.request, "urlopen", urlopen)
    predictions = client.predict_rest("localhost:8501", "vit", version=2, timeout=5,
                                      image_bytes=[b"abc"])
    assert sent == {"url": "http://localhost:8501/v1/models/vit/versions/2:predict",
                    "method": "POST", "timeout": 5, "content_type": "application/json",
                    "body": {"signature_name": "serving_default", "instances": [{"b64": "YWJj"}]}}
    assert predictions == [client.Prediction(["dog"], [0.5], [1])]


def test_predict_rest_reports_the_server_error(monkeypatch):
    def urlopen(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 400, "Bad Request", {}, io.BytesIO(
            b'{"error": "assertion failed: [input is not a decodable image: ..."}'))

    monkeypatch.setattr(client.urllib.request, "urlopen", urlopen)
    with pytest.raises(client.ServingError, match=r"HTTP 400: assertion failed: \[input is not"):
        client.predict_rest("localhost:8501", "vit", image_bytes=[b"abc"])

    def unreachable(request, timeout):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(client.urllib.request, "urlopen", unreachable)
    with pytest.raises(client.ServingError, match="Could not reach TF Serving"):
        client.predict_rest("localhost:8501", "vit", image_bytes=[b"abc"])


def test_grpc_request_fits_the_exported_signatures(tmp_path, monkeypatch, predict_pb2):
    """TF Serving feeds request.inputs by name to the signature; do that with a real export."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    arrays = random_checkpoint(4, 16, 1, 2, 32, grid=2, num_classes=3, seed=4)
    np.savez(tmp_path / "tiny.npz", **arrays)
    exported = serving.export_classifier(keras_vit.from_npz(str(tmp_path / "tiny.npz")),
                                         str(tmp_path / "export"), class_names=["a", "b", "c"],
                                         top_k=2, signatures=["explain"])
    loaded = tf.saved_model.load(exported.path)
    png = tf.io.encode_png(tf.zeros([5, 7, 3], tf.uint8)).numpy()
    pixels = np.full((1, 8, 8, 3), 127.5, np.float32)

    class Stub:
        def __init__(self, channel):
            pass

        def Predict(self, request, timeout):
            signature = loaded.signatures[request.model_spec.signature_name]
            outputs = signature(**{name: tf.constant(tf.make_ndarray(tensor))
                                   for name, tensor in request.inputs.items()})
            response = predict_pb2.PredictResponse()
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub", Stub)
    by_bytes = client.predict_grpc("localhost:8500", "vit", image_bytes=[png])
    by_pixels = client.predict_grpc("localhost:8500", "vit", signature_name="predict_pixels",
                                    images=pixels)
    direct = loaded.signatures["predict_pixels"](images=tf.constant(pixels))
    for predictions in (by_bytes, by_pixels):
        assert len(predictions) == 1 and set(predictions[0].labels) <= {"a", "b", "c"}
    assert by_pixels[0].classes == direct["classes"].numpy()[0].tolist()
    np.testing.assert_allclose(by_pixels[0].scores, direct["scores"].numpy()[0], rtol=1e-6)
    assert by_bytes[0].attention_rollout is None  # serving_default has no map

    (explained,) = client.predict_grpc("localhost:8500", "vit", signature_name="explain",
                                       image_bytes=[png])
    direct = loaded.signatures["explain"](image_bytes=tf.constant([png]))
    assert explained.classes == by_bytes[0].classes
    np.testing.assert_allclose(explained.attention_rollout,
                               direct["attention_rollout"].numpy()[0], rtol=1e-6)
    assert np.array(explained.attention_rollout).shape == (2, 2)  # the 2 x 2 patch grid


def test_missing_grpc_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(ImportError, match="pip install tensorflow-serving-api"):
        client.grpc_request("vit", image_bytes=[PNG_LIKE])


def _run_tool(*args):
    return subprocess.run([sys.executable, "tools/serving_client.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_tool_reports_an_unreachable_server_and_bad_flags(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy())
    # Port 9 (discard) on localhost: nothing serves there, the connection is refused.
    result = _run_tool("--server=localhost:9", "--timeout=5", str(image))
    assert result.returncode == 2  # a ServingError is a UserError: one line, cli's status 2
    assert "Could not reach TF Serving at http://localhost:9/v1/models/vit:predict" in result.stderr
    result = _run_tool("--signature=predict_pixels", str(image))
    assert result.returncode != 0 and "needs --image_size" in result.stderr
    result = _run_tool(str(tmp_path / "missing.jpg"))
    assert result.returncode != 0 and "missing.jpg is not a file" in result.stderr


def test_the_tools_json_line_carries_explain_s_rollout():
    line = json.loads(client.json_line("cat.png", client.Prediction(
        ["dog"], [0.9], [1], attention_rollout=[[1.0, float("nan")], [0.123456789, 0.0]])))
    assert line == {"file": "cat.png", "labels": ["dog"], "scores": [0.9], "classes": [1],
                    "attention_rollout": [[1.0, None], [0.123457, 0.0]]}
    line = json.loads(client.json_line("cat.png", client.Prediction(["dog"], [float("inf")], [1])))
    assert line == {"file": "cat.png", "labels": ["dog"], "scores": [None], "classes": [1]}
