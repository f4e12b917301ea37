"""keras_vit.serving.manifest: the export manifest and the check of an export in its runtime.

Truths: the float32 Keras model's softmax computed here; a SavedModel run in a fresh process
that imports only TensorFlow; a manifest whose reference was tampered with must be refused.
"""

import json

import numpy as np
import pytest

from keras_vit import serving
from keras_vit.serving import manifest
from pipelines.errors import UserError
from serving_helpers import tiny_classifier


def test_probe_images_are_the_digits_in_colour():
    from sklearn.datasets import load_digits

    images = manifest.probe_images(16)
    assert images.shape == (manifest.PROBE_SIZE, 16, 16, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255
    # The red channel is the digit scaled to [0, 255]; blue its negative.
    np.testing.assert_allclose(images[..., 0] + images[..., 2], 255.0)
    zero = load_digits().images[0]
    assert np.corrcoef(images[0, ::2, ::2, 0].ravel(), zero.ravel())[0, 1] > 0.9


def test_softmax_by_hand():
    np.testing.assert_allclose(manifest.softmax([[0.0, np.log(3.0)]]), [[0.25, 0.75]], rtol=1e-6)


def test_folder_sha256_depends_on_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    first = manifest.file_sha256(str(tmp_path / "a"))
    (tmp_path / "a" / "x").write_bytes(b"2")
    assert manifest.file_sha256(str(tmp_path / "a")) != first
    (tmp_path / "a" / "x").write_bytes(b"1")
    assert manifest.file_sha256(str(tmp_path / "a")) == first


def test_a_saved_model_verifies_and_a_tampered_reference_is_refused(tmp_path):
    model = tiny_classifier(tmp_path)
    exported = serving.export_classifier(model, str(tmp_path / "export"))
    images = manifest.probe_images(16)
    record = manifest.build_manifest(
        model, images, source=str(tmp_path / "tiny.npz"), export_format="saved_model",
        precision="float32", preprocessing={"image_size": 16})
    assert record["source_sha256"] == manifest.file_sha256(str(tmp_path / "tiny.npz"))
    result = manifest.verify(exported.path, record)
    assert result["max_abs_difference"] < 1e-5 and result["top1_agreement"] == 1.0
    path = manifest.write_manifest(record, str(tmp_path / manifest.MANIFEST_NAME))
    assert manifest.read_manifest(path)["reference_probabilities"] == json.loads(
        json.dumps(record["reference_probabilities"]))
    tampered = dict(record, reference_probabilities=np.roll(
        np.asarray(record["reference_probabilities"]), 1, axis=-1).tolist())
    with pytest.raises(manifest.VerificationError, match="more than the bound 0.0001"):
        manifest.verify(exported.path, tampered)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="none.json does not exist"):
        manifest.read_manifest(str(tmp_path / "none.json"))
    (tmp_path / "m.json").write_text('{"format": "onnx"}')
    with pytest.raises(UserError, match="m.json is not a keras_vit export manifest"):
        manifest.read_manifest(str(tmp_path / "m.json"))
