"""keras_vit.serving.client: the REST JSON and gRPC PredictRequest it sends, field by field.

No TF Serving is started: requests are checked against TF Serving's documented formats (hand
computed base64 and protobuf bytes, proto fields), and the requests' tensors are fed by input
name to a real exported SavedModel's signature, as TF Serving does, to show the names and
dtypes fit: REST bodies read by the REST API's rules (`_as_tf_serving_answers_rest`), gRPC
requests' tensors as they are. predict_tf_example and predict_image_tensor are checked against
serving_default's answers on the same files.
"""

import base64
import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
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
    ({"signature_name": "predict_tf_example", "images": np.zeros((1, 2, 2, 3))},
     r"takes image_bytes \(encoded images; the client wraps each in a tf.train.Example\)"),
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


# --- predict_tf_example and predict_image_tensor -------------------------------------------

# tf.train.Example{features {feature {key: "image/encoded" value {bytes_list {value: "abc"}}}}}
# in protobuf's wire format, by hand: each field a tag byte (field << 3 | 2, length-delimited)
# and a length. BytesList 0a 03 "abc"; Feature 0a 05 <BytesList>; the map entry 0a 0d
# "image/encoded" 12 07 <Feature>; Features 0a 18 <entry>; Example 0a 1a <Features>.
EXAMPLE_OF_ABC = b"\x0a\x1a\x0a\x18\x0a\x0dimage/encoded\x12\x07\x0a\x05\x0a\x03abc"


def test_tf_example_requests_carry_each_file_in_an_example(predict_pb2):
    assert client.tf_example(b"abc") == EXAMPLE_OF_ABC
    body = client.rest_request(signature_name="predict_tf_example", image_bytes=[b"abc", b"abc"])
    # The REST API's {"b64": ...} of those 28 bytes: 40 characters, "==" padding the last byte.
    assert body == {"signature_name": "predict_tf_example",
                    "instances": [{"b64": "ChoKGAoNaW1hZ2UvZW5jb2RlZBIHCgUKA2FiYw=="}] * 2}
    request = client.grpc_request("vit", signature_name="predict_tf_example", image_bytes=[b"abc"])
    assert request.model_spec.signature_name == "predict_tf_example"
    assert list(request.inputs) == ["tf_examples"]
    tensor = request.inputs["tf_examples"]
    assert tensor.dtype == types_pb2.DT_STRING
    assert [dim.size for dim in tensor.tensor_shape.dim] == [1]
    assert list(tensor.string_val) == [EXAMPLE_OF_ABC]


def test_image_tensor_requests_carry_uint8_pixels(predict_pb2):
    images = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    body = client.rest_request(signature_name="predict_image_tensor", images=images)
    assert body["signature_name"] == "predict_image_tensor"
    assert body["instances"][1][0][2] == [24, 25, 26]  # image 1 (from 18), row 0, column 2: +6
    assert all(type(value) is int for value in body["instances"][0][0][0])  # JSON integers
    request = client.grpc_request("vit", signature_name="predict_image_tensor", images=images)
    tensor = request.inputs["image_tensor"]
    assert list(request.inputs) == ["image_tensor"] and tensor.dtype == types_pb2.DT_UINT8
    assert [dim.size for dim in tensor.tensor_shape.dim] == [2, 2, 3, 3]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), images)


@pytest.mark.parametrize("kwargs, message", [
    ({"images": np.zeros((1, 2, 2, 3), np.float32)}, "takes uint8 RGB pixels"),
    ({"images": [np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2, 3), np.uint8)]},
     "one request holds images of one size"),
    ({"images": np.zeros((1, 2, 2), np.uint8)}, "got shape"),
    ({"images": np.zeros((0, 2, 2, 3), np.uint8)}, "got shape"),
    ({"image_bytes": [b"a"]}, r"takes images \(uint8"),
])
def test_bad_image_tensors_are_refused(kwargs, message, predict_pb2):
    for build in (client.rest_request, lambda **kw: client.grpc_request("vit", **kw)):
        with pytest.raises(ValueError, match=message):
            build(signature_name="predict_image_tensor", **kwargs)


def _filled(value, height, width):
    return np.full((height, width, 3), value, np.uint8)


# Five images of three sizes; each image's pixels hold its index, so an answer can name it.
SIZES = [(2, 3), (4, 4), (2, 3), (1, 5), (4, 4)]


def test_size_groups_keep_input_order():
    groups = client.size_groups([_filled(i, h, w) for i, (h, w) in enumerate(SIZES)])
    assert [indices for indices, _ in groups] == [[0, 2], [1, 4], [3]]
    assert [stack.shape for _, stack in groups] == [(2, 2, 3, 3), (2, 4, 4, 3), (1, 1, 5, 3)]
    assert [stack[:, 0, 0, 0].tolist() for _, stack in groups] == [[0, 2], [1, 4], [3]]


def _answer_naming_each_image(instances, drop_last=False):
    """The answer of a server whose class for an image is its first pixel's value."""
    rows = [{"classes": [int(np.array(image)[0, 0, 0])], "scores": [1.0], "labels": ["x"]}
            for image in instances]
    return {"predictions": rows[:-1] if drop_last else rows}


def test_image_tensors_of_many_sizes_are_one_request_each_answered_in_order(monkeypatch):
    bodies = []

    def urlopen(request, timeout):
        bodies.append(json.loads(request.data))
        return _Answer(json.dumps(_answer_naming_each_image(bodies[-1]["instances"])).encode())

    monkeypatch.setattr(client.urllib.request, "urlopen", urlopen)
    images = [_filled(i, h, w) for i, (h, w) in enumerate(SIZES)]
    predictions = client.predict_rest("localhost:8501", "vit",
                                      signature_name="predict_image_tensor", images=images)
    assert [p.classes for p in predictions] == [[0], [1], [2], [3], [4]]  # the input order
    assert [np.array(body["instances"]).shape for body in bodies] == [
        (2, 2, 3, 3), (2, 4, 4, 3), (1, 1, 5, 3)]
    assert {body["signature_name"] for body in bodies} == {"predict_image_tensor"}


def test_a_short_answer_to_one_size_s_request_is_an_error(monkeypatch):
    def urlopen(request, timeout):
        instances = json.loads(request.data)["instances"]
        return _Answer(json.dumps(_answer_naming_each_image(
            instances, drop_last=len(instances) == 2 and len(instances[0]) == 4)).encode())

    monkeypatch.setattr(client.urllib.request, "urlopen", urlopen)
    with pytest.raises(client.ServingError, match=r"localhost:8501/v1/models/vit:predict "
                                                  "answered 1 predictions for 2 images sent"):
        client.predict_rest("localhost:8501", "vit", signature_name="predict_image_tensor",
                            images=[_filled(i, h, w) for i, (h, w) in enumerate(SIZES)])


def test_one_deadline_covers_all_of_a_call_s_requests(monkeypatch, predict_pb2):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    started = []

    def slow_urlopen(request, timeout):
        started.append(time.monotonic())
        time.sleep(0.8)
        return _Answer(json.dumps(_answer_naming_each_image(
            json.loads(request.data)["instances"])).encode())

    monkeypatch.setattr(client.urllib.request, "urlopen", slow_urlopen)
    four_sizes = [_filled(i, 1, i + 1) for i in range(4)]  # four requests of 0.8 s each
    start = time.monotonic()
    with pytest.raises(client.ServingError, match="within the 2 s deadline"):
        client.predict_rest("localhost:8501", "vit", timeout=2,
                            signature_name="predict_image_tensor", images=four_sizes)
    assert time.monotonic() - start < 2.5
    time.sleep(1.0)  # the third request ends at 2.4 s; no fourth starts after the deadline
    assert len(started) == 3

    timeouts = []

    class SlowStub:
        def __init__(self, channel):
            pass

        def Predict(self, request, timeout):
            timeouts.append(timeout)
            time.sleep(0.3)
            response = predict_pb2.PredictResponse()
            count = request.inputs["image_tensor"].tensor_shape.dim[0].size
            for key, value in (("labels", [[b"x"]] * count), ("scores", [[1.0]] * count),
                               ("classes", [[0]] * count)):
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub", SlowStub)
    assert len(client.predict_grpc("localhost:8500", "vit", timeout=2,
                                   signature_name="predict_image_tensor", images=four_sizes)) == 4
    # gRPC's deadline: all of it for the first request, what is left of it for the next: at
    # most 2 - 0.3 i after i requests of at least 0.3 s (and not much less on a busy machine).
    assert timeouts[0] == 2
    for i, left in enumerate(timeouts[1:], start=1):
        assert 2 - 0.3 * i - 0.25 < left <= 2 - 0.3 * i, timeouts


# --- the new signatures against a real export ----------------------------------------------

def _image_files(tmp_path):
    """Encoded images of three sizes: RGB JPEG and PNG, a grayscale PNG and an RGBA PNG (the
    decoders make both RGB), random content so that each is classified differently."""
    rng = np.random.default_rng(7)

    def pixels(height, width, channels):
        return tf.constant(rng.integers(0, 256, (height, width, channels), dtype=np.uint8))

    files = {"a.jpg": tf.io.encode_jpeg(pixels(13, 11, 3), quality=90),
             "b.png": tf.io.encode_png(pixels(8, 8, 3)),
             "gray.png": tf.io.encode_png(pixels(13, 11, 1)),
             "rgba.png": tf.io.encode_png(pixels(20, 16, 4)),
             "c.png": tf.io.encode_png(pixels(8, 8, 3))}
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data.numpy())
        paths.append(str(tmp_path / name))
    return paths


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model's SavedModel (8 x 8 input, central crop 0.75, all classes in top-k), its
    loaded signatures, and image files."""
    tmp_path = tmp_path_factory.mktemp("export")
    arrays = random_checkpoint(4, 16, 1, 2, 32, grid=2, num_classes=3, seed=5)
    np.savez(tmp_path / "tiny.npz", **arrays)
    exported = serving.export_classifier(
        keras_vit.from_npz(str(tmp_path / "tiny.npz")), str(tmp_path / "export"),
        class_names=["a", "b", "c"], top_k=3, central_crop_fraction=0.75)
    return exported.path, tf.saved_model.load(exported.path), _image_files(tmp_path)


def _run_signature(loaded, signature_name, name, value):
    return {key: output.numpy()
            for key, output in loaded.signatures[signature_name](**{name: value}).items()}


def _as_tf_serving_answers_rest(loaded, body):
    """What TF Serving makes of a REST row-format body (its REST API doc): each instance one
    element of the signature's one input, {"b64": ...} a binary string, nested numbers a tensor
    of the input's dtype; the outputs answered as {"predictions": [{output: row}, ...]}, strings
    as text."""
    signature = loaded.signatures[body["signature_name"]]
    ((name, spec),) = signature.structured_input_signature[1].items()
    if spec.dtype == tf.string:
        value = tf.constant([base64.b64decode(row["b64"]) for row in body["instances"]])
    else:
        value = tf.constant(np.array(body["instances"], spec.dtype.as_numpy_dtype))
    outputs = _run_signature(loaded, body["signature_name"], name, value)

    def row(array):
        return [v.decode() for v in array] if array.dtype == object else array.tolist()

    return {"predictions": [{key: row(array[i]) for key, array in outputs.items()}
                            for i in range(len(value))]}


def _as_tf_serving_answers_grpc(loaded, predict_pb2):
    class Stub:
        def __init__(self, channel):
            pass

        def Predict(self, request, timeout):
            (name, tensor), = request.inputs.items()
            outputs = _run_signature(loaded, request.model_spec.signature_name, name,
                                     tf.constant(tf.make_ndarray(tensor)))
            response = predict_pb2.PredictResponse()
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

    return Stub


def _decoded(paths):
    """uint8 (h, w, 3) of each file by the eval pipeline's decoder (grayscale, RGBA to RGB)."""
    from pipelines import preprocess

    return [preprocess.decode_rgb(tf.constant(open(path, "rb").read())).numpy() for path in paths]


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tf_examples_and_image_tensors_answer_as_serving_default(export, protocol, monkeypatch,
                                                                 predict_pb2):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    _, loaded, paths = export
    encoded = [open(path, "rb").read() for path in paths]
    monkeypatch.setattr(client.urllib.request, "urlopen", lambda request, timeout: _Answer(
        json.dumps(_as_tf_serving_answers_rest(loaded, json.loads(request.data))).encode()))
    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub",
                        _as_tf_serving_answers_grpc(loaded, predict_pb2))
    predict = client.predict_rest if protocol == "rest" else client.predict_grpc
    server = "localhost:8501" if protocol == "rest" else "localhost:8500"
    truth = _run_signature(loaded, "serving_default", "image_bytes", tf.constant(encoded))

    by_example = predict(server, "vit", signature_name="predict_tf_example", image_bytes=encoded)
    by_tensor = predict(server, "vit", signature_name="predict_image_tensor",
                        images=_decoded(paths))
    assert [p.classes for p in by_example] == truth["classes"].tolist()
    # The same graph after parsing the Example: the same float32 values.
    np.testing.assert_array_equal([p.scores for p in by_example], truth["scores"])
    assert [p.classes for p in by_tensor] == truth["classes"].tolist()
    # The same decoder (here instead of in the graph), crop and resize give the same pixels,
    # bit for bit (measured); the separately traced model call rounds differently, by up to
    # 2e-7 in probability (measured on random 5-300 px PNGs and JPEGs, crops None/0.75/0.875).
    np.testing.assert_allclose([p.scores for p in by_tensor], truth["scores"], atol=1e-6)
    assert [p.labels for p in by_tensor] == [[label.decode() for label in row]
                                             for row in truth["labels"]]


@contextlib.contextmanager
def _rest_server(loaded):
    """An HTTP server on 127.0.0.1 that answers Predict requests as TF Serving does
    (`_as_tf_serving_answers_rest`); yields "127.0.0.1:PORT"."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = json.dumps(_as_tf_serving_answers_rest(loaded, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.slow
def test_tool_prints_serving_default_s_answers_by_the_new_signatures(export, tmp_path):
    _, loaded, paths = export
    truth = _run_signature(loaded, "serving_default", "image_bytes",
                           tf.constant([open(path, "rb").read() for path in paths]))
    with _rest_server(loaded) as server:
        for signature in ("predict_tf_example", "predict_image_tensor"):
            result = _run_tool(f"--server={server}", f"--signature={signature}", *paths)
            assert result.returncode == 0, result.stderr[-3000:]
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            assert [line["file"] for line in lines] == paths  # input order, 3 sizes mixed
            assert [line["classes"] for line in lines] == truth["classes"].tolist()
            # Printed rounded to 6 decimals.
            np.testing.assert_allclose([line["scores"] for line in lines], truth["scores"],
                                       atol=1e-6)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"just text")
    result = _run_tool("--server=localhost:9", "--signature=predict_image_tensor",
                       paths[0], str(not_an_image))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert lines[-1] == (f"error: {not_an_image} is not a decodable image: expected JPEG, PNG, "
                         "GIF or BMP bytes, found b'just tex'..."), result.stderr[-2000:]
