"""Requests to a TensorFlow Serving model exported by `keras_vit.serving.export_classifier`.

Builds (and sends) the two kinds of Predict request TF Serving accepts:

    REST   POST http://HOST:8501/v1/models/NAME[/versions/N]:predict
           {"signature_name": "serving_default", "instances": [{"b64": "<base64 image>"}, ...]}
           {"signature_name": "predict_pixels", "instances": [<H x W x 3 nested lists>, ...]}
           {"signature_name": "predict_tf_example", "instances": [{"b64": "<base64 Example>"}, ...]}
           {"signature_name": "predict_image_tensor", "instances": [<h x w x 3 nested ints>, ...]}
    gRPC   tensorflow.serving.PredictionService/Predict on HOST:8500 with a `PredictRequest`
           (model_spec.name / signature_name / version, inputs["image_bytes"] a DT_STRING
           tensor of shape (batch,), inputs["images"] DT_FLOAT (batch, H, W, 3),
           inputs["tf_examples"] DT_STRING (batch,) or inputs["image_tensor"] DT_UINT8
           (batch, h, w, 3))

(the `explain` signature takes image_bytes as serving_default does) and reads either answer
into one `Prediction` per image, with explain's `attention_rollout` map. predict_tf_example
takes encoded images too: each is sent inside a serialized tf.train.Example (`tf_example`).
predict_image_tensor takes decoded uint8 images; one tensor holds one size, so `predict_rest`
and `predict_grpc` send one request per distinct size (`size_groups`) and put the answers back
in input order. gRPC needs the optional `tensorflow-serving-api` package
(`pip install tensorflow-serving-api`).

`timeout` is one total deadline per call, however many requests it sends: gRPC's own deadline
(what is left of it for each later request), and for REST a worker thread that the caller stops
waiting for (urllib's timeout bounds each socket operation, so a server sending one byte a
second would never time out). Every failure (deadline, refused or dropped connection, an answer
that is not JSON or does not hold one prediction per image) is a `ServingError` naming the
server.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from keras_vit.serving.signatures import (
    EXPLAIN_SIGNATURE,
    IMAGE_TENSOR_SIGNATURE,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    SIGNATURE_INPUTS,
    TF_EXAMPLE_SIGNATURE,
)
from pipelines.errors import MissingExtraError, UserError

# The classifying signatures the client speaks, each with the keyword argument it takes:
# encoded images or pixels in, top-k out (and explain's rollout map). `features` answers no
# top-k: any TF Serving client reads it. The server's input names are SIGNATURE_INPUTS'.
_ARGUMENT_OF_SIGNATURE = {SERVING_SIGNATURE: "image_bytes", PIXELS_SIGNATURE: "images",
                          TF_EXAMPLE_SIGNATURE: "image_bytes", IMAGE_TENSOR_SIGNATURE: "images",
                          EXPLAIN_SIGNATURE: "image_bytes"}
# What each signature's argument holds, for error messages.
_WHAT_IT_TAKES = {
    PIXELS_SIGNATURE: "images (float32 pixels)",
    IMAGE_TENSOR_SIGNATURE: "images (uint8 RGB pixels (batch, height, width, 3))",
    TF_EXAMPLE_SIGNATURE: "image_bytes (encoded images; the client wraps each in a "
                          "tf.train.Example)",
}
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
    """What one request carries: a list of bytes (encoded images; serialized Examples for
    predict_tf_example), float32 (batch, H, W, 3) pixels, or uint8 (batch, h, w, 3) images."""
    if signature_name not in _ARGUMENT_OF_SIGNATURE:
        raise ValueError(
            f"signature_name must be one of {sorted(_ARGUMENT_OF_SIGNATURE)}, got "
            f"{signature_name!r}.")
    expects_bytes = _ARGUMENT_OF_SIGNATURE[signature_name] == "image_bytes"
    given = image_bytes if expects_bytes else images
    other = images if expects_bytes else image_bytes
    if given is None or other is not None:
        takes = _WHAT_IT_TAKES.get(signature_name, "image_bytes (encoded images)")
        raise ValueError(f"{signature_name} takes {takes} and nothing else.")
    if expects_bytes:
        image_bytes = [bytes(data) for data in image_bytes]
        if not image_bytes:
            raise ValueError("No images to send.")
        if signature_name == TF_EXAMPLE_SIGNATURE:
            return [tf_example(data) for data in image_bytes]
        return image_bytes
    if signature_name == IMAGE_TENSOR_SIGNATURE:
        return _one_size_uint8(images)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(
            f"images must be (batch, height, width, 3) pixels, got shape {images.shape}.")
    return images


def _one_size_uint8(images) -> np.ndarray:
    """uint8 (batch, h, w, 3) of `images`, or a ValueError saying what is wrong with them."""
    try:
        images = np.asarray(images)
    except ValueError as error:  # NumPy refuses to stack arrays of different shapes
        raise ValueError(
            f"{IMAGE_TENSOR_SIGNATURE}: one request holds images of one size; predict_rest and "
            "predict_grpc send one request per size (size_groups).") from error
    if images.dtype != np.uint8:
        raise ValueError(
            f"{IMAGE_TENSOR_SIGNATURE} takes uint8 RGB pixels (decoded images, not rescaled), "
            f"got dtype {images.dtype}.")
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images) or not images[0].size:
        raise ValueError(
            f"images must be uint8 (batch, height, width, 3), got shape {images.shape}.")
    return images


def tf_example(image_bytes: bytes) -> bytes:
    """A serialized tf.train.Example holding `image_bytes` under `image/encoded`, the one key
    predict_tf_example parses (that of the training records and TF Model Garden's tf_example
    input); deterministic bytes."""
    import tensorflow as tf

    from pipelines import records

    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))
    example = tf.train.Example(
        features=tf.train.Features(feature={records.IMAGE_ENCODED: feature}))
    return example.SerializeToString(deterministic=True)


def size_groups(images) -> list[tuple[list[int], np.ndarray]]:
    """Images grouped by size, one group per predict_image_tensor request.

    Args:
        images: uint8 (height, width, 3) arrays, sizes free; or one (batch, h, w, 3) array.

    Returns:
        For each distinct (height, width), in order of first appearance: the indices of its
        images in `images`, and uint8 (n, height, width, 3) of them.
    """
    indices_of_size = {}
    for index, image in enumerate(images):
        indices_of_size.setdefault(np.shape(image)[:2], []).append(index)
    return [(indices, _one_size_uint8([images[i] for i in indices]))
            for indices in indices_of_size.values()]


def _request_groups(signature_name, image_bytes=None, images=None):
    """[(indices into the inputs, one request's keyword arguments)]: one request for all
    inputs, but one per image size for predict_image_tensor."""
    if signature_name == IMAGE_TENSOR_SIGNATURE and image_bytes is None and images is not None:
        if not len(images):
            raise ValueError("No images to send.")
        return [(indices, {"images": group}) for indices, group in size_groups(images)]
    count = len(image_bytes if image_bytes is not None else images if images is not None else [])
    return [(list(range(count)), {"image_bytes": image_bytes, "images": images})]


def rest_url(server: str, model_name: str, version: int | None = None) -> str:
    """The Predict URL, e.g. "http://localhost:8501/v1/models/vit/versions/2:predict"."""
    if "://" not in server:
        server = "http://" + server
    path = f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version else "")
    return server.rstrip("/") + path + ":predict"


def rest_request(*, signature_name=SERVING_SIGNATURE, image_bytes=None, images=None) -> dict:
    """The JSON body of a REST Predict request, in TF Serving's row ("instances") format.

    Args:
        signature_name: "serving_default", "explain" or "predict_tf_example" (with
            image_bytes), or "predict_pixels" or "predict_image_tensor" (with images).
        image_bytes: list of encoded images (bytes); sent base64 encoded as {"b64": ...}, the
            REST API's way of carrying binary DT_STRING values; for predict_tf_example each
            inside a serialized tf.train.Example (`tf_example`).
        images: predict_pixels: float (batch, H, W, 3) pixels in [0, 255]; predict_image_tensor:
            uint8 (batch, h, w, 3), one size (`size_groups`); sent as nested lists.
    """
    inputs = _check_inputs(signature_name, image_bytes, images)
    if _ARGUMENT_OF_SIGNATURE[signature_name] == "image_bytes":
        instances = [{"b64": base64.b64encode(data).decode("ascii")} for data in inputs]
    else:
        instances = inputs.tolist()
    return {"signature_name": signature_name, "instances": instances}


def grpc_request(model_name: str, *, signature_name=SERVING_SIGNATURE, image_bytes=None,
                 images=None, version: int | None = None):
    """A `tensorflow.serving.PredictRequest` for the same inputs as `rest_request`, in the
    signature's input (SIGNATURE_INPUTS) as DT_STRING, DT_FLOAT or DT_UINT8."""
    import tensorflow as tf

    predict_pb2, _ = _require_grpc_api()
    inputs = _check_inputs(signature_name, image_bytes, images)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version:
        request.model_spec.version.value = int(version)
    if _ARGUMENT_OF_SIGNATURE[signature_name] == "image_bytes":
        tensor = tf.make_tensor_proto(inputs, dtype=tf.string, shape=[len(inputs)])
    else:
        tensor = tf.make_tensor_proto(inputs, dtype=tf.as_dtype(inputs.dtype), shape=inputs.shape)
    request.inputs[SIGNATURE_INPUTS[signature_name]].CopyFrom(tensor)
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


def _rest_predictions(answer, num_sent, url) -> list[Prediction]:
    if not isinstance(answer, dict):
        raise ServingError(
            f"TF Serving at {url} answered {type(answer).__name__} JSON, expected "
            "an object {\"predictions\": [...]}.")
    return _check_count(parse_rest_response(answer), num_sent, url)


def _in_input_order(groups, answers) -> list[Prediction]:
    """Each request's predictions put back at its images' indices (`_request_groups`)."""
    at_index = {}
    for (indices, _), predictions in zip(groups, answers, strict=True):
        at_index.update(zip(indices, predictions, strict=True))
    return [at_index[index] for index in range(len(at_index))]


def predict_rest(server, model_name, *, version=None, timeout=30.0,
                 signature_name=SERVING_SIGNATURE, **inputs) -> list[Prediction]:
    """Sends `rest_request(signature_name=..., **inputs)` to `server` (host:port, default
    REST port 8501): one request, or for predict_image_tensor one per image size
    (`size_groups`, `images` then any uint8 (h, w, 3) arrays), sent one after another.

    Args:
        timeout: seconds for the whole call, all its requests, from connecting to the last byte.

    Returns:
        One prediction per image, in input order.

    Raises:
        ServingError: the deadline passed, the server could not be reached, dropped the
            connection or answered an error, or an answer does not hold one prediction per
            image; the message names the URL.
    """
    url = rest_url(server, model_name, version)
    groups = _request_groups(signature_name, **inputs)
    bodies = [rest_request(signature_name=signature_name, **group) for _, group in groups]
    requests = [urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                       headers={"Content-Type": "application/json"})
                for body in bodies]

    def send_all(abandoned):
        answers = []
        for request in requests:
            if abandoned.is_set():  # the caller has stopped waiting: send no more
                break
            answers.append(_post(request, timeout, abandoned))
        return answers

    answers = _within_deadline(send_all, timeout, url)
    return _in_input_order(groups, [_rest_predictions(answer, len(body["instances"]), url)
                                    for answer, body in zip(answers, bodies, strict=True)])


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


def predict_grpc(server, model_name, *, version=None, timeout=30.0,
                 signature_name=SERVING_SIGNATURE, **inputs) -> list[Prediction]:
    """Sends `grpc_request(...)` to `server` (host:port, default gRPC port 8500), one request
    or one per image size, as `predict_rest`.

    Args:
        timeout: seconds for the whole call: gRPC's deadline for the first request, what is
            left of it for each later one.

    Raises:
        ServingError: as `predict_rest`, naming the server.
    """
    import grpc

    _, prediction_service_pb2_grpc = _require_grpc_api()
    where = f"{server} (gRPC)"
    groups = _request_groups(signature_name, **inputs)
    requests = [grpc_request(model_name, signature_name=signature_name, version=version, **group)
                for _, group in groups]
    deadline, answers = time.monotonic() + timeout, []
    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for (indices, _), request in zip(groups, requests, strict=True):
            left = deadline - time.monotonic() if answers else timeout
            if left <= 0:
                raise ServingError(_deadline_message(where, timeout))
            try:
                response = stub.Predict(request, timeout=left)
            except grpc.RpcError as error:
                raise ServingError(_grpc_error_message(server, error, timeout)) from error
            answers.append(_check_count(parse_grpc_response(response), len(indices), where))
    return _in_input_order(groups, answers)
