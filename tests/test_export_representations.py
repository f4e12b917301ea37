"""The `features` and `explain` serving signatures, and choosing signatures (`--signatures`).

Truths checked against, on the same images decoded by `pipelines.preprocess_for_eval` (the
signatures' own preprocessing): `keras_vit.feature_extractor` (features); the NumPy rollout of
`keras_vit.analysis` on `analysis.attention_maps` (explain's map), and for its heat map
`scipy.ndimage.zoom(order=1, grid_mode=True, mode="nearest")`, which is bilinear with
half-pixel centres and clamped edges, TensorFlow's `resize`, written independently; explain's
top-k equals predict_pixels' of the same export. Every answer comes from a separate process that
imports TensorFlow alone and feeds each request through a session, as TF Serving does.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

import keras_vit
import pipelines
from keras_vit import analysis, serving
from keras_vit.serving import export as export_module
from serving_helpers import (
    encode_image,
    serve_in_tensorflow_only_process,
    strings,
    tiny_classifier,
)
from vit_reference import random_checkpoint

IMAGE_SIZE = 16
CROP = 0.875
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A class-token model and a gap model (no prefix token: the rollout's mean row)."""
    directory = tmp_path_factory.mktemp("npz")
    gap = str(directory / "gap.npz")
    np.savez(gap, **random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=5, pooling="gap",
                                      seed=2))
    return {"token": tiny_classifier(directory), "gap": keras_vit.from_npz(gap)}


def _export(model, directory, **options):
    return serving.export_classifier(
        model, str(directory), top_k=2, central_crop_fraction=CROP, warmup_batch_sizes=(),
        signatures=serving.ALL_SIGNATURES, **options)


def _images(count=3, seed=0):
    """(PNG bytes, their eval preprocessing float32 (count, S, S, 3)) of random images."""
    rng = np.random.default_rng(seed)
    encoded = [encode_image(rng.integers(0, 256, (20 + 4 * i, 30, 3), dtype=np.uint8), "PNG")
               for i in range(count)]
    pixels = np.stack([pipelines.preprocess_for_eval(tf.constant(data), IMAGE_SIZE, CROP).numpy()
                       for data in encoded])
    return encoded, pixels


@pytest.mark.parametrize("output, block, norm", [("pre_logits", None, False),
                                                 ("spatial", 0, True), ("tokens", -1, False)])
def test_features_equal_feature_extractor(models, tmp_path, output, block, norm):
    model = models["token"]
    exported = _export(model, tmp_path / "exports", feature_options=serving.FeatureOptions(
        output=output, block=block, norm=norm))
    encoded, pixels = _images()
    answers = serve_in_tensorflow_only_process(exported.path, {
        "features:batch": strings(*encoded), "features:empty": strings()}, tmp_path,
        all_outputs=True)
    expected = np.asarray(keras_vit.feature_extractor(
        model, blocks=block, output=output, norm=norm)(pixels), np.float32)
    assert expected.shape == {"pre_logits": (3, 32), "spatial": (3, 4, 4, 32),
                              "tokens": (3, 16, 32)}[output]
    found = np.asarray(answers["features:batch"]["features"], np.float32)
    # atol: float32 rounding of O(1) token values, for the elements near 0.
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(found[0], found[1])  # differing images, differing features
    assert np.asarray(answers["features:empty"]["features"]).shape[0] == 0


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_explain_equals_analysis_rollout_and_predict_pixels(models, tmp_path, pooling):
    model = models[pooling]
    weight = 0.3  # not the default, so that the option must reach the graph
    exported = _export(model, tmp_path / "exports",
                       explain_options=serving.ExplainOptions(residual_weight=weight))
    encoded, pixels = _images()
    answers = serve_in_tensorflow_only_process(exported.path, {
        "explain:batch": strings(*encoded), "predict_pixels:batch": pixels}, tmp_path,
        all_outputs=True)
    explained = answers["explain:batch"]
    assert sorted(explained) == sorted(serving.OUTPUTS + serving.EXPLAIN_OUTPUTS), explained
    grid, _, num_prefix_tokens = analysis.model_geometry(model)
    assert num_prefix_tokens == (pooling == "token")
    expected = analysis.rollout_map(
        analysis.attention_rollout(analysis.attention_maps(model, pixels), weight), grid,
        num_prefix_tokens)
    rollout = np.asarray(explained["attention_rollout"])
    assert rollout.shape == (3, 4, 4)
    np.testing.assert_allclose(rollout, expected, atol=1e-5)
    assert np.allclose(rollout.max(axis=(1, 2)), 1.0) and rollout.min() >= 0.0
    zoomed = np.stack([scipy.ndimage.zoom(m, (IMAGE_SIZE / grid[0], IMAGE_SIZE / grid[1]),
                                          order=1, grid_mode=True, mode="nearest")
                       for m in expected])
    np.testing.assert_allclose(explained["heatmap"], zoomed, atol=1e-5)
    pixels_answer = answers["predict_pixels:batch"]
    np.testing.assert_allclose(explained["probabilities"], pixels_answer["probabilities"],
                               rtol=1e-5, atol=1e-7)
    for name in ("classes", "labels"):
        assert explained[name] == pixels_answer[name]


def test_heatmap_zoom_is_tensorflow_resize():
    """The truth the heat map is checked with is TF's bilinear resize, also for non-square
    grids and sizes that are not multiples (float32 rounding: TF resizes in float32)."""
    rng = np.random.default_rng(0)
    for grid, size in (((4, 4), 16), ((3, 5), 16), ((2, 2), 224), ((4, 4), 10)):
        maps = rng.uniform(size=(2,) + grid)
        resized = tf.image.resize(maps[..., None], [size, size], method="bilinear")[..., 0]
        zoomed = [scipy.ndimage.zoom(m, (size / grid[0], size / grid[1]), order=1,
                                     grid_mode=True, mode="nearest") for m in maps]
        np.testing.assert_allclose(resized.numpy(), np.stack(zoomed), atol=1e-6)


def test_warmup_holds_every_exported_signature(models, tmp_path):
    exported = serving.export_classifier(
        models["token"], str(tmp_path / "exports"), warmup_batch_sizes=(1, 3),
        signatures=["features", "explain"])  # serving_default and predict_pixels added
    assert exported.signatures == ("serving_default", "predict_pixels", "features", "explain")
    assert list(tf.saved_model.load(exported.path).signatures) == list(exported.signatures)
    answers = serve_in_tensorflow_only_process(
        exported.path, {}, tmp_path, warmup_path=os.path.join(exported.path, serving.WARMUP_FILE),
        all_outputs=True)
    assert exported.warmup_requests == 8
    assert [(r["signature"], r["shape"][0]) for r in answers["warmup"]] == [
        (signature, size) for size in (1, 3) for signature in exported.signatures]
    for record in answers["warmup"]:
        assert record["inputs"] == [serving.SIGNATURE_INPUTS[record["signature"]]]
        expected = {"features": ["features"],
                    "explain": sorted(serving.OUTPUTS + serving.EXPLAIN_OUTPUTS)}.get(
            record["signature"], sorted(serving.OUTPUTS))
        assert record["outputs"] == expected, record


@pytest.mark.parametrize("make, message", [
    (lambda: serving.FeatureOptions(output="logits"), "tokens, spatial, pre_logits"),
    (lambda: serving.FeatureOptions(block=0), "takes no block or norm"),
    (lambda: serving.ExplainOptions(residual_weight=1.5), "in [0, 1]"),
    (lambda: serving.checked_signatures(["features", "bogus"]), "'bogus'"),
])
def test_bad_options_are_refused(make, message):
    with pytest.raises(serving.ExportError, match=message.replace("[", r"\[")):
        make()


def test_unknown_signature_names_the_valid_ones():
    with pytest.raises(serving.ExportError) as error:
        serving.checked_signatures(["explain", "bogus"])
    assert all(name in str(error.value) for name in serving.ALL_SIGNATURES)


def test_model_options_are_checked_before_anything_is_written(models, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_write_version", lambda *a, **k: pytest.fail("wrote"))
    with pytest.raises(serving.ExportError, match="block index 5 is out of range"):
        serving.export_classifier(models["token"], str(tmp_path), signatures=["features"],
                                  feature_options=serving.FeatureOptions("tokens", block=5))
    # Registers without a position embedding: analysis.rollout_map cannot place the tokens.
    path = str(tmp_path / "registers.npz")
    np.savez(path, **random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=5, pooling="gap",
                                       num_registers=2, position_embedding_prefix=False))
    with pytest.raises(serving.ExportError, match="prepends 2 token"):
        serving.export_classifier(keras_vit.from_npz(path), str(tmp_path), signatures=["explain"])


def _tool(*flags):
    return subprocess.run([sys.executable, "tools/export.py", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tool_exports_the_signatures_asked_for(models, tmp_path):
    checkpoint = str(tmp_path / "model.keras")
    models["token"].save(checkpoint)
    export_dir = str(tmp_path / "exports")
    result = _tool(f"--checkpoint={checkpoint}", f"--export_dir={export_dir}",
                   "--signatures=explain,features", "--features_output=spatial",
                   "--features_block=0", "--explain_residual_weight=0.2",
                   "--warmup_batch_sizes=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["signatures"] == ["serving_default", "predict_pixels", "features", "explain"]
    assert summary["warmup_requests"] == 4
    loaded = tf.saved_model.load(summary["export_path"])
    assert list(loaded.signatures) == summary["signatures"]
    features = loaded.signatures["features"](image_bytes=tf.constant(_images(1)[0]))
    assert features["features"].shape == (1, 4, 4, 32)


@pytest.mark.slow
def test_tool_refuses_unknown_signatures_and_other_formats(models, tmp_path):
    checkpoint = str(tmp_path / "model.keras")
    models["token"].save(checkpoint)
    result = _tool(f"--checkpoint={checkpoint}", f"--export_dir={tmp_path / 'exports'}",
                   "--signatures=serving_default,bogus")
    assert result.returncode != 0
    assert "bogus" in result.stderr
    assert all(name in result.stderr for name in serving.ALL_SIGNATURES), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "exports")
    result = _tool(f"--checkpoint={checkpoint}", "--format=onnx",
                   f"--output={tmp_path / 'vit.onnx'}", "--signatures=explain")
    assert result.returncode != 0
    assert "--signatures apply to --format=saved_model only" in result.stderr, result.stderr[-2000:]
    # An option of a signature that is not exported would be ignored: refused instead.
    result = _tool(f"--checkpoint={checkpoint}", f"--export_dir={tmp_path / 'exports'}",
                   "--features_output=spatial", "--explain_residual_weight=0.3",
                   "--signatures=serving_default,explain")
    assert result.returncode != 0
    assert ("--features_output set the features signature, which is exported only when "
            "--signatures names it") in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "exports")
