r"""Sends image files to a TensorFlow Serving model exported by tools/export.py; prints top-k labels.

    python tools/serving_client.py --server=localhost:8501 cat.jpg dog.png
    python tools/serving_client.py --protocol=grpc --server=localhost:8500 --model_name=vit cat.jpg
    python tools/serving_client.py --signature=predict_pixels --image_size=224 cat.jpg
    python tools/serving_client.py --signature=explain cat.jpg     # + the attention rollout
    python tools/serving_client.py --signature=predict_tf_example cat.jpg
    python tools/serving_client.py --signature=predict_image_tensor cat.jpg dog.png

With --signature=predict_pixels the files are decoded and resized here, by the same
`pipelines.preprocess_for_eval` the server's serving_default runs. With predict_tf_example each
file is sent inside a tf.train.Example (`image/encoded`). With predict_image_tensor the files are
decoded here to uint8 RGB at their own size (grayscale replicated, alpha dropped, as the eval
pipeline decodes), the server crops and resizes; one request per distinct size. gRPC needs
`pip install tensorflow-serving-api`. One JSON line per file (a score that is not finite is
null). --timeout bounds each whole request. A server that cannot be reached, times out, drops
the connection or does not answer one prediction per file stops the command with one line
(`error: ...`, exit status 2) and nothing printed.
"""

import os
import pathlib
import re

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
    [client.SERVING_SIGNATURE, client.PIXELS_SIGNATURE, client.TF_EXAMPLE_SIGNATURE,
     client.IMAGE_TENSOR_SIGNATURE, client.EXPLAIN_SIGNATURE],
    "serving_default sends the encoded files; predict_pixels sends decoded float pixels; "
    "predict_tf_example sends each file inside a tf.train.Example; predict_image_tensor sends "
    "the decoded uint8 images at their own sizes, one request per size; explain (an export "
    "with --signatures=...,explain) sends the files and also prints each one's attention "
    "rollout over the patch grid.")
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


def _image_tensors(paths):
    """uint8 (height, width, 3) of each file, decoded by the eval pipeline's own decoder, not
    cropped or resized: predict_image_tensor does both in the graph."""
    import tensorflow as tf

    from pipelines import preprocess

    images = []
    for path in paths:
        data = pathlib.Path(path).read_bytes()
        image_format = preprocess.sniff_format(data)
        if image_format is None:
            raise keras_vit.UserError(
                f"{path} is not a decodable image: expected JPEG, PNG, GIF or BMP bytes, found "
                f"{data[:8]!r}...")
        try:
            images.append(preprocess.decode_rgb(tf.constant(data), context=path).numpy())
        except tf.errors.InvalidArgumentError as error:
            # The decoder's own first line, without TensorFlow's "{{function_node ...}}".
            reason = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", error.message.splitlines()[0]).strip()
            raise keras_vit.UserError(
                f"{path} starts like a {image_format.upper()} file but could not be decoded (is "
                f"it truncated or corrupt?): {reason[:200]}") from None
    return images


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
    elif _SIGNATURE.value == client.IMAGE_TENSOR_SIGNATURE:
        inputs = {"images": _image_tensors(paths)}
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
