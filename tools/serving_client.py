r"""Sends image files to a TensorFlow Serving model exported by tools/export.py; prints top-k labels.

    python tools/serving_client.py --server=localhost:8501 cat.jpg dog.png
    python tools/serving_client.py --protocol=grpc --server=localhost:8500 --model_name=vit cat.jpg
    python tools/serving_client.py --signature=predict_pixels --image_size=224 cat.jpg
    python tools/serving_client.py --signature=explain cat.jpg     # + the attention rollout

With --signature=predict_pixels the files are decoded and resized here, by the same
`pipelines.preprocess_for_eval` the server's serving_default runs. gRPC needs
`pip install tensorflow-serving-api`. One JSON line per file (a score that is not finite is
null). --timeout bounds each whole request. A server that cannot be reached, times out, drops
the connection or does not answer one prediction per file stops the command with one line
(`error: ...`, exit status 2) and nothing printed.
"""

import os
import pathlib

from absl import app, flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import keras_vit
from keras_vit.serving import client
from keras_vit import cli

_SERVER = flags.DEFINE_string(
    "server", None, "host:port of TF Serving. Default: localhost:8501 (REST) / localhost:8500 (gRPC).")
_PROTOCOL = flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "Request protocol.")
_MODEL_NAME = flags.DEFINE_string("model_name", "vit", "Model name in TF Serving's config.")
_MODEL_VERSION = flags.DEFINE_integer("model_version", None, "Version; default: the latest.")
_SIGNATURE = flags.DEFINE_enum(
    "signature", client.SERVING_SIGNATURE,
    [client.SERVING_SIGNATURE, client.PIXELS_SIGNATURE, client.EXPLAIN_SIGNATURE],
    "serving_default sends the encoded files; predict_pixels sends decoded float pixels; "
    "explain (an export with --signatures=...,explain) sends the files and also prints each "
    "one's attention rollout over the patch grid.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "predict_pixels only: the model's input size.")
_CENTRAL_CROP_FRACTION = flags.DEFINE_float(
    "central_crop_fraction", None, "predict_pixels only: the export's central crop, if any.")
_TIMEOUT = flags.DEFINE_float(
    "timeout", 30.0, "Seconds for each whole request, from connecting to the last byte.")
flags.register_validator("timeout", lambda value: value > 0,
                         message="--timeout must be a positive number of seconds.")
flags.register_validator("model_version", lambda value: value is None or value >= 1,
                         message="--model_version must be a version number, 1 or more.")
flags.register_validator("image_size", lambda value: value is None or value >= 1,
                         message="--image_size must be a positive number of pixels.")


def _pixels(paths):
    from keras_vit import inference

    return inference.load_images(paths, _IMAGE_SIZE.value, _CENTRAL_CROP_FRACTION.value)


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give one or more image files to classify.")
    for path in paths:
        if not os.path.isfile(path):
            raise keras_vit.MissingFileError(f"{path} is not a file.")
    if _SIGNATURE.value == client.PIXELS_SIGNATURE:
        if not _IMAGE_SIZE.value:
            raise app.UsageError("--signature=predict_pixels needs --image_size (the model's input).")
        inputs = {"images": _pixels(paths)}
    else:
        inputs = {"image_bytes": [pathlib.Path(path).read_bytes() for path in paths]}
    grpc = _PROTOCOL.value == "grpc"
    server = _SERVER.value or ("localhost:8500" if grpc else "localhost:8501")
    predict = client.predict_grpc if grpc else client.predict_rest
    predictions = predict(server, _MODEL_NAME.value, version=_MODEL_VERSION.value,
                          timeout=_TIMEOUT.value, signature_name=_SIGNATURE.value, **inputs)
    # predict_* raise a ServingError unless there is one prediction per file.
    for path, prediction in zip(paths, predictions, strict=True):
        print(client.json_line(path, prediction))


def run():
    """Console script `keras-vit-serving-client`."""
    cli.run(main)


if __name__ == "__main__":
    run()
