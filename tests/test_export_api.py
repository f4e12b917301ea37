"""keras_vit.serving.export_classifier in process: versions, atomicity, class names, dtypes.

The cross-process contract (TensorFlow alone, saved_model_cli, the tool) is in test_export.py.
"""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_vit
import pipelines
from keras_vit import serving
from keras_vit.serving import export as export_module
from serving_helpers import tiny_classifier

TINY = keras_vit.ViTConfig(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 16x16, 5-class ViT with random (non-zero head) weights."""
    return tiny_classifier(tmp_path_factory.mktemp("npz"))


def _png(height, width, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _keras_probabilities(model, pixels):
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(pixels, training=False)))


def test_next_version_is_one_past_the_highest_integer_directory(tmp_path):
    assert serving.next_version(str(tmp_path / "missing")) == 1
    for name in ("1", "3", "10", "tmp", "7.bak", ".tmp-export-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert serving.existing_versions(str(tmp_path)) == [1, 3, 10]
    assert serving.next_version(str(tmp_path)) == 11


def test_explicit_version_then_next_free(model, tmp_path):
    export_dir = str(tmp_path / "vit")
    exported = serving.export_classifier(model, export_dir, version=5, top_k=2)
    assert exported.path == os.path.join(export_dir, "5") and exported.version == 5
    assert serving.export_classifier(model, export_dir, top_k=2).version == 6
    with pytest.raises(serving.ExportError, match=r"5 already exists.*next free one \(7\)"):
        serving.export_classifier(model, export_dir, version=5)
    with pytest.raises(serving.ExportError, match="positive integer"):
        serving.export_classifier(model, export_dir, version=0)


def test_generic_labels_and_top_k_capped(model, tmp_path):
    exported = serving.export_classifier(model, str(tmp_path), top_k=9)
    assert exported.top_k == 5 and exported.num_classes == 5
    with open(os.path.join(exported.path, "assets", serving.CLASS_NAMES_ASSET)) as stream:
        assert stream.read().splitlines() == ["class_0", "class_1", "class_2", "class_3", "class_4"]
    pixels = np.random.default_rng(2).uniform(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE, 3))
    outputs = tf.saved_model.load(exported.path).signatures[serving.PIXELS_SIGNATURE](
        images=tf.constant(pixels, tf.float32))
    classes = outputs["classes"].numpy()
    # With top_k = K every row is a permutation of the classes, and labels follow the indices.
    assert sorted(classes[0].tolist()) == [0, 1, 2, 3, 4]
    assert outputs["labels"].numpy().astype(str).tolist() == [
        [f"class_{index}" for index in row] for row in classes]


@pytest.mark.parametrize("names, message", [
    (["a", "b"], "2 class names for a model with 5 outputs"),
    (["a", "b", "c\nd", "e", "f"], "on one line"),
    (["a", "", "c", "d", "e"], "non-empty"),
])
def test_bad_class_names_are_refused_before_writing(model, tmp_path, names, message):
    export_dir = tmp_path / "vit"
    with pytest.raises(serving.ExportError, match=message):
        serving.export_classifier(model, str(export_dir), class_names=names)
    assert not export_dir.exists()


def test_failed_export_leaves_no_version_and_no_temporary_directory(model, tmp_path, monkeypatch):
    real_build_archive = export_module.build_archive

    class Crashing:
        def __init__(self, archive):
            self.archive = archive

        def write_out(self, path, **kwargs):
            self.archive.write_out(path, **kwargs)  # a complete SavedModel in the temp dir...
            raise OSError("disk full")  # ...and then the export dies before the rename.

    monkeypatch.setattr(export_module, "build_archive",
                        lambda *args, **kwargs: Crashing(real_build_archive(*args, **kwargs)))
    with pytest.raises(OSError, match="disk full"):
        serving.export_classifier(model, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_guard_catches_variables_saved_twice(model, tmp_path, monkeypatch):
    """Tracking the whole model (the Keras 3.15 default of model.export) doubles the variables."""
    real_build_archive = export_module.build_archive

    def tracking_the_model(model, *args, **kwargs):
        archive = real_build_archive(model, *args, **kwargs)
        archive.track(model)
        return archive

    monkeypatch.setattr(export_module, "build_archive", tracking_the_model)
    with pytest.raises(serving.ExportError, match=r"keras-team/keras#23553"):
        serving.export_classifier(model, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_serving_signature_calls_the_shared_eval_preprocessing(model, tmp_path, monkeypatch):
    calls = []
    real = pipelines.preprocess_for_eval

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines, "preprocess_for_eval", spy)
    serving.export_classifier(model, str(tmp_path), central_crop_fraction=0.5)
    assert calls and all(call == (IMAGE_SIZE, 0.5) for call in calls)


def test_central_crop_matches_the_eval_preprocessing(model, tmp_path):
    exported = serving.export_classifier(model, str(tmp_path), central_crop_fraction=0.5)
    encoded = [_png(40, 24, seed=3), _png(17, 33, seed=4)]
    served = tf.saved_model.load(exported.path).signatures[serving.SERVING_SIGNATURE](
        image_bytes=tf.constant(encoded))["probabilities"].numpy()
    pixels = np.stack([pipelines.preprocess_for_eval(tf.constant(data), IMAGE_SIZE, 0.5)
                       for data in encoded])
    assert np.abs(served - _keras_probabilities(model, pixels)).max() < 1e-5
    whole = np.stack([pipelines.preprocess_for_eval(tf.constant(data), IMAGE_SIZE)
                      for data in encoded])
    assert np.abs(served - _keras_probabilities(model, whole)).max() > 1e-3  # the crop matters


def test_non_square_model_is_refused(tmp_path):
    model = keras_vit.create_model(TINY, image_size=(16, 8), num_classes=3)
    with pytest.raises(serving.ExportError, match=r"square RGB images .* takes \(None, 16, 8, 3\)"):
        serving.export_classifier(model, str(tmp_path))


def test_model_trained_under_mixed_bfloat16_exports_float32_outputs(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 8)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        trained = keras_vit.create_model(TINY, image_size=IMAGE_SIZE, num_classes=3)
        trained.compile(optimizer=keras.optimizers.SGD(0.1),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trained.fit(images, labels, batch_size=4, epochs=1, verbose=0)
        trained.save(tmp_path / "model.keras")
    finally:
        keras.config.set_dtype_policy(previous)
    model, _ = keras_vit.load_classifier(str(tmp_path / "model.keras"))
    assert model.get_layer("encoder").dtype_policy.name == "mixed_bfloat16"
    assert any(np.any(weight.numpy()) for weight in model.get_layer("head").weights)  # trained

    exported = serving.export_classifier(model, str(tmp_path / "export"), top_k=2)
    # Variables stay float32 under a mixed policy: 4 bytes each, stored once.
    assert exported.weight_bytes == 4 * model.count_params()
    assert exported.variables_bytes <= 1.1 * exported.weight_bytes
    loaded = tf.saved_model.load(exported.path)
    for name in (serving.SERVING_SIGNATURE, serving.PIXELS_SIGNATURE):
        specs = loaded.signatures[name].structured_outputs
        assert {key: spec.dtype for key, spec in specs.items()} == {
            "probabilities": tf.float32, "scores": tf.float32, "classes": tf.int32,
            "labels": tf.string}
    outputs = loaded.signatures[serving.PIXELS_SIGNATURE](images=tf.constant(images))
    assert outputs["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(outputs["probabilities"].numpy().sum(-1), 1.0, atol=1e-6)
    # precision="float32" exports the trained weights computing in float32 (a float32 copy of
    # the mixed_bfloat16 model): the float32 model's probabilities, not the bfloat16 ones.
    float32 = serving.precision.float32_model(model)
    assert float32.get_layer("encoder").dtype_policy.name == "float32"
    np.testing.assert_allclose(outputs["probabilities"].numpy(),
                               _keras_probabilities(float32, images), atol=1e-5)


def test_concurrent_export_of_the_same_version_does_not_overwrite(model, tmp_path, monkeypatch):
    real_build_archive = export_module.build_archive
    export_dir = str(tmp_path)

    class Racing:
        """Another exporter publishes version 1 while this one is writing."""

        def __init__(self, archive):
            self.archive = archive

        def write_out(self, path, **kwargs):
            self.archive.write_out(path, **kwargs)
            os.makedirs(os.path.join(export_dir, "1", "variables"))
            with open(os.path.join(export_dir, "1", "saved_model.pb"), "w") as stream:
                stream.write("the other exporter's model")

    monkeypatch.setattr(export_module, "build_archive",
                        lambda *args, **kwargs: Racing(real_build_archive(*args, **kwargs)))
    with pytest.raises(serving.ExportError, match="appeared while exporting"):
        serving.export_classifier(model, export_dir)
    assert sorted(os.listdir(export_dir)) == ["1"]
    with open(os.path.join(export_dir, "1", "saved_model.pb")) as stream:
        assert stream.read() == "the other exporter's model"
