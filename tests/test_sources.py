"""keras_vit.from_checkpoint: which reader a source needs, told from the files' contents."""

import os
import zipfile

import numpy as np
import pytest

import keras_vit
from keras_vit import CheckpointError, MissingFileError
from vit_reference import forward, random_checkpoint, random_images, relative_error

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


def _images(size=16):
    return random_images(2, size, 3)


def test_a_google_npz_under_any_name_loads_as_from_npz_does(tmp_path):
    arrays = random_checkpoint(**TINY)
    path = tmp_path / "weights.bin.renamed"  # the content decides, not the name
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    model = keras_vit.from_checkpoint(str(path))
    assert relative_error(model.predict(_images(), verbose=0), forward(arrays, _images())) < 1e-5
    resized = keras_vit.from_checkpoint(str(path), image_size=24, num_classes=3,
                                        dropout_rate=0.1)
    np.testing.assert_array_equal(resized.predict(_images(24), verbose=0), np.zeros((2, 3)))


def test_save_npz_of_every_option_round_trips_through_from_checkpoint(tmp_path):
    """The options the arrays cannot say travel in the npz's keras_vit/options entry."""
    arrays = random_checkpoint(**TINY, pooling="gap", class_token=True, num_registers=2,
                               layer_scale=True, norm_after_pooling=True,
                               position_embedding_prefix=False)
    options = dict(pooling="gap", position_embedding_prefix=False, approximate_gelu=False,
                   layer_norm_epsilon=1e-12, input_mean=(0.485, 0.456, 0.406),
                   input_std=(0.229, 0.224, 0.225), eval_crop_fraction=0.9)
    model = keras_vit.checkpoints.build_model(arrays, "arrays", options=options)
    path = keras_vit.save_npz(model, str(tmp_path / "all.npz"))
    for load in (keras_vit.from_checkpoint, keras_vit.from_npz):
        loaded = load(path)
        assert keras_vit.model.model_options(loaded) == keras_vit.model.model_options(model)
        np.testing.assert_array_equal(loaded.predict(_images(), verbose=0),
                                      model.predict(_images(), verbose=0))
    reference = {k: v for k, v in options.items() if k != "eval_crop_fraction"}
    assert relative_error(model.predict(_images(), verbose=0),
                          forward(arrays, _images(), **reference)) < 1e-5
    # A model of Google's options writes Google's keys and nothing else.
    google = keras_vit.save_npz(keras_vit.create_model("d32_l2_h4_m64_p4", image_size=16),
                                str(tmp_path / "google.npz"))
    assert keras_vit.checkpoints.OPTIONS_KEY not in np.load(google).files


def test_pickles_are_refused_with_the_conversion(tmp_path):
    pickled = tmp_path / "pytorch_model.bin"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 32)  # protocol-4 pickle header
    with pytest.raises(CheckpointError, match="PyTorch pickle.*safetensors"):
        keras_vit.from_checkpoint(str(pickled))
    zipped = tmp_path / "model.pth"  # torch's zip format: a zip holding data.pkl
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02.")
    with pytest.raises(CheckpointError, match="never opens"):
        keras_vit.from_checkpoint(str(zipped))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "vit"}')
    os.replace(pickled, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="PyTorch pickle"):
        keras_vit.from_checkpoint(str(folder))


def test_unknown_sources_say_what_was_expected(tmp_path):
    with pytest.raises(MissingFileError, match=f"Checkpoint file {tmp_path}/augreg_B16 does "):
        keras_vit.from_checkpoint(str(tmp_path / "augreg_B16"))
    with pytest.raises(MissingFileError, match="augreg_B16 is neither a file, a folder, nor a "
                                               "registry name: 'augreg_B16' is not"):
        keras_vit.from_checkpoint("augreg_B16")
    with pytest.raises(MissingFileError, match="Close matches: augreg_B/16_i21k"):
        keras_vit.from_checkpoint("augreg_B/16_i21")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt is of no checkpoint format"):
        keras_vit.from_checkpoint(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty is a folder of no checkpoint layout"):
        keras_vit.from_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(TypeError, match="unexpected arguments \\['pooling'\\]"):
        keras_vit.from_checkpoint(str(tmp_path / "notes.txt"), pooling="gap")


def test_create_model_with_weights_checks_the_variant(tmp_path):
    arrays = random_checkpoint(**TINY)
    path = str(tmp_path / "tiny.npz")
    np.savez(path, **arrays)
    model = keras_vit.create_model("d32_l2_h4_m64_p4", weights=path)  # the checkpoint's size, head
    assert model.input_shape == (None, 16, 16, 3) and model.output_shape == (None, 7)
    assert relative_error(model.predict(_images(), verbose=0), forward(arrays, _images())) < 1e-5
    tuned = keras_vit.create_model("d32_l2_h4_m64_p4", weights=path, image_size=24,
                                   num_classes=3, dropout_rate=0.3)
    assert tuned.get_layer("encoder").dropout_rate == 0.3
    assert tuned.input_shape == (None, 24, 24, 3) and tuned.output_shape == (None, 3)
    with pytest.raises(TypeError, match=r"drop \['layer_scale', 'pooling'\]"):
        keras_vit.create_model("d32_l2_h4_m64_p4", weights=path, pooling="gap", layer_scale=1.0)
    with pytest.raises(ValueError, match="is a d32_l2_h4_m64_p4 model .* not the variant b16"):
        keras_vit.create_model("B/16", weights=path, image_size=16, num_classes=7)


def test_load_classifier_opens_every_checkpoint_and_keeps_its_class_names(tmp_path):
    """A checkpoint's own class names (Hugging Face's id2label) reach the tools."""
    import huggingface_layout

    arrays = random_checkpoint(**TINY)
    folder = str(tmp_path / "hf")
    huggingface_layout.write_folder(folder, arrays, num_heads=4,
                                    id2label=[f"kind {i}" for i in range(7)])
    model, class_names = keras_vit.load_classifier(folder)
    assert class_names == [f"kind {i}" for i in range(7)]
    _, renamed = keras_vit.load_classifier(folder, num_classes=3)
    assert renamed is None  # a new head: the checkpoint's names no longer apply


def test_train_starts_from_any_checkpoint_layout_or_a_registry_name(tmp_path):
    """--model=checkpoint:PATH (a timm folder here) and --model=pretrained:NAME."""
    from keras_vit.training import ConfigError, TrainConfig, validate
    from keras_vit.training.engine import build_model
    from tests.train_helpers import TINY_FLAGS

    arrays = random_checkpoint(**TINY, num_registers=2, layer_scale=True,
                               position_embedding_prefix=False)
    source = keras_vit.checkpoints.build_model(
        arrays, "arrays", options=dict(position_embedding_prefix=False, approximate_gelu=False))
    folder = keras_vit.save_timm(source, str(tmp_path / "timm"))
    base = TINY_FLAGS | dict(train_data="data", model_dir=str(tmp_path / "run"), pooling="token")
    config = TrainConfig(**(base | dict(model=f"checkpoint:{folder}", image_size=24)))
    validate(config)
    model = build_model(config, num_classes=3)
    assert model.get_layer("register_tokens").num_tokens == 2
    assert model.input_shape == (None, 24, 24, 3)  # the position grid resampled
    np.testing.assert_array_equal(model.get_layer("head").kernel.numpy(), np.zeros((32, 3)))
    np.testing.assert_array_equal(
        model.get_layer("encoder").blocks[1].mlp_scale.scale.numpy(),
        arrays["Transformer/encoderblock_1/LayerScale_1/scale"])
    validate(TrainConfig(**(base | dict(model="pretrained:augreg_B/16_i21k", image_size=224))))
    with pytest.raises(ConfigError, match="--model='pretrained:augreg_B/16_21k'.*Close matches"):
        validate(TrainConfig(**(base | dict(model="pretrained:augreg_B/16_21k"))))
