"""Shared pieces of the export and serving tests: encoded test images, a tiny classifier, real
sample images, and a TensorFlow-only process that serves requests as TF Serving does."""

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import keras_vit
from vit_reference import random_checkpoint


def encode_image(array, image_format):
    """uint8 (height, width, 3) pixels as the bytes of a JPEG, PNG, GIF (palette) or BMP file."""
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if image_format == "GIF":
        image = image.convert("P")
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def tiny_classifier(directory):
    """A 16x16, 5-class ViT (patch 4, hidden 32, 2 layers) with random, non-zero head weights,
    loaded from an .npz written into `directory`."""
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=5, seed=1)
    path = str(directory / "tiny.npz")
    np.savez(path, **arrays)
    return keras_vit.from_npz(path)


# Runs in a fresh interpreter that cannot import our packages: loads the SavedModel into a
# session and feeds each request through a callable on the SignatureDef's tensor names (C++
# Session::RunCallable, as TF Serving's predict does: no Python shape or dtype checks first).
# It fetches "probabilities" and "classes", or with ALL every output (features, explain's
# maps; strings decoded), and reports each signature's input shape as declared (-1: dynamic).
# With a warmup file path, also replays each of its PredictionLogs the same way (it imports
# tensorflow_serving.apis for the proto, as TF Serving reads it).
_TF_ONLY_SESSION = r"""
import json, sys
sys.modules["keras_vit"] = None
sys.modules["pipelines"] = None
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

saved_model_dir, requests_path, answers_path, warmup_path, fetched = sys.argv[1:]
session = tf.compat.v1.Session(graph=tf.Graph())
with session.graph.as_default():
    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], saved_model_dir)
runners = {}


def run(signature, value):
    definition = meta_graph.signature_def[signature]
    names = sorted(definition.outputs) if fetched == "ALL" else ["probabilities", "classes"]
    if signature not in runners:
        (input_info,) = definition.inputs.values()
        options = config_pb2.CallableOptions(
            feed=[input_info.name], fetch=[definition.outputs[name].name for name in names])
        runners[signature] = session._make_callable_from_options(options)
    try:
        values = runners[signature](value)
    except tf.errors.InvalidArgumentError as error:
        return {"error": error.message, "code": "INVALID_ARGUMENT"}
    return {name: (np.char.decode(v.astype(bytes)) if v.dtype == object else v).tolist()
            for name, v in zip(names, values)}


requests = np.load(requests_path, allow_pickle=True)
answers = {key: run(key.split(":")[0], requests[key]) for key in requests.files}
answers["input_shapes"] = {
    name: [dim.size for dim in next(iter(definition.inputs.values())).tensor_shape.dim]
    for name, definition in meta_graph.signature_def.items() if definition.inputs}
warmup = []
if warmup_path:
    from tensorflow_serving.apis import prediction_log_pb2
    for record in tf.data.TFRecordDataset(warmup_path).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        (value,) = [tf.make_ndarray(proto) for proto in request.inputs.values()]
        answer = run(request.model_spec.signature_name, value)
        warmup.append({"signature": request.model_spec.signature_name,
                       "inputs": list(request.inputs), "shape": list(value.shape),
                       "dtype": str(value.dtype), "outputs": sorted(answer), **answer})
answers["warmup"] = warmup
answers["loaded_our_code"] = [m for m in ("keras_vit", "pipelines") if sys.modules.get(m)]
with open(answers_path, "w") as stream:
    json.dump(answers, stream)
"""


def serve_in_tensorflow_only_process(saved_model_dir, requests, directory, warmup_path="",
                                     all_outputs=False):
    """Answers of a TensorFlow-only process (no keras_vit, no pipelines) to `requests`.

    Args:
        saved_model_dir: the exported version directory.
        requests: {"<signature>:<case>": numpy array fed as the signature's one input}.
        directory: a pathlib.Path for the request and answer files.
        warmup_path: a TF Serving warmup file to replay too ("" for none).
        all_outputs: fetch every output of each signature, not only probabilities and classes.

    Returns:
        {case key: {output name: nested list} or {"error", "code": "INVALID_ARGUMENT"}},
        "input_shapes": {signature: its input's declared shape, -1 where dynamic},
        "warmup": [{"signature", "inputs", "shape", "dtype", "outputs" (the names answered),
        and the answer}] in file order.
    """
    requests_path, answers_path = str(directory / "requests.npz"), str(directory / "answers.json")
    np.savez(requests_path, **requests)
    result = subprocess.run(
        [sys.executable, "-c", _TF_ONLY_SESSION, saved_model_dir, requests_path, answers_path,
         warmup_path, "ALL" if all_outputs else "TOP"],
        capture_output=True, text=True, timeout=600, cwd=str(directory),
        env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]  # -6 would be SIGABRT
    with open(answers_path) as stream:
        answers = json.load(stream)
    assert answers.pop("loaded_our_code") == []
    return answers


def strings(*items):
    """A numpy object array of byte strings, as a string tensor is fed."""
    array = np.empty(len(items), object)
    array[:] = items
    return array


def sample_images(count):
    """The bytes of the first `count` real JPEGs of ../shared/data/imagenet/sample_images,
    or a pytest skip when they are absent."""
    import pytest

    directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "..", "shared", "data", "imagenet", "sample_images")
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if len(names) < count:
        pytest.skip(f"needs {count} real images in {os.path.normpath(directory)}; "
                    f"found {len(names)}")
    images = []
    for name in names[:count]:
        with open(os.path.join(directory, name), "rb") as stream:
            images.append(stream.read())
    return images
