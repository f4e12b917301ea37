"""Issue 14, client: keras_vit.serving.client and tools/serving_client.py against misbehaving
servers.

Each server is a real socket on 127.0.0.1 (loopback only), served by a thread this file starts
and stops, that does one wrong thing: it drips a valid answer one byte per 0.5 s, closes the
connection mid-reply, or answers fewer predictions than images. Truths: one total deadline per
request (a dripping server is not waited for past it), and a `ServingError` naming the server,
which the tool prints as one line with exit status 2.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from keras_vit.serving import client

_SERVING_EXTRA = "gRPC needs tensorflow-serving-api, the serving extra: pip install -e '.[serving]'"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_LIFETIME_S = 20.0  # no server thread outlives this, whatever the client does
ONE_PREDICTION = json.dumps({"predictions": [
    {"classes": [1], "scores": [0.5], "labels": ["dog"], "probabilities": [0.5, 0.5]}]}).encode()


def _http_answer(body, status="200 OK", length=None):
    length = len(body) if length is None else length
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode() + body


def _read_request(connection):
    """Reads one HTTP request (headers and Content-Length body) so the client's send ends."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return
        body += chunk


def _drip(connection, stop):
    """A valid one-prediction answer, one byte per 0.5 s (about 100 s in all)."""
    for byte in _http_answer(ONE_PREDICTION):
        if stop.wait(0.5):
            return
        connection.sendall(bytes([byte]))


def _cut_mid_reply(connection, stop):
    """Headers promising the whole body, half of it, then the connection closed."""
    answer = _http_answer(ONE_PREDICTION)
    connection.sendall(answer[: len(answer) - len(ONE_PREDICTION) // 2])


def _close_at_once(connection, stop):
    """No answer at all: the connection is closed after the request is read."""


def _fewer_predictions(connection, stop):
    """One prediction, whatever the number of images sent."""
    connection.sendall(_http_answer(ONE_PREDICTION))


@contextlib.contextmanager
def _server(behaviour):
    """Serves `behaviour(connection, stop)` on 127.0.0.1 in a thread; yields "127.0.0.1:PORT"."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    deadline = time.monotonic() + SERVER_LIFETIME_S

    def serve():
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(SERVER_LIFETIME_S)
                try:
                    _read_request(connection)
                    behaviour(connection, stop)
                except OSError:  # the client gave up and closed its end
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(SERVER_LIFETIME_S)
        listener.close()


def _url(server):
    return f"http://{server}/v1/models/vit:predict"


def test_a_dripping_server_is_cut_off_at_the_total_deadline():
    with _server(_drip) as server:
        start = time.monotonic()
        with pytest.raises(client.ServingError) as error:
            client.predict_rest(server, "vit", timeout=2, image_bytes=[b"abc"])
        elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"the 2 s deadline fired after {elapsed:.1f} s"
    assert f"No complete answer from TF Serving at {_url(server)} within the 2 s" in str(error.value)


@pytest.mark.parametrize("behaviour", [_cut_mid_reply, _close_at_once])
def test_a_dropped_connection_names_the_server(behaviour):
    with _server(behaviour) as server:
        with pytest.raises(client.ServingError) as error:
            client.predict_rest(server, "vit", timeout=10, image_bytes=[b"abc"])
    message = str(error.value)
    assert f"TF Serving at {_url(server)} dropped the connection" in message
    assert "\n" not in message


def test_fewer_predictions_than_images_is_an_error():
    with _server(_fewer_predictions) as server:
        with pytest.raises(client.ServingError) as error:
            client.predict_rest(server, "vit", timeout=10, image_bytes=[b"a", b"b", b"c"])
        assert str(error.value).startswith(
            f"TF Serving at {_url(server)} answered 1 predictions for 3 images sent")
        # The same server answers one image right.
        assert client.predict_rest(server, "vit", timeout=10, image_bytes=[b"a"]) == [
            client.Prediction(["dog"], [0.5], [1])]


def test_an_answer_that_is_not_json_names_the_server():
    def not_json(connection, stop):
        connection.sendall(_http_answer(b"<html>proxy error</html>"))

    with _server(not_json) as server:
        with pytest.raises(client.ServingError, match=f"{_url(server)} answered with something "
                                                      "that is not JSON"):
            client.predict_rest(server, "vit", timeout=10, image_bytes=[b"a"])


class _RpcError(Exception):
    """What a grpc stub raises: an RpcError that is also a Call with code() and details()."""

    def __init__(self, code, details):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, message", [
    ("DEADLINE_EXCEEDED", "No complete answer from TF Serving at localhost:8500 (gRPC) within "
                          "the 2 s deadline"),
    ("UNAVAILABLE", "Could not reach TF Serving at localhost:8500 (gRPC): failed to connect"),
    ("NOT_FOUND", "TF Serving at localhost:8500 (gRPC) answered NOT_FOUND: failed to connect"),
])
def test_grpc_failures_name_the_server(monkeypatch, code, message):
    grpc = pytest.importorskip("grpc", reason=_SERVING_EXTRA)
    pytest.importorskip("tensorflow_serving.apis.predict_pb2", reason=_SERVING_EXTRA)
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    error_type = type("RpcError", (_RpcError, grpc.RpcError), {})
    deadlines = []

    class Stub:
        def __init__(self, channel):
            pass

        def Predict(self, request, timeout):
            deadlines.append(timeout)
            raise error_type(getattr(grpc.StatusCode, code), "failed to connect")

    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub", Stub)
    with pytest.raises(client.ServingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        client.predict_grpc("localhost:8500", "vit", timeout=2, image_bytes=[b"a"])
    assert deadlines == [2]  # gRPC's own deadline: one for the whole call


def test_grpc_fewer_predictions_than_images_is_an_error(monkeypatch):
    predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2", reason=_SERVING_EXTRA)
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Stub:
        def __init__(self, channel):
            pass

        def Predict(self, request, timeout):
            response = predict_pb2.PredictResponse()
            for key, value in (("labels", [[b"cat"]]), ("scores", [[0.5]]), ("classes", [[3]])):
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

    monkeypatch.setattr(prediction_service_pb2_grpc, "PredictionServiceStub", Stub)
    with pytest.raises(client.ServingError, match=r"localhost:8500 \(gRPC\) answered 1 "
                                                  "predictions for 2 images sent"):
        client.predict_grpc("localhost:8500", "vit", image_bytes=[b"a", b"b"])


def _run_tool(*args):
    return subprocess.run([sys.executable, "tools/serving_client.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("behaviour, timeout, message", [
    (_drip, 2, "No complete answer from TF Serving at {url} within the 2 s deadline"),
    (_cut_mid_reply, 10, "TF Serving at {url} dropped the connection"),
    (_fewer_predictions, 10, "TF Serving at {url} answered 1 predictions for 2 images sent"),
])
def test_tool_fails_in_one_line(tmp_path, behaviour, timeout, message):
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        image.write_bytes(b"\x89PNG\r\n\x1a\n")  # sent as is: the server never decodes them
    with _server(behaviour) as server:
        result = _run_tool(f"--server={server}", f"--timeout={timeout}", *map(str, images))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""  # nothing printed for a partial answer
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(url=_url(server)))


@pytest.mark.parametrize("flag, message", [
    ("--timeout=0", "--timeout must be a positive number"),
    ("--model_version=0", "--model_version must be a version number"),
])
def test_tool_refuses_bad_flags(tmp_path, flag, message):
    result = _run_tool(flag, str(tmp_path / "a.png"))
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
