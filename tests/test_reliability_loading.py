"""Issue 14, loading: NaN/Inf weights, truncated archives and corrupt class names are refused
with messages that name the file (and the arrays), and tools/predict.py's --json is JSON.

Truths: arrays with NaN and Inf written by hand into a random checkpoint in Google's layout
(tests/vit_reference.py); a real .keras archive cut short; Python's own JSON parser.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import keras_vit
from keras_vit import CheckpointError, load_classifier, read_class_names
from pipelines.errors import MissingFileError, UserError
from vit_reference import random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, grid=2,
            num_classes=3)
QUERY_KERNEL = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


def _poisoned_checkpoint(tmp_path):
    """A checkpoint with 3 NaN in head/kernel and 1 NaN + 2 Inf in a query kernel."""
    arrays = random_checkpoint(**TINY)
    arrays["head/kernel"].flat[[0, 1, 2]] = np.nan
    arrays[QUERY_KERNEL].flat[0] = np.nan
    arrays[QUERY_KERNEL].flat[[1, 2]] = [np.inf, -np.inf]
    path = str(tmp_path / "ViT.npz")
    np.savez(path, **arrays)
    return path


def _tiny_model(num_classes=3):
    config = keras_vit.ViTConfig(patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                 mlp_dim=32)
    return keras_vit.create_model(config, image_size=16, num_classes=num_classes)


def test_non_finite_npz_is_refused_naming_every_array(tmp_path):
    path = _poisoned_checkpoint(tmp_path)
    for load in (keras_vit.from_npz, lambda p: load_classifier(p)[0]):
        with pytest.raises(CheckpointError) as error:
            load(path)
        message = str(error.value)
        assert message.startswith(f"{path}: non-finite values in 2 arrays: ")
        assert f"{QUERY_KERNEL} (1 NaN, 2 Inf)" in message
        assert "head/kernel (3 NaN)" in message and "allow_non_finite=True" in message
        assert isinstance(error.value, UserError)


def test_non_finite_npz_loads_with_the_override(tmp_path):
    path = _poisoned_checkpoint(tmp_path)
    model = keras_vit.from_npz(path, allow_non_finite=True)
    assert np.isnan(model.get_layer("head").kernel.numpy()).sum() == 3
    model, _ = load_classifier(path, allow_non_finite=True)
    assert np.isnan(model.get_layer("head").kernel.numpy()).sum() == 3


def test_a_replaced_head_does_not_count(tmp_path):
    """NaN only in a head that num_classes replaces: nothing non-finite is loaded."""
    arrays = random_checkpoint(**TINY)
    arrays["head/kernel"][:] = np.nan
    path = str(tmp_path / "head.npz")
    np.savez(path, **arrays)
    model = keras_vit.from_npz(path, num_classes=5)
    assert np.isfinite(model.get_layer("head").kernel.numpy()).all()


def test_float64_overflowing_float32_is_refused(tmp_path):
    arrays = {key: value.astype(np.float64) for key, value in random_checkpoint(**TINY).items()}
    arrays["embedding/bias"][0] = 1e300  # inf once cast to the model's float32
    path = str(tmp_path / "big.npz")
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"embedding/bias \(1 Inf\)"):
        keras_vit.from_npz(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_keras_file_and_directory_are_refused(tmp_path, bad):
    model = _tiny_model()
    kernel = model.get_layer("head").kernel
    value = kernel.numpy()
    value.flat[[0, 1]] = bad
    kernel.assign(value)
    model.save(tmp_path / "model.keras")
    kind = "NaN" if np.isnan(bad) else "Inf"
    for path in (str(tmp_path / "model.keras"), str(tmp_path)):
        with pytest.raises(CheckpointError, match=rf"non-finite values in 1 array: "
                                                  rf"head/kernel \(2 {kind}\)") as error:
            load_classifier(path)
        assert str(tmp_path / "model.keras") in str(error.value)
    loaded, _ = load_classifier(str(tmp_path), allow_non_finite=True)
    assert (~np.isfinite(loaded.get_layer("head").kernel.numpy())).sum() == 2


def test_truncated_keras_file_names_the_file(tmp_path):
    _tiny_model().save(tmp_path / "whole.keras")
    data = (tmp_path / "whole.keras").read_bytes()
    for name, cut in (("half.keras", data[: len(data) // 2]), ("tail.keras", data[:-10])):
        (tmp_path / name).write_bytes(cut)
        with pytest.raises(CheckpointError, match="is not a readable .keras archive") as error:
            load_classifier(str(tmp_path / name))
        assert str(tmp_path / name) in str(error.value)
        assert "File not found" not in str(error.value)
    # A model directory whose model.keras is cut short: the file inside is named.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.keras").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=f"{tmp_path}/run/model.keras is not a readable"):
        load_classifier(str(tmp_path / "run"))
    # A zip that is not a Keras model at all.
    np.savez(tmp_path / "arrays.npz", a=np.zeros(2))
    os.replace(tmp_path / "arrays.npz", tmp_path / "arrays.keras")
    with pytest.raises(CheckpointError, match=r"arrays.keras is a zip file but not a .keras"):
        load_classifier(str(tmp_path / "arrays.keras"))


def test_a_keras_file_keras_cannot_rebuild_names_the_file_and_stays_safe(tmp_path):
    """safe_mode stays on: a Lambda layer's Python code is refused, with the file named."""
    import keras

    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(tmp_path / "l.keras")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/l.keras could not be rebuilt as a "
                                              "Keras model: Requested the deserialization of a "
                                              "`Lambda` layer"):
        load_classifier(str(tmp_path / "l.keras"))


def test_a_missing_path_of_no_known_kind_is_a_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match=f"{tmp_path}/run does not exist"):
        load_classifier(str(tmp_path / "run"))
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(UserError, match="weights.h5 is of no checkpoint format keras_vit reads"):
        load_classifier(str(tmp_path / "weights.h5"))


def test_an_image_path_that_is_a_directory_says_so(tmp_path):
    from keras_vit import inference

    with pytest.raises(UserError, match=f"{tmp_path} is a directory; expected an image file"):
        inference.load_images([str(tmp_path)], 16)
    with pytest.raises(ValueError, match="k must be at least 1"):
        inference.top_k_predictions(np.zeros((1, 3)), k=0)


def test_corrupt_keras_file_names_the_file(tmp_path):
    _tiny_model().save(tmp_path / "whole.keras")
    data = bytearray((tmp_path / "whole.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside model.weights.h5: its CRC no longer matches
    (tmp_path / "flipped.keras").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{tmp_path}/flipped.keras is not a readable"):
        load_classifier(str(tmp_path / "flipped.keras"))


def test_corrupt_class_names_name_the_file(tmp_path):
    broken = tmp_path / "class_names.json"
    broken.write_text('["cat", "dog"')
    with pytest.raises(UserError, match=f"{broken} is not valid JSON .* line 1, column 14"):
        read_class_names(str(broken))
    latin1 = tmp_path / "labels.txt"
    latin1.write_bytes("caf\xe9\nthé\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"{latin1} is not UTF-8 text"):
        read_class_names(str(latin1))
    broken.write_bytes(b'["caf\xe9"]')
    with pytest.raises(UserError, match=f"{broken} is not UTF-8 text"):
        read_class_names(str(broken))
    with pytest.raises(MissingFileError, match=f"{tmp_path}/none.txt does not exist"):
        read_class_names(str(tmp_path / "none.txt"))


def test_corrupt_class_names_beside_a_model_name_the_file(tmp_path):
    _tiny_model().save(tmp_path / "model.keras")
    (tmp_path / "class_names.json").write_text("{not json")
    with pytest.raises(UserError, match=f"{tmp_path}/class_names.json is not valid JSON"):
        load_classifier(str(tmp_path))


def _run_predict(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "predict.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_predict_json_is_valid_even_for_nan_outputs(tmp_path):
    """With NaN weights loaded on purpose, --json writes null, never the non-JSON NaN."""
    path = _poisoned_checkpoint(tmp_path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    refused = _run_predict(f"--checkpoint={path}", "--json", str(tmp_path / "x.png"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {path}: non-finite")
    result = _run_predict(f"--checkpoint={path}", "--json", "--allow_non_finite_weights",
                          "--top_k=2", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert "NaN" not in line
    out = json.loads(line)
    assert out["image"] == str(tmp_path / "x.png") and len(out["predictions"]) == 2
    assert [p["probability"] for p in out["predictions"]] == [None, None]
    assert "not finite" in result.stderr


def test_predict_top_k_must_be_positive(tmp_path):
    result = _run_predict(f"--checkpoint={tmp_path}/m.keras", "--top_k=0", "x.png")
    assert result.returncode == 1, result.stderr[-2000:]  # absl's flag error, not a crash
    assert "--top_k" in result.stderr and "at least 1" in result.stderr
    assert "Traceback" not in result.stderr
