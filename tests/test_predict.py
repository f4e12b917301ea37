"""keras_vit.inference, keras_vit.class_names and tools/predict.py.

Truths: softmax computed by hand; the Keras ImageNet class index in shared/data; a tiny ViT
whose zero head kernel makes its logits equal its bias, so the top-5 is the bias's order.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import keras_vit
from keras_vit import class_names, inference
from conftest import shared_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_k_predictions_by_hand():
    logits = np.array([[0.0, math.log(3.0), math.log(2.0)], [1.0, 1.0, 1.0]])
    indices, probabilities = inference.top_k_predictions(logits, k=2)
    # exp: 1, 3, 2 -> probabilities 1/6, 3/6, 2/6; equal logits go in index order.
    np.testing.assert_array_equal(indices, [[1, 2], [0, 1]])
    np.testing.assert_allclose(probabilities, [[0.5, 1 / 3], [1 / 3, 1 / 3]])
    assert inference.top_k_predictions(logits, k=10)[0].shape == (2, 3)


def test_imagenet_class_names_match_the_keras_index():
    names = class_names.imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    index = json.loads(shared_data("imagenet", "imagenet_class_index.json").read_text())
    assert names == [index[str(i)][1].replace("_", " ") for i in range(1000)]


def test_resolve_class_names():
    assert class_names.resolve_class_names(3) == ["class_0", "class_1", "class_2"]
    assert class_names.resolve_class_names(1000)[1] == "goldfish"
    assert class_names.resolve_class_names(2, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="3 class names for a model with 2 outputs"):
        class_names.resolve_class_names(2, ["a", "b", "c"])


def test_load_images_uses_the_eval_preprocessing(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "gray.png")
    images = inference.load_images([str(tmp_path / "a.png"), str(tmp_path / "gray.png")], 16)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images[0], pixels)  # same size: the resize changes nothing
    np.testing.assert_array_equal(images[1], np.repeat(pixels[:, :, :1], 3, axis=2))


def test_load_images_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Image file {tmp_path}/none.jpg does not exist"):
        inference.load_images([str(tmp_path / "none.jpg")], 16)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"{tmp_path}/notes.txt is not a decodable image") as bad:
        inference.load_images([str(tmp_path / "notes.txt")], 16)
    assert "b'hello'" in str(bad.value) and "tf.Tensor" not in str(bad.value)
    # A real PNG cut short: its format is named, with the decoder's reason.
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{tmp_path}/cut.png starts like a PNG file") as cut:
        inference.load_images([str(tmp_path / "cut.png")], 16)
    assert "could not be decoded" in str(cut.value) and "function_node" not in str(cut.value)


def run_predict(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "predict.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def zero_head_model(num_classes, bias):
    config = keras_vit.ViTConfig(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    model = keras_vit.create_model(config, image_size=16, num_classes=num_classes)
    head = model.get_layer("head")
    head.set_weights([np.zeros_like(head.get_weights()[0]), np.asarray(bias, np.float32)])
    return model


@pytest.mark.slow
def test_predict_tool_lists_the_top_5_of_a_known_model(tmp_path):
    bias = np.array([0.0, 2.0, -1.0, 1.0, 0.5, 3.0, -2.0])
    zero_head_model(7, bias).save(tmp_path / "model.keras")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"name{i}" for i in range(7)))
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "x.png")
    result = run_predict(f"--checkpoint={tmp_path / 'model.keras'}", f"--labels={labels}", "--json",
                         str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected_order = [5, 1, 3, 4, 0]
    softmax = np.exp(bias) / np.exp(bias).sum()
    assert [p["index"] for p in out["predictions"]] == expected_order
    assert [p["class"] for p in out["predictions"]] == [f"name{i}" for i in expected_order]
    np.testing.assert_allclose([p["probability"] for p in out["predictions"]],
                               softmax[expected_order], rtol=1e-5)


@pytest.mark.slow
def test_predict_tool_names_imagenet_classes_for_1000_outputs(tmp_path):
    bias = np.zeros(1000)
    bias[[1, 207, 999]] = [5.0, 4.0, 3.0]
    zero_head_model(1000, bias).save(tmp_path / "in1k.keras")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    result = run_predict(f"--checkpoint={tmp_path / 'in1k.keras'}", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-5].strip().endswith("goldfish (1)")
    assert lines[-4].strip().endswith("golden retriever (207)")
    assert lines[-3].strip().endswith("toilet tissue (999)")


def test_predict_tool_without_images_is_a_usage_error(tmp_path):
    result = run_predict(f"--checkpoint={tmp_path}/m.keras")
    assert result.returncode != 0
    assert "Give one or more image files" in result.stderr


def test_the_checkpoints_eval_crop_is_what_predict_uses(tmp_path):
    """A timm checkpoint's crop_pct travels with the model (`eval_crop_fraction`), and
    tools/predict.py crops with it unless --central_crop_fraction says otherwise. Truth: the
    model run by hand on images cropped by `load_images`."""
    from vit_reference import random_checkpoint

    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4)
    model = keras_vit.checkpoints.build_model(arrays, "tiny", options=dict(eval_crop_fraction=0.5))
    assert inference.eval_crop_fraction(model) == 0.5
    assert inference.eval_crop_fraction(model, 0.875) == 0.875
    model.save(tmp_path / "model.keras")
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = np.random.default_rng(1).integers(0, 255, (16, 16, 3))
    Image.fromarray(pixels).save(tmp_path / "centre.png")

    def predicted(*flags):
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "predict.py"),
             f"--checkpoint={tmp_path / 'model.keras'}", "--json", "--top_k=7", *flags,
             str(tmp_path / "centre.png")], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        ranked = json.loads(result.stdout)["predictions"]
        return np.array([p["probability"] for p in sorted(ranked, key=lambda p: p["index"])])

    def by_hand(fraction):
        images = inference.load_images([str(tmp_path / "centre.png")], 16, fraction)
        logits = model.predict(images, verbose=0)[0]
        return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    np.testing.assert_allclose(predicted(), by_hand(0.5), rtol=1e-4)
    np.testing.assert_allclose(predicted("--central_crop_fraction=1.0"), by_hand(1.0), rtol=1e-4)
    assert not np.allclose(by_hand(0.5), by_hand(1.0), rtol=1e-3)
