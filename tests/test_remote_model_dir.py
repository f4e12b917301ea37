"""A model directory on another file system than the local one (gs:// on a TPU VM): training
writes all of it there, prunes its checkpoints there, resumes from it, and the tools load it.

TensorFlow's in-memory file system (ram://, one per process) stands in for GCS: every access
goes through `tf.io.gfile` as for gs://, and a path written with plain `open` or `os` instead
would land in a local folder named "ram:" in the working directory, which the test looks for.
"""

import json

import pytest
import tensorflow as tf

from keras_vit import load_classifier
from keras_vit.training import train
from tests.train_helpers import convert_digits, tiny_config


@pytest.mark.slow
def test_training_writes_prunes_resumes_and_loads_on_another_file_system(tmp_path, monkeypatch):
    data = convert_digits(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    model_dir = "ram://keras_vit_test/run"
    config = tiny_config(data, model_dir, total_steps=30, keep_checkpoints=2)
    results = train(config)

    for name in ("model.keras", "class_names.json", "results.json"):
        assert tf.io.gfile.exists(f"{model_dir}/{name}"), name
    with tf.io.gfile.GFile(f"{model_dir}/results.json") as stream:
        assert json.load(stream)["eval_top1"] == results["eval_top1"]
    # Three checkpoints were written (every 10 of 30 steps); the oldest was pruned.
    assert [path.rsplit("/", 1)[-1] for path in
            sorted(tf.io.gfile.glob(f"{model_dir}/checkpoints/ckpt-*.weights.h5"))] == [
        "ckpt-0000020.weights.h5", "ckpt-0000030.weights.h5"]
    assert tf.io.gfile.glob(f"{model_dir}/logs/train/*")  # TensorBoard's events
    assert not (tmp_path / "ram:").exists()  # nothing went through the local file system

    model, class_names = load_classifier(model_dir)
    assert class_names == [str(digit) for digit in range(10)]
    assert model.output_shape == (None, 10)

    again = train(config)  # the backup there: nothing left to train, only the evaluation
    assert again["resumed_from_step"] == 30 and again["steps"] == 30
    assert again["eval_top1"] == pytest.approx(results["eval_top1"])
