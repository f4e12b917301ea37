"""TF Serving's warmup file: one real request per signature and batch size, replayed at load.

TF Serving runs the records of `<version>/assets.extra/tf_serving_warmup_requests` (a TFRecord
of `tensorflow_serving.apis.prediction_log_pb2.PredictionLog`) before it marks a version
available, so that the graph's first, slow run (kernel selection, memory pools, the oneDNN
primitive caches per shape) happens before the first live request. A record that fails makes
the version fail to load, so every request here is built from an image that the signatures'
own preprocessing accepts (`prediction_logs` decodes each one first).

Each record is a `PredictLog` whose `PredictRequest` names the signature
(`model_spec.signature_name`; the model name is left empty: TF Serving runs warmup records
against the version being loaded, whatever they name) and holds its one input as a TensorProto
(`tf.make_tensor_proto`):

    serving_default       image_bytes   string (batch,)           the encoded images
    predict_pixels        images        float32 (batch, S, S, 3)  their eval preprocessing
    predict_tf_example    tf_examples   string (batch,)           Examples with image/encoded
    predict_image_tensor  image_tensor  uint8 (batch, h, w, 3)    the first image, decoded
    features, explain     image_bytes   string (batch,)           the encoded images

Only the signatures exported get records (`export.checked_signatures`).

A batch of size b holds the images in turn (image i % len(images)); `image_tensor` repeats
the first image, as one tensor has one height and width.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

import pipelines
from keras_vit.serving.signatures import (
    BYTES_INPUT,
    DEFAULT_SIGNATURES,
    EXPLAIN_SIGNATURE,
    FEATURES_SIGNATURE,
    IMAGE_TENSOR_INPUT,
    IMAGE_TENSOR_SIGNATURE,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    TF_EXAMPLE_INPUT,
    TF_EXAMPLE_SIGNATURE,
    WARMUP_FILE,
)
from pipelines import preprocess, records
from pipelines.errors import MissingExtraError

DEFAULT_WARMUP_BATCH_SIZES = (1, 8)
# TF Serving reads at most this many warmup records (kMaxNumRecords, saved_model_warmup_util).
MAX_WARMUP_RECORDS = 1000
# The generated default image: height x width of a small photo, not square (so the resize
# changes the aspect, as for real requests).
_DEFAULT_IMAGE_SHAPE = (240, 320)


def require_prediction_log():
    """`tensorflow_serving.apis.prediction_log_pb2`; a MissingExtraError when not installed."""
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError as error:
        raise MissingExtraError(
            "The TF Serving warmup file needs the tensorflow-serving-api package, which is not "
            "installed: `pip install -e \".[serving]\"` (or `pip install tensorflow-serving-api`, "
            "the same minor version as tensorflow), or export without warmup requests "
            "(warmup_batch_sizes=())."
        ) from error
    return prediction_log_pb2


def default_warmup_image(max_image_pixels: int | None = None) -> bytes:
    """A generated 240 x 320 JPEG (smooth colour gradients with texture), made in-process;
    scaled down, same aspect, to fit a `max_image_pixels` below its 76800 pixels."""
    height, width = _DEFAULT_IMAGE_SHAPE
    if max_image_pixels is not None and height * width > max_image_pixels:
        scale = (max_image_pixels / (height * width)) ** 0.5
        height, width = max(1, int(height * scale)), max(1, int(width * scale))
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * columns / width
    green = 255 * rows / height
    blue = 127.5 + 127.5 * np.sin(rows / 7.0) * np.cos(columns / 11.0)
    pixels = np.stack([red, green, blue], axis=-1).round().astype(np.uint8)
    return tf.io.encode_jpeg(pixels, quality=90).numpy()


def _example(image_bytes: bytes) -> bytes:
    """A serialized tf.train.Example holding `image_bytes` under the record key."""
    feature = {records.IMAGE_ENCODED: tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[image_bytes]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _decoded(images, image_size, central_crop_fraction, max_image_pixels):
    """(uint8 (h, w, 3) of the first image, float32 (n, S, S, 3) of all) as serving decodes them.

    Raises tf.errors.InvalidArgumentError naming `warmup_images[i]` for an image the signatures
    would refuse.
    """
    pixels = [
        pipelines.preprocess_for_eval(
            tf.constant(data), image_size, central_crop_fraction,
            context=f"warmup_images[{index}]", max_image_pixels=max_image_pixels).numpy()
        for index, data in enumerate(images)
    ]
    first = preprocess.decode_rgb(
        tf.constant(images[0]), "warmup_images[0]", max_image_pixels=max_image_pixels).numpy()
    return first, np.stack(pixels)


def _inputs(images, first, pixels, batch_size) -> dict:
    """{signature: (input name, its value for one batch of `batch_size`)}."""
    chosen = [index % len(images) for index in range(batch_size)]
    encoded = np.array([images[i] for i in chosen], object)
    return {
        SERVING_SIGNATURE: (BYTES_INPUT, encoded),
        PIXELS_SIGNATURE: (PIXELS_INPUT, pixels[chosen].astype(np.float32)),
        TF_EXAMPLE_SIGNATURE: (
            TF_EXAMPLE_INPUT, np.array([_example(images[i]) for i in chosen], object)),
        IMAGE_TENSOR_SIGNATURE: (
            IMAGE_TENSOR_INPUT, np.repeat(first[np.newaxis], batch_size, axis=0)),
        FEATURES_SIGNATURE: (BYTES_INPUT, encoded),
        EXPLAIN_SIGNATURE: (BYTES_INPUT, encoded),
    }


def prediction_logs(
    images,
    batch_sizes,
    image_size: int,
    central_crop_fraction: float | None = None,
    max_image_pixels: int | None = None,
    signatures=DEFAULT_SIGNATURES,
) -> list:
    """The warmup records: one `PredictionLog` per signature per batch size.

    Args:
        images: encoded images (bytes), at least one; None: `default_warmup_image`.
        batch_sizes: positive ints, e.g. (1, 8): the batch sizes live requests will have.
        image_size: the model's input side S.
        central_crop_fraction, max_image_pixels: as the export's signatures use them.
        signatures: the exported signatures, in their order.

    Returns:
        [PredictionLog], batch sizes in order, the signatures in `signatures` order within
        each.

    Raises:
        MissingExtraError: tensorflow-serving-api is not installed.
        tf.errors.InvalidArgumentError: an image the signatures would refuse (named
            `warmup_images[i]`).
    """
    prediction_log_pb2 = require_prediction_log()
    from tensorflow_serving.apis import predict_pb2

    images = [default_warmup_image(max_image_pixels)] if images is None else list(images)
    first, pixels = _decoded(images, image_size, central_crop_fraction, max_image_pixels)
    logs = []
    for batch_size in batch_sizes:
        inputs = _inputs(images, first, pixels, batch_size)
        for signature in signatures:
            name, value = inputs[signature]
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def check_batch_sizes(batch_sizes, signatures=DEFAULT_SIGNATURES) -> tuple[int, ...]:
    """`batch_sizes` as a tuple; an ExportError unless positive ints making at most
    MAX_WARMUP_RECORDS records, one per signature of `signatures` each."""
    from keras_vit.serving.export import ExportError  # export imports this module

    batch_sizes = tuple(batch_sizes)
    if any(isinstance(size, bool) or not isinstance(size, int) or size < 1
           for size in batch_sizes):
        raise ExportError(
            f"warmup_batch_sizes must be positive integers (the batch sizes live requests "
            f"have), or () for no warmup file; got {batch_sizes!r}.")
    records = len(batch_sizes) * len(signatures)
    if records > MAX_WARMUP_RECORDS:
        raise ExportError(
            f"{len(batch_sizes)} warmup batch sizes make {records} warmup records; TF Serving "
            f"reads at most {MAX_WARMUP_RECORDS}. Pass at most "
            f"{MAX_WARMUP_RECORDS // len(signatures)} batch sizes.")
    return batch_sizes


def checked_prediction_logs(images, batch_sizes, image_size, central_crop_fraction,
                            max_image_pixels, signatures=DEFAULT_SIGNATURES) -> list:
    """`prediction_logs` after checking its arguments; [] without batch sizes.

    Raises:
        ExportError: a batch size that is not a positive int, too many records, images that
            are not a non-empty list of bytes, or an image the signatures would refuse.
        MissingExtraError: tensorflow-serving-api is not installed.
    """
    from keras_vit.serving.export import ExportError  # export imports this module

    batch_sizes = check_batch_sizes(batch_sizes, signatures)
    if not batch_sizes:
        return []
    if images is not None:
        images = list(images)
        if not images or not all(isinstance(data, bytes) for data in images):
            raise ExportError(
                "warmup_images must be a non-empty list of encoded images (bytes of JPEG, PNG, "
                "GIF or BMP files), or None for a generated one.")
    try:
        return prediction_logs(images, batch_sizes, image_size, central_crop_fraction,
                               max_image_pixels, signatures)
    except tf.errors.InvalidArgumentError as error:
        raise ExportError(
            f"A warmup image is refused by the serving preprocessing ({error.message}); TF "
            "Serving would then refuse to load the version. Pass images serving_default accepts."
        ) from error


def write_warmup_file(saved_model_dir: str, logs) -> str:
    """Writes `logs` (PredictionLogs) as `saved_model_dir/assets.extra/...`; returns its path."""
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path
