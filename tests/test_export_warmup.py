"""assets.extra/tf_serving_warmup_requests: TF Serving's warmup file, written with the export.

Truths checked against: tensorflow-serving-api's own PredictionLog proto (each record parses),
and a separate process that imports TensorFlow alone (and tensorflow_serving's protos, as TF
Serving reads the file) replaying every record through a session on the SignatureDef's tensor
names, as TF Serving's warmup does; serving_default's answer to the same images.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_vit import serving
from keras_vit.serving import export as export_module
from keras_vit.serving import warmup
from pipelines.errors import MissingExtraError
from serving_helpers import (
    sample_images,
    serve_in_tensorflow_only_process,
    strings,
    tiny_classifier,
)

IMAGE_SIZE = 16
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("npz"))


def _records(saved_model_dir):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(saved_model_dir, serving.WARMUP_FILE)
    return [prediction_log_pb2.PredictionLog.FromString(record)
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def _check_replay(exported, images, batch_sizes, tmp_path):
    """Replays the warmup file in the TF-only process; compares with serving_default."""
    requests = {f"serving_default:batch_{size}": strings(*[images[i % len(images)]
                                                           for i in range(size)])
                for size in batch_sizes}
    answers = serve_in_tensorflow_only_process(
        exported.path, requests, tmp_path,
        warmup_path=os.path.join(exported.path, serving.WARMUP_FILE))
    replayed = answers["warmup"]
    assert [(record["signature"], record["shape"][0]) for record in replayed] == [
        (signature, size) for size in batch_sizes for signature in serving.SIGNATURES]
    for record in replayed:
        assert record["inputs"] == [serving.SIGNATURE_INPUTS[record["signature"]]]
        assert "probabilities" in record, record
        assert np.array(record["probabilities"]).shape == (record["shape"][0], NUM_CLASSES)
        expected = np.array(answers[f"serving_default:batch_{record['shape'][0]}"]["probabilities"])
        if record["signature"] == "predict_image_tensor":  # the first image, repeated
            expected = np.repeat(expected[:1], record["shape"][0], axis=0)
        np.testing.assert_allclose(record["probabilities"], expected, rtol=1e-5, atol=1e-7)
    return replayed


@pytest.mark.slow
def test_default_warmup_file_replays_against_every_signature(model, tmp_path):
    exported = serving.export_classifier(model, str(tmp_path / "export"), top_k=2)
    logs = _records(exported.path)
    assert exported.warmup_requests == len(logs) == 2 * len(serving.SIGNATURES)
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        assert log.predict_log.request.model_spec.signature_name in serving.SIGNATURES
    replayed = _check_replay(exported, [warmup.default_warmup_image()], (1, 8), tmp_path)
    dtypes = {record["signature"]: record["dtype"] for record in replayed}
    assert dtypes == {"serving_default": "object", "predict_pixels": "float32",
                      "predict_tf_example": "object", "predict_image_tensor": "uint8"}
    image_tensor = [record for record in replayed if record["signature"] == "predict_image_tensor"]
    assert image_tensor[0]["shape"] == [1, 240, 320, 3]  # the generated photo, not resized


@pytest.mark.slow
def test_warmup_from_real_images_and_chosen_batch_sizes(model, tmp_path):
    images = sample_images(2)
    exported = serving.export_classifier(model, str(tmp_path / "export"), top_k=2,
                                         warmup_batch_sizes=(1, 3), warmup_images=images)
    assert exported.warmup_requests == 2 * len(serving.SIGNATURES)
    _check_replay(exported, images, (1, 3), tmp_path)
    (serving_default_3,) = [
        log for log in _records(exported.path)
        if log.predict_log.request.model_spec.signature_name == "serving_default"
        and tf.make_ndarray(log.predict_log.request.inputs["image_bytes"]).shape == (3,)]
    assert list(tf.make_ndarray(serving_default_3.predict_log.request.inputs["image_bytes"])) == [
        images[0], images[1], images[0]]


def test_no_warmup_batch_sizes_no_file_and_no_serving_api_needed(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    exported = serving.export_classifier(model, str(tmp_path), warmup_batch_sizes=())
    assert exported.warmup_requests == 0
    assert not os.path.exists(os.path.join(exported.path, "assets.extra"))


def test_missing_serving_api_names_the_extra_and_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[serving\]"'):
        serving.export_classifier(model, str(tmp_path / "vit"))
    assert not (tmp_path / "vit").exists()


@pytest.mark.parametrize("options, message", [
    ({"warmup_batch_sizes": (1, 0)}, "positive integers"),
    ({"warmup_batch_sizes": (True,)}, "positive integers"),
    ({"warmup_batch_sizes": (1.5,)}, "positive integers"),
    ({"warmup_batch_sizes": tuple(range(1, 252))}, "reads at most 1000"),
    ({"warmup_images": []}, "non-empty list of encoded images"),
    ({"warmup_images": ["cat.jpg"]}, "non-empty list of encoded images"),
    ({"warmup_images": [b"<html>not an image</html>"]},
     r"(?s)not a decodable image.*warmup_images\[0\].*refuse to load"),
    ({"max_image_pixels": 1000, "warmup_images": [warmup.default_warmup_image()]},
     r"(?s)image too large.*240 x 320.*warmup_images\[0\]"),
])
def test_bad_warmup_options_are_refused_before_writing(model, tmp_path, options, message):
    with pytest.raises(serving.ExportError, match=message):
        serving.export_classifier(model, str(tmp_path / "vit"), **options)
    assert not (tmp_path / "vit").exists()


def test_export_killed_while_writing_warmup_leaves_no_version(model, tmp_path, monkeypatch):
    real_write = warmup.write_warmup_file

    def crashing(saved_model_dir, logs):
        real_write(saved_model_dir, logs[:1])  # a partial file in the temporary directory...
        raise KeyboardInterrupt  # ...and the export is interrupted before the rename

    monkeypatch.setattr(warmup, "write_warmup_file", crashing)
    with pytest.raises(KeyboardInterrupt):
        serving.export_classifier(model, str(tmp_path))
    assert os.listdir(tmp_path) == []
    assert export_module.existing_versions(str(tmp_path)) == []


def test_generated_default_image_is_a_decodable_photo_sized_jpeg():
    data = warmup.default_warmup_image()
    assert data[:3] == b"\xff\xd8\xff"
    pixels = tf.io.decode_jpeg(data).numpy()
    assert pixels.shape == (240, 320, 3) and pixels.std() > 20
    # Deterministic: every export writes the same warmup file.
    assert warmup.default_warmup_image() == data
    # Below a smaller cap on the pixels, a smaller image of the same aspect: the warmup
    # requests must pass serving_default's checks, or TF Serving refuses to load the version.
    assert tf.io.decode_jpeg(warmup.default_warmup_image(500)).shape == (19, 25, 3)


def test_small_pixel_cap_gets_a_fitting_default_warmup_image(model, tmp_path):
    exported = serving.export_classifier(model, str(tmp_path), max_image_pixels=500)
    assert exported.warmup_requests == 8
