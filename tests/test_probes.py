"""Few-shot and linear probes from the tools: tools/train.py --fewshot_every_steps writes them to
TensorBoard, tools/evaluate.py --fewshot_* prints them and writes them into --output; and the
tools take a dynamic-size model at any multiple of its patch.

The probes' arithmetic is tested against NumPy in test_fewshot.py; here the truths are chance
(10 digit classes: 0.1, so the trained model's 10-shot accuracy must clear it by a margin), the
agreement of the training-time probe with the evaluate tool's on the saved model, and the
shapes and flags the tools promise.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit import fewshot, probes
from keras_vit.analysis import curves
from keras_vit.training import ConfigError, validate
from tests.train_helpers import (REPO, TINY_FLAGS, convert_digits, flip_byte, run_train,
                                 subprocess_env, tiny_config)

EVALUATE = str(REPO / "tools" / "evaluate.py")
PREDICT = str(REPO / "tools" / "predict.py")
CHANCE = 0.1  # 10 digit classes, about equally many test images each
# A 2-layer ViT trained for 300 steps on digits (eval top-1 0.65) gives pooled features on which
# 10 shots per class reach 0.64 (this machine, 2026-12-01): far above chance, with room for
# another machine's rounding.
TRAINED_MARGIN = 0.3


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return convert_digits(tmp_path_factory.mktemp("digits"))


def run_tool(tool, *args, timeout=300):
    return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=REPO)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A tiny digits model trained for 300 updates with a few-shot probe every 100."""
    model_dir = tmp_path_factory.mktemp("run")
    result = run_train(**(TINY_FLAGS | dict(
        train_data=digits, eval_data=digits, model_dir=str(model_dir), total_steps=300,
        checkpoint_every_steps=100, eval_every_steps=100, fewshot_every_steps=100,
        fewshot_shots="1,10", fewshot_seeds=2)))
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


@pytest.mark.slow
def test_training_logs_fewshot_accuracy_at_each_probe_step(trained):
    scalars = curves.read_scalars(str(trained / "logs"))["fewshot"]
    assert set(scalars) == {"fewshot_1shot", "fewshot_10shot"}
    for steps, values in scalars.values():
        assert list(steps) == [100, 200, 300]
        assert np.all((values >= 0) & (values <= 1))
    assert scalars["fewshot_10shot"][1][-1] > CHANCE + TRAINED_MARGIN


@pytest.mark.slow
def test_evaluate_reports_fewshot_and_linear_probe_of_the_saved_model(trained, digits, tmp_path):
    output = tmp_path / "probe.json"
    result = run_tool(EVALUATE, f"--checkpoint={trained}", f"--fewshot_train={digits}",
                      "--fewshot_shots=1,10", "--fewshot_seeds=2", "--linear_probe",
                      f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert "top1" not in report  # probes only: no --data
    assert set(report["fewshot"]) == {"1", "10"}
    assert [len(v) for v in report["fewshot_per_seed"].values()] == [2, 2]
    assert report["fewshot_data"]["num_train"] == 1438  # every digits training image
    assert report["fewshot_data"]["num_test"] == 359
    assert report["fewshot"]["10"] > CHANCE + TRAINED_MARGIN
    assert report["linear_probe"] > CHANCE + TRAINED_MARGIN
    assert "10-shot" in result.stdout and "linear probe" in result.stdout
    # The training-time probe of the last step read the weights model.keras holds.
    logged = curves.read_scalars(str(trained / "logs"))["fewshot"]["fewshot_10shot"][1][-1]
    assert report["fewshot"]["10"] == pytest.approx(logged, abs=2 / 359)


@pytest.mark.slow
def test_evaluate_adds_probes_to_a_classification_report(trained, digits, tmp_path):
    output = tmp_path / "eval.json"
    result = run_tool(EVALUATE, f"--checkpoint={trained}", f"--data={digits}",
                      f"--fewshot_train={digits}", "--fewshot_shots=5", "--fewshot_seeds=1",
                      "--fewshot_train_examples=500", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["num_examples"] == 359 and "top1" in report
    assert report["fewshot_data"]["num_train"] == 500
    assert report["fewshot_data"]["test"] == digits  # --fewshot_train, when no --fewshot_test


@pytest.mark.slow
def test_a_corrupt_probe_record_is_named_and_the_evaluation_kept(trained, digits, tmp_path):
    broken = Path(shutil.copytree(digits, tmp_path / "broken"))
    flip_byte(broken / "test-00000-of-00001.tfrecord", 5, "payload")
    output = tmp_path / "eval.json"
    result = run_tool(EVALUATE, f"--checkpoint={trained}", f"--data={digits}",
                      f"--fewshot_train={digits}", f"--fewshot_test={broken}",
                      "--fewshot_shots=1", "--fewshot_seeds=1", f"--output={output}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "test-00000-of-00001.tfrecord" in result.stderr
    assert "cannot be read whole" in result.stderr
    assert json.loads(output.read_text())["num_examples"] == 359  # the evaluation was kept


@pytest.mark.parametrize("args, message", [
    ([], "--data"),
    (["--fewshot_train=/x", "--fewshot_shots=0,5"], "--fewshot_shots=0,5"),
    (["--data=/x", "--linear_probe"], "--linear_probe set the few-shot probe"),
    (["--data=/x", "--fewshot_test=/y", "--fewshot_seeds=2"], "--fewshot_test, --fewshot_seeds"),
    (["--fewshot_train=/x", "--fewshot_l2_reg=0"], "--fewshot_l2_reg"),
    (["--fewshot_train=/x", "--fewshot_l2_reg=nan"], "--fewshot_l2_reg=nan"),
])
def test_evaluate_refuses_bad_probe_flags_before_loading(args, message, tmp_path):
    result = run_tool(EVALUATE, f"--checkpoint={tmp_path}/missing", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides, flag", [
    (dict(fewshot_every_steps=15), "--fewshot_every_steps=15"),
    (dict(fewshot_every_steps=20, fewshot_shots="1,x"), "--fewshot_shots"),
    (dict(fewshot_every_steps=20, fewshot_seeds=0), "--fewshot_seeds"),
    (dict(fewshot_every_steps=20, fewshot_l2_reg=float("nan")), "--fewshot_l2_reg"),
])
def test_train_config_refuses_bad_fewshot_settings(overrides, flag, tmp_path):
    config = tiny_config("/data", tmp_path, **overrides)
    with pytest.raises(ConfigError, match=flag):
        validate(config)


@pytest.mark.parametrize("overrides, train, test", [
    ({}, "TRAIN", "EVAL"),  # the run's own data
    (dict(fewshot_train="OTHER"), "OTHER", "OTHER"),  # shots and scored images of one dataset
    (dict(fewshot_test="OTHER"), "TRAIN", "OTHER"),
])
def test_the_training_probe_defaults_to_the_runs_data(overrides, train, test, digits, tmp_path):
    from keras_vit.training.engine import fewshot_probe

    paths = {"TRAIN": digits, "EVAL": str(tmp_path / "eval"), "OTHER": str(tmp_path / "other")}
    for name in ("eval", "other"):
        shutil.copytree(digits, tmp_path / name)
    config = tiny_config(digits, tmp_path / "run", eval_data=paths["EVAL"],
                         fewshot_every_steps=10, fewshot_train_examples=100,
                         **{key: paths[value] for key, value in overrides.items()})
    probe = fewshot_probe(config, tiny_vit(), tf.distribute.get_strategy())
    assert (probe.data.train, probe.data.test) == (paths[train], paths[test])
    assert (probe.data.train_split, probe.data.test_split) == ("train", "test")
    assert probe.data.max_train_examples == 100
    assert probe.settings.shots == (1, 5, 10, 25)


def test_a_probe_refuses_another_dataset_s_classes_and_a_model_without_features(digits,
                                                                                tmp_path):
    other = Path(shutil.copytree(digits, tmp_path / "other"))
    info = json.loads((other / "dataset_info.json").read_text())
    info["class_names"] = [f"c{index}" for index in range(len(info["class_names"]))]
    (other / "dataset_info.json").write_text(json.dumps(info))
    data = probes.ProbeData(train=digits, test=str(other))
    with pytest.raises(fewshot.FewshotError, match="must be of the same classes"):
        probes.Probe(tiny_vit(), data, image_size=16)

    not_a_vit = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(10)])
    with pytest.raises(fewshot.FewshotError, match="Cannot probe this model"):
        probes.Probe(not_a_vit, probes.ProbeData(train=digits, test=digits), image_size=16)
    with pytest.raises(keras_vit.MissingFileError):
        probes.Probe(tiny_vit(), probes.ProbeData(train=str(tmp_path / "missing"),
                                                  test=digits), image_size=16)


def tiny_vit():
    return keras_vit.create_model(keras_vit.parse_variant("d32_l2_h4_m64_p4"), image_size=16,
                                  num_classes=10, pooling="gap")


@pytest.fixture(scope="module")
def dynamic_model_dir(tmp_path_factory):
    """A dynamic-size digits classifier (built at 16 px, patch 4) saved as a model directory."""
    directory = tmp_path_factory.mktemp("dynamic")
    keras.utils.set_random_seed(0)
    model = keras_vit.create_model(keras_vit.parse_variant("d32_l2_h4_m64_p4"),
                                   image_size=16, num_classes=10, pooling="gap",
                                   dynamic_image_size=True)
    model.save(directory / "model.keras")
    return directory, model


@pytest.mark.slow
def test_evaluate_and_predict_run_a_dynamic_model_at_another_multiple(dynamic_model_dir, digits,
                                                                      tmp_path):
    directory, model = dynamic_model_dir
    output = tmp_path / "eval.json"
    result = run_tool(EVALUATE, f"--checkpoint={directory}", f"--data={digits}",
                      "--image_size=24", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(output.read_text())["image_size"] == 24

    image = tmp_path / "digit.png"
    keras.utils.save_img(image, np.full((24, 24, 3), 200, np.uint8))
    result = run_tool(PREDICT, f"--checkpoint={directory}", "--image_size=24", "--json",
                      "--top_k=1", str(image))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])["predictions"][0]
    expected = keras.ops.softmax(model(np.full((1, 24, 24, 3), 200.0, np.float32)))[0]
    assert printed["probability"] == pytest.approx(float(np.max(expected)), rel=1e-5)


def test_a_size_that_is_not_a_multiple_of_the_patch_is_refused(dynamic_model_dir, tmp_path):
    directory, _ = dynamic_model_dir
    image = tmp_path / "digit.png"
    keras.utils.save_img(image, np.zeros((18, 18, 3), np.uint8))
    result = run_tool(PREDICT, f"--checkpoint={directory}", "--image_size=18", str(image))
    assert result.returncode != 0
    assert "--image_size=18 is not a multiple of the model's patch size 4" in result.stderr


def test_a_fixed_model_refuses_another_image_size(dynamic_model_dir):
    from keras_vit import inference

    fixed = keras_vit.create_model(keras_vit.parse_variant("d32_l2_h4_m64_p4"),
                                   image_size=16, num_classes=10)
    assert inference.input_image_size(fixed) == 16
    with pytest.raises(keras_vit.UserError, match="--image_size=32 but the model takes 16x16"):
        inference.input_image_size(fixed, 32)
    wide = keras_vit.create_model(keras_vit.parse_variant("d32_l2_h4_m64_p4"),
                                  image_size=(16, 24), num_classes=10)
    with pytest.raises(keras_vit.UserError, match="takes 16x24 images; the tools read square"):
        inference.input_image_size(wide)
    assert inference.input_image_size(dynamic_model_dir[1]) == 16
    assert inference.input_image_size(dynamic_model_dir[1], 32) == 32
