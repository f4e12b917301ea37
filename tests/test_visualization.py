"""keras_vit.analysis and tools/visualize.py: rollout, attention distance, position-embedding
similarity, training curves, and the PNGs.

Truths: hand-computed matrices (identity attention, a 2-token 2-layer example whose answer
depends on the layer order, a 2x2 grid with known distances), a brute-force loop over patch
coordinates, and the values Keras's own TensorBoard callback logged (its History).
"""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_vit
from keras_vit import analysis
from keras_vit.analysis import figures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = keras_vit.ViTConfig(patch_size=8, hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32)


# --- Attention rollout --------------------------------------------------------------------------


def test_rollout_of_identity_attention_is_identity():
    attention = np.broadcast_to(np.eye(5), (2, 4, 3, 5, 5))  # (B, L, H, T, T)
    for residual_weight in (0.0, 0.5):
        np.testing.assert_allclose(analysis.attention_rollout(attention, residual_weight),
                                   np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rollout_by_hand():
    # Layer 1: heads [[1,0],[.5,.5]] and [[0,1],[.5,.5]] -> mean all 0.5;
    #   with the residual: 0.5·0.5 + 0.5·I = [[.75,.25],[.25,.75]].
    # Layer 2: both heads [[1,0],[1,0]] -> [[1,0],[.5,.5]] with the residual.
    # Rollout = Ã2 · Ã1 = [[.75,.25],[.5,.5]]  (Ã1 · Ã2 would be [[.875,.125],[.625,.375]]).
    layer1 = np.array([[[1, 0], [.5, .5]], [[0, 1], [.5, .5]]])
    layer2 = np.array([[[1, 0], [1, 0]], [[1, 0], [1, 0]]])
    attention = np.stack([layer1, layer2])[None]  # (1, 2, 2, 2, 2)
    np.testing.assert_allclose(analysis.attention_rollout(attention)[0], [[.75, .25], [.5, .5]])
    # Without the residual term: the plain product A2 · A1 = [[.5,.5],[.5,.5]].
    np.testing.assert_allclose(analysis.attention_rollout(attention, 0.0)[0], np.full((2, 2), .5))


def test_rollout_map_takes_the_class_token_row():
    rollout = np.zeros((1, 5, 5))
    rollout[0, 0] = [0.2, 0.1, 0.4, 0.2, 0.1]  # class token row; patches of a 2x2 grid follow
    rollout[0, 1:] = 1.0 / 5
    np.testing.assert_allclose(analysis.rollout_map(rollout, (2, 2), 1)[0], [[.25, 1.], [.5, .25]])
    # Without a class token ("gap"), the mean of the rows over a 1x5 grid.
    np.testing.assert_allclose(analysis.rollout_map(rollout, (1, 5), 0)[0],
                               [rollout[0].mean(0) / rollout[0].mean(0).max()])
    with pytest.raises(ValueError, match="does not fit a 3x3 grid"):
        analysis.rollout_map(rollout, (3, 3), 1)


# --- Mean attention distance --------------------------------------------------------------------


def test_identity_attention_has_distance_zero():
    attention = np.broadcast_to(np.eye(1 + 9), (2, 3, 4, 10, 10))
    np.testing.assert_array_equal(analysis.mean_attention_distance(attention, (3, 3), 16), np.zeros((3, 4)))


def test_attention_distance_by_hand():
    # 2x2 grid of 16-pixel patches: neighbours are 16 px apart, diagonals 16·√2.
    uniform = np.full((4, 4), 0.25)                   # every query: 0, 16, 16, 16√2 -> 8 + 4√2
    opposite = np.fliplr(np.eye(4))                   # 0<->3, 1<->2: diagonal, 16√2
    neighbour = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])  # 16
    attention = np.stack([uniform, opposite, neighbour])[None]  # (L=1, H=3, 4, 4)
    distances = analysis.mean_attention_distance(attention, (2, 2), 16, num_prefix_tokens=0)
    np.testing.assert_allclose(distances, [[8 + 4 * math.sqrt(2), 16 * math.sqrt(2), 16]])


def test_class_token_attention_is_renormalized_away():
    # Half of each query's attention goes to the class token, half to the opposite patch.
    attention = np.zeros((1, 1, 5, 5))
    attention[0, 0, :, 0] = 0.5
    attention[0, 0, 1:, 1:] = 0.5 * np.fliplr(np.eye(4))
    attention[0, 0, 0, 1:] = 0.125
    np.testing.assert_allclose(analysis.mean_attention_distance(attention, (2, 2), 16), [[16 * math.sqrt(2)]])


def test_attention_distance_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    grid, patch = (3, 4), 8
    attention = rng.random((2, 2, 3, 13, 13))
    attention /= attention.sum(-1, keepdims=True)
    expected = np.zeros((2, 3))
    for b in range(2):
        for layer in range(2):
            for head in range(3):
                total = 0.0
                for q in range(12):
                    weights = attention[b, layer, head, 1 + q, 1:]
                    weights = weights / weights.sum()
                    qr, qc = divmod(q, 4)
                    total += sum(w * patch * math.hypot(qr - kr, qc - kc)
                                 for w, (kr, kc) in zip(weights, (divmod(k, 4) for k in range(12))))
                expected[layer, head] += total / 12 / 2
    np.testing.assert_allclose(analysis.mean_attention_distance(attention, grid, patch), expected)


def test_attention_of_a_model_rows_sum_to_one():
    model = keras_vit.create_model(TINY, image_size=16, num_classes=3)
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3))
    attention = analysis.attention_maps(model, images)
    assert attention.shape == (2, 3, 2, 5, 5)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    assert analysis.model_geometry(model) == ((2, 2), 8, 1)


# --- Position embeddings ------------------------------------------------------------------------


def test_position_embedding_similarity_by_hand():
    # Class token, then a 1x3 grid: [1,0], [1,1], [0,-2] -> cos 1/√2, 0 and -1/√2.
    embedding = np.array([[[9.0, 9.0], [1, 0], [1, 1], [0, -2]]])
    similarity = analysis.position_embedding_similarity(embedding, (1, 3))
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(similarity.reshape(3, 3), [[1, s, 0], [s, 1, -s], [0, -s, 1]], atol=1e-12)
    with pytest.raises(ValueError, match="does not fit a 2x2 grid"):
        analysis.position_embedding_similarity(embedding, (2, 2))


# --- Training curves ----------------------------------------------------------------------------


def write_scalars(logdir, values):
    """Event files as Keras's TensorBoard callback writes them: float32 tensor summaries with
    the "scalars" plugin (written with core tf.summary.write, which needs no tensorboard)."""
    metadata = tf.compat.v1.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    for run, tags in values.items():
        with tf.summary.create_file_writer(os.path.join(logdir, run)).as_default():
            for tag, points in tags.items():
                for step, value in points:
                    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


def test_read_and_group_curves(tmp_path):
    write_scalars(str(tmp_path), {
        "train": {"epoch_loss": [(0, 2.0), (1, 1.5), (2, 1.2)], "epoch_accuracy": [(0, .3), (1, .5), (2, .6)],
                  "epoch_learning_rate": [(0, 1e-3), (1, 5e-4), (2, 1e-4)], "batch_loss": [(10, 1.9)]},
        "validation": {"epoch_loss": [(0, 2.1), (1, 1.7), (2, 1.4)],
                       "evaluation_loss_vs_iterations": [(10, 2.1)]},
    })
    scalars = analysis.read_scalars(str(tmp_path))
    steps, values = scalars["train"]["epoch_loss"]
    np.testing.assert_array_equal(steps, [0, 1, 2])
    np.testing.assert_allclose(values, [2.0, 1.5, 1.2], rtol=1e-6)
    groups = analysis.group_curves(scalars, "epoch")
    assert list(groups) == ["loss", "accuracy", "learning rate"]
    assert [label for label, _, _ in groups["loss"]] == ["train/loss", "validation/loss"]
    figure = figures.curves_figure(groups)
    assert figures.panel_count(figure) == 3
    step_groups = analysis.group_curves(scalars, "step")
    assert list(step_groups) == ["loss"] and len(step_groups["loss"]) == 2


def test_curves_from_keras_tensorboard_callback(tmp_path):
    pytest.importorskip("tensorboard", reason="Keras's TensorBoard callback needs tensorboard")
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 4)).astype("float32"), rng.integers(0, 3, 32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=8, epochs=3, validation_data=(x, y), verbose=0,
                        callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "logs"))])
    scalars = analysis.read_scalars(str(tmp_path / "logs"))
    np.testing.assert_allclose(scalars["train"]["epoch_loss"][1], history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(scalars["validation"]["epoch_accuracy"][1],
                               history.history["val_accuracy"], rtol=1e-6)
    assert list(analysis.group_curves(scalars)) == ["loss", "accuracy", "learning rate"]


def test_missing_logs_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.read_scalars(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="No TensorBoard event files"):
        analysis.read_scalars(str(tmp_path))


# --- Figures ------------------------------------------------------------------------------------


def assert_png(path, expected_size=None):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        if expected_size:
            assert image.size == expected_size


def test_figures_have_the_expected_panels(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "attention": (figures.attention_figure(rng.uniform(0, 255, (3, 16, 16, 3)), rng.random((3, 2, 2))), 6),
        "posemb": (figures.position_embedding_figure(rng.uniform(-1, 1, (3, 4, 3, 4))), 12),
        "distance": (figures.attention_distance_figure(rng.random((4, 3)) * 50, image_size=64), 1),
        "confusion": (figures.confusion_figure(rng.integers(0, 9, (5, 5))), 1),
    }
    for name, (figure, panels) in cases.items():
        assert figures.panel_count(figure) == panels, name
        path = figures.save(figure, str(tmp_path / "sub" / f"{name}.png"), dpi=50)
        width, height = figure.get_size_inches() * 50
        assert_png(path, (round(width), round(height)))
    with pytest.raises(ValueError, match="must be a .png"):
        figures.save(cases["distance"][0], str(tmp_path / "x.jpg"))


# --- tools/visualize.py -------------------------------------------------------------------------


def run_visualize(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "visualize.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    keras_vit.create_model(TINY, image_size=16, num_classes=3).save(directory / "model.keras")
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(directory / f"img{index}.png")
    write_scalars(str(directory / "logs"), {"train": {"epoch_loss": [(0, 1.0), (1, 0.5)]},
                                            "validation": {"epoch_loss": [(0, 1.1), (1, 0.7)]}})
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("kind, images, panels", [
    ("attention", 2, 4), ("posemb", 0, 4), ("attention_distance", 2, 1), ("curves", 0, 1)])
def test_visualize_tool_writes_each_kind(model_dir, tmp_path, kind, images, panels):
    output = tmp_path / f"{kind}.png"
    paths = [str(model_dir / f"img{i}.png") for i in range(images)]
    result = run_visualize(kind, f"--checkpoint={model_dir}", f"--output={output}", *paths)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({panels} panels)" in result.stdout
    assert_png(output)


def test_visualize_tool_rejects_a_wrong_kind(tmp_path):
    result = run_visualize("saliency", f"--output={tmp_path}/x.png")
    assert result.returncode != 0
    assert "KIND must be one of attention, posemb, attention_distance, curves; got saliency" in result.stderr


def test_visualize_tool_names_a_missing_image(model_dir, tmp_path):
    result = run_visualize("attention", f"--checkpoint={model_dir}", f"--output={tmp_path}/x.png",
                           f"{tmp_path}/missing.jpg")
    assert result.returncode != 0
    assert f"Image file {tmp_path}/missing.jpg does not exist" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_visualize_curves_defaults_to_optimizer_steps(model_dir, tmp_path):
    # A run with --log_every_steps scalars is drawn against its steps by default ...
    logdir = tmp_path / "logs"
    write_scalars(str(logdir), {"train": {"step_loss": [(100, 1.0), (200, 0.5)],
                                          "step_learning_rate": [(100, 1e-3), (200, 5e-4)],
                                          "epoch_loss": [(0, 0.7)]},
                                "validation": {"step_loss": [(200, 0.6)]}})
    result = run_visualize("curves", f"--logdir={logdir}", f"--output={tmp_path}/steps.png")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 panels)" in result.stdout and "against epochs" not in result.stdout
    # ... one logged before them (epoch_* only) falls back to epochs, unless --x_axis is given.
    result = run_visualize("curves", f"--checkpoint={model_dir}", f"--output={tmp_path}/e.png")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "drawing against epochs" in result.stdout and "(1 panels)" in result.stdout
    result = run_visualize("curves", f"--checkpoint={model_dir}", "--x_axis=step",
                           f"--output={tmp_path}/s.png")
    assert result.returncode != 0 and "no loss, accuracy or learning-rate scalars per step" in result.stderr
