"""Requests to a TensorFlow Serving model exported by `keras_vit.serving.export_classifier`.

Builds (and sends) the two kinds of Predict request TF Serving accepts:

    REST   POST http://HOST:8501/v1/models/NAME[/versions/N]:predict
           {"signature_name": "serving_default", "instances": [{"b64": "<base64 image>"}, ...]}
           {"signature_name": "predict_pixels", "instances": [<H x W x 3 nested lists>, ...]}
    gRPC   tensorflow.serving.PredictionService/Predict on HOST:8500 with a `PredictRequest`
           (model_spec.name / signature_name / version, inputs["image_bytes"] a DT_STRING
           tensor of shape (batch,), or inputs["images"] DT_FLOAT (batch, H, W, 3))

(the `explain` signature takes image_bytes as serving_default does) and reads either answer
into one `Prediction` per image, with explain's `attention_rollout` map. gRPC needs the optional
`tensorflow-serving-api` package (`pip install tensorflow-serving-api`).

`timeout` is one total deadline per request: gRPC's own deadline, and for REST a worker thread
that the caller stops waiting for (urllib's timeout bounds each socket operation, so a server
sending one byte a second would never time out). Every failure (deadline, refused or dropped
connection, an answer that is not JSON or does not hold one prediction per image) is a
`ServingError` naming the server.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import math
import threading
import urllib.error
import urllib.request

import numpy as np

from keras_vit.serving.signatures import (
    BYTES_INPUT,
    EXPLAIN_SIGNATURE,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
)
from pipelines.errors import MissingExtraError, UserError

# The classifying signatures the client speaks: encoded images or pixels in, top-k out (and
# explain's rollout map). `features` answers no top-k: any TF Serving client reads it.
_INPUT_OF_SIGNATURE = {SERVING_SIGNATURE: BYTES_INPUT, PIXELS_SIGNATURE: PIXELS_INPUT,
                       EXPLAIN_SIGNATURE: BYTES_INPUT}
ROLLOUT_OUTPUT = "attention_rollout"  # explain's (batch, gh, gw) map, what the client reads


class ServingError(UserError, RuntimeError):
    """The server answered with an error, or with something that is not a prediction, or
    could not be reached."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top-k answer for one image, best first."""

    labels: list[str]
    scores: list[float]
    classes: list[int]
    # explain only: the attention rollout over the patch grid, rows of floats in [0, 1]
    attention_rollout: list[list[float]] | None = None


def _require_grpc_api():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as error:
        raise MissingExtraError(
            "gRPC requests need the tensorflow-serving-api package, which is not installed: "
            "`pip install -e \".[serving]\"` (or `pip install tensorflow-serving-api`, the same "
            "minor version as tensorflow), or use the REST protocol."
        ) from error
    return predict_pb2, prediction_service_pb2_grpc


def _check_inputs(signature_name, image_bytes, images):
    if signature_name not in _INPUT_OF_SIGNATURE:
        raise ValueError(
            f"signature_name must be one of {sorted(_INPUT_OF_SIGNATURE)}, got {signature_name!r}.")
    expects_bytes = _INPUT_OF_SIGNATURE[signature_name] == BYTES_INPUT
    given = image_bytes if expects_bytes else images
    other = images if expects_bytes else image_bytes
    if given is None or other is not None:
        raise ValueError(
            f"{signature_name} takes {'image_bytes (encoded images)' if expects_bytes else 'images (float32 pixels)'}"
            " and nothing else.")
    if expects_bytes:
        image_bytes = [bytes(data) for data in image_bytes]
        if not image_bytes:
            raise ValueError("No images to send.")
        return image_bytes
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"images must be (batch, height, width, 3) pixels, got shape {images.shape}.")
    return images


def rest_url(server: str, model_name: str, version: int | None = None) -> str:
    """The Predict URL, e.g. "http://localhost:8501/v1/models/vit/versions/2:predict"."""
    if "://" not in server:
        server = "http://" + server
    path = f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version else "")
    return server.rstrip("/") + path + ":predict"


def rest_request(*, signature_name=SERVING_SIGNATURE, image_bytes=None, images=None) -> dict:
    """The JSON body of a REST Predict request, in TF Serving's row ("instances") format.

    Args:
        signature_name: "serving_default" or "explain" (with image_bytes), or
            "predict_pixels" (with images).
        image_bytes: list of encoded images (bytes); sent base64 encoded as {"b64": ...}, the
            REST API's way of carrying binary DT_STRING values.
        images: float (batch, H, W, 3) pixels in [0, 255]; sent as nested lists.
    """
    inputs = _check_inputs(signature_name, image_bytes, images)
    if _INPUT_OF_SIGNATURE[signature_name] == BYTES_INPUT:
        instances = [{"b64": base64.b64encode(data).decode("ascii")} for data in inputs]
    else:
        instances = inputs.tolist()
    return {"signature_name": signature_name, "instances": instances}


def grpc_request(model_name: str, *, signature_name=SERVING_SIGNATURE, image_bytes=None,
                 images=None, version: int | None = None):
    """A `tensorflow.serving.PredictRequest` for the same inputs as `rest_request`."""
    import tensorflow as tf

    predict_pb2, _ = _require_grpc_api()
    inputs = _check_inputs(signature_name, image_bytes, images)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version:
        request.model_spec.version.value = int(version)
    if _INPUT_OF_SIGNATURE[signature_name] == BYTES_INPUT:
        tensor = tf.make_tensor_proto(inputs, dtype=tf.string, shape=[len(inputs)])
    else:
        tensor = tf.make_tensor_proto(inputs, dtype=tf.float32, shape=inputs.shape)
    request.inputs[_INPUT_OF_SIGNATURE[signature_name]].CopyFrom(tensor)
    return request


def json_line(path, prediction) -> str:
    """One image's answer as the JSON line tools/serving_client.py prints: file, labels,
    scores, classes (and explain's attention_rollout); a value that is not finite is null."""
    def finite(value):
        return round(value, 6) if math.isfinite(value) else None

    line = {"file": path, "labels": prediction.labels,
            "scores": [finite(score) for score in prediction.scores],
            "classes": prediction.classes}
    if prediction.attention_rollout is not None:
        line["attention_rollout"] = [[finite(value) for value in row]
                                     for row in prediction.attention_rollout]
    return json.dumps(line, allow_nan=False)


def _prediction(labels, scores, classes, rollout=None):
    labels = [label.decode("utf-8") if isinstance(label, bytes) else str(label) for label in labels]
    rollout = None if rollout is None else [[float(v) for v in row] for row in rollout]
    return Prediction(labels=labels, scores=[float(s) for s in scores],
                      classes=[int(c) for c in classes], attention_rollout=rollout)


def parse_rest_response(body: dict) -> list[Prediction]:
    """Predictions from a REST Predict answer {"predictions": [{"labels", "scores", ...}, ...]}."""
    if "error" in body:
        raise ServingError(f"TF Serving answered with an error: {body['error']}")
    try:
        return [_prediction(row["labels"], row["scores"], row["classes"],
                            row.get(ROLLOUT_OUTPUT)) for row in body["predictions"]]
    except (KeyError, TypeError) as error:
        raise ServingError(
            "Expected {\"predictions\": [{\"labels\", \"scores\", \"classes\", ...}]} from a model "
            f"exported by keras_vit; got keys {sorted(body)}: {error!r}") from error


def parse_grpc_response(response) -> list[Prediction]:
    """Predictions from a `tensorflow.serving.PredictResponse`."""
    import tensorflow as tf

    missing = [key for key in ("labels", "scores", "classes") if key not in response.outputs]
    if missing:
        raise ServingError(
            f"The response lacks outputs {missing} (has {sorted(response.outputs)}): was the "
            "model exported by keras_vit?")
    labels, scores, classes = (
        tf.make_ndarray(response.outputs[key]) for key in ("labels", "scores", "classes"))
    rollouts = (tf.make_ndarray(response.outputs[ROLLOUT_OUTPUT])
                if ROLLOUT_OUTPUT in response.outputs else [None] * len(labels))
    if not len(labels) == len(scores) == len(classes) == len(rollouts):
        raise ServingError(
            f"The response's outputs disagree on the number of images: labels {len(labels)}, "
            f"scores {len(scores)}, classes {len(classes)}"
            + (f", {ROLLOUT_OUTPUT} {len(rollouts)}." if ROLLOUT_OUTPUT in response.outputs
               else "."))
    return [_prediction(*row) for row in zip(labels, scores, classes, rollouts)]


def _num_images(image_bytes=None, images=None, **_):
    return len(image_bytes if image_bytes is not None else images)


def _deadline_message(where, timeout):
    seconds = timeout if timeout is None else format(timeout, "g")
    return (f"No complete answer from TF Serving at {where} within the {seconds} s deadline: "
            "the server is overloaded, stalled or too slow; retry or raise the timeout.")


def _check_count(predictions, num_sent, where):
    if len(predictions) != num_sent:
        raise ServingError(
            f"TF Serving at {where} answered {len(predictions)} predictions for {num_sent} "
            "images sent; expected one per image.")
    return predictions


def _within_deadline(work, timeout, where):
    """`work(abandoned)`'s result, or its exception, if it finishes within `timeout` seconds.

    It runs in a daemon thread; past the deadline the caller gets a ServingError naming
    `where`, and `abandoned` is set so that `work` stops at its next read.
    """
    abandoned, outcome = threading.Event(), {}

    def target():
        try:
            outcome["value"] = work(abandoned)
        except BaseException as error:  # handed to the caller's thread, raised there
            outcome["error"] = error

    thread = threading.Thread(target=target, name="rest-request", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        abandoned.set()
        raise ServingError(_deadline_message(where, timeout))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _read_body(answer, abandoned):
    """The whole body, read as it arrives; stops early once the caller has given up."""
    chunks = []
    while not abandoned.is_set():
        chunk = answer.read1(65536)
        if chunk:
            chunks.append(chunk)
            continue
        # read1 ends quietly at EOF; `length` is what Content-Length promised and is missing.
        if getattr(answer, "length", None):
            raise http.client.IncompleteRead(b"".join(chunks), answer.length)
        return b"".join(chunks)
    return b""


def _post(request, timeout, abandoned):
    """Sends `request`; the answer's parsed JSON. Network failures become ServingErrors."""
    url = request.full_url
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = _read_body(answer, abandoned)
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text
        raise ServingError(f"{url} answered HTTP {error.code}: {message}") from error
    except urllib.error.URLError as error:
        raise ServingError(
            f"Could not reach TF Serving at {url}: {error.reason}. Is the server "
            "running, and is this its REST port (8501 by default)?") from error
    except TimeoutError as error:  # socket.timeout: no byte for `timeout` seconds
        raise ServingError(_deadline_message(url, timeout)) from error
    except (http.client.HTTPException, OSError) as error:
        raise ServingError(
            f"TF Serving at {url} dropped the connection before a complete answer "
            f"({type(error).__name__}: {error or 'no detail'}); retry, or look at the server's "
            "log.") from error
    try:
        return json.loads(text)
    except ValueError as error:
        raise ServingError(
            f"TF Serving at {url} answered with something that is not JSON ({error}): "
            f"{text[:120]!r}") from error


def predict_rest(server, model_name, *, version=None, timeout=30.0, **inputs) -> list[Prediction]:
    """Sends `rest_request(**inputs)` to `server` (host:port, default REST port 8501).

    Args:
        timeout: seconds for the whole request, from connecting to the last byte.

    Raises:
        ServingError: the deadline passed, the server could not be reached, dropped the
            connection or answered an error, or the answer does not hold one prediction per
            image; the message names the URL.
    """
    body = rest_request(**inputs)
    request = urllib.request.Request(
        rest_url(server, model_name, version), data=json.dumps(body).encode("utf-8"),
        method="POST", headers={"Content-Type": "application/json"})
    answer = _within_deadline(lambda abandoned: _post(request, timeout, abandoned), timeout,
                              request.full_url)
    if not isinstance(answer, dict):
        raise ServingError(
            f"TF Serving at {request.full_url} answered {type(answer).__name__} JSON, expected "
            "an object {\"predictions\": [...]}.")
    return _check_count(parse_rest_response(answer), len(body["instances"]), request.full_url)


def _grpc_error_message(server, error, timeout):
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    name = getattr(code, "name", "an error")
    if name == "DEADLINE_EXCEEDED":
        return _deadline_message(f"{server} (gRPC)", timeout)
    if name == "UNAVAILABLE":
        return (f"Could not reach TF Serving at {server} (gRPC): {details}. Is the server "
                "running, and is this its gRPC port (8500 by default)?")
    return f"TF Serving at {server} (gRPC) answered {name}: {details}"


def predict_grpc(server, model_name, *, version=None, timeout=30.0, **inputs) -> list[Prediction]:
    """Sends `grpc_request(...)` to `server` (host:port, default gRPC port 8500).

    Args:
        timeout: seconds for the whole call (gRPC's deadline).

    Raises:
        ServingError: as `predict_rest`, naming the server.
    """
    import grpc

    _, prediction_service_pb2_grpc = _require_grpc_api()
    request = grpc_request(model_name, version=version, **inputs)
    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as error:
            raise ServingError(_grpc_error_message(server, error, timeout)) from error
    return _check_count(parse_grpc_response(response), _num_images(**inputs), f"{server} (gRPC)")
