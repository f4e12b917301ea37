"""keras_vit.evaluation and tools/evaluate.py: counts, top-1/top-5, per-class accuracy.

Truths: hand-computed ranks and accuracies; a dataset whose images carry the model's logits
in their pixels, so the expected predictions are known without running any keras_vit code;
Keras's own SparseTopKCategoricalAccuracy; and a zero-head ViT whose logits equal its bias.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_vit
import pipelines
from keras_vit import evaluation
from pipelines import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8
NUM_EXAMPLES = 23  # Not a multiple of the batch sizes used below: a final partial batch.


def write_logit_records(path, logits, labels):
    """TFRecords (Model Garden keys) of K x K PNGs whose first row, red channel, is the logits."""
    num_classes = logits.shape[1]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for row, label in zip(logits, labels):
            pixels = np.zeros((num_classes, num_classes, 3), np.uint8)
            pixels[0, :, 0] = row
            png = tf.io.encode_png(pixels).numpy()
            writer.write(records.encode_example(
                png, image_format="png", label=int(label), height=num_classes, width=num_classes))


def logit_reader_model(num_classes):
    """Reads the logits back out of the images: logits = image[:, 0, :, 0]."""
    images = keras.Input((num_classes, num_classes, 3))
    logits = keras.layers.Lambda(lambda x: x[:, 0, :, 0])(images)
    return keras.Model(images, logits)


@pytest.fixture(scope="module")
def logit_data(tmp_path_factory):
    rng = np.random.default_rng(3)
    # Distinct logits per example (a permutation of 10, 20, ..., 80): no ties.
    logits = np.stack([rng.permutation(NUM_CLASSES) * 10 + 10 for _ in range(NUM_EXAMPLES)])
    labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES)
    labels[:3] = 7  # Class 7 surely present; class ... may be absent, exercised below.
    path = tmp_path_factory.mktemp("logits") / "eval-00000-of-00001.tfrecord"
    write_logit_records(path, logits.astype(np.uint8), labels)
    return str(path), logits, labels


def expected_metrics(logits, labels):
    """Independent top-1 / top-5 / per-class: sort each row's classes by logit, by hand."""
    order = [sorted(range(NUM_CLASSES), key=lambda c: -row[c]) for row in logits]
    top1 = np.mean([o[0] == y for o, y in zip(order, labels)])
    top5 = np.mean([y in o[:5] for o, y in zip(order, labels)])
    per_class = {}
    for c in range(NUM_CLASSES):
        members = [o[0] == y for o, y in zip(order, labels) if y == c]
        per_class[c] = (len(members), np.mean(members) if members else None)
    return top1, top5, per_class


def test_label_ranks_by_hand():
    logits = np.array([[0.1, 0.7, 0.2],    # label 1 is first: rank 0
                       [0.5, 0.2, 0.3],    # label 2: behind 0.5 -> rank 1
                       [0.3, 0.3, 0.3],    # all tied, label 2: lower indices win -> rank 2
                       [0.4, 0.4, 0.2]])   # tie, label 0: rank 0 (as np.argmax picks 0)
    labels = np.array([1, 2, 2, 0])
    np.testing.assert_array_equal(evaluation.label_ranks(logits, labels), [0, 1, 2, 0])
    np.testing.assert_array_equal(evaluation.top_k_correct(logits, labels, 1), [1, 0, 0, 1])
    np.testing.assert_array_equal(evaluation.top_k_correct(logits, labels, 2), [1, 1, 0, 1])


def test_untrained_zero_head_is_not_all_correct():
    # Equal logits everywhere: every prediction is class 0, so only class-0 labels are right.
    counts = evaluation.ConfusionCounts(4, ks=(1, 2))
    counts.update(np.zeros((4, 4)), np.array([0, 1, 2, 3]))
    assert counts.top_k_accuracy(1) == 0.25 and counts.top_k_accuracy(2) == 0.5


def test_counts_summary_by_hand():
    counts = evaluation.ConfusionCounts(3, ks=(1, 2))
    counts.update(np.array([[3., 1, 0], [0, 2, 1], [1, 0, 2]]), np.array([0, 0, 2]))
    counts.update(np.array([[0., 1, 5]]), np.array([0]))
    # Class 0: 3 examples, predicted 0, 1, 2 -> 1/3 right; class 2: 1 example, right; class 1
    # absent. Top-2: ex. 1 (label 0, logits 0,2,1) -> rank 2 -> miss; ex. 4 rank 2 -> miss.
    summary = counts.summary(["a", "b", "c"])
    np.testing.assert_array_equal(counts.confusion, [[1, 1, 1], [0, 0, 0], [0, 0, 1]])
    assert summary["num_examples"] == 4
    assert summary["top1"] == pytest.approx(2 / 4) and summary["top2"] == pytest.approx(2 / 4)
    assert summary["mean_per_class_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["per_class"][1] == {"index": 1, "name": "b", "num_examples": 0, "accuracy": None}
    assert summary["per_class"][0]["accuracy"] == pytest.approx(1 / 3)
    json.dumps(summary, allow_nan=False)  # JSON-ready: no NaN.


def test_agrees_with_keras_top_k_metric():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)).astype(np.float32)  # continuous: no ties
    labels = rng.integers(0, 10, 50)
    counts = evaluation.ConfusionCounts(10)
    counts.update(logits, labels)
    for k in (1, 5):
        metric = keras.metrics.SparseTopKCategoricalAccuracy(k=k)
        metric.update_state(labels, logits)
        assert counts.top_k_accuracy(k) == pytest.approx(float(metric.result()), abs=1e-6)


def test_labels_out_of_range_are_an_error():
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
        evaluation.label_ranks(np.zeros((2, 3)), np.array([0, 3]))


@pytest.mark.parametrize("batch_size", [5, 23, 64])
def test_evaluate_counts_every_example_once(logit_data, batch_size):
    path, logits, labels = logit_data

    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(batch_size)
        ds = pipelines.build_dataset(path, split="eval", image_size=NUM_CLASSES,
                                     batch_size=per_replica, input_context=input_context,
                                     training=False, num_classes=NUM_CLASSES)
        return ds

    counts, stats = evaluation.evaluate(logit_reader_model(NUM_CLASSES), dataset_fn)
    top1, top5, per_class = expected_metrics(logits, labels)
    assert counts.num_examples == NUM_EXAMPLES
    assert stats["num_steps"] == -(-NUM_EXAMPLES // batch_size)
    assert counts.top_k_accuracy(1) == pytest.approx(top1)
    assert counts.top_k_accuracy(5) == pytest.approx(top5)
    summary = counts.summary()
    for entry in summary["per_class"]:
        n, accuracy = per_class[entry["index"]]
        assert entry["num_examples"] == n
        assert entry["accuracy"] == (pytest.approx(accuracy) if n else None)
    np.testing.assert_array_equal(counts.confusion.sum(axis=1), np.bincount(labels, minlength=NUM_CLASSES))
    assert stats["images_per_sec"] > 0


def test_evaluate_under_two_replicas_counts_every_example_once(logit_data, tmp_path):
    """MirroredStrategy over 2 logical CPUs (a fresh process: devices are set before TF starts)."""
    path, logits, labels = logit_data
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import pipelines
        from keras_vit import evaluation
        from test_evaluation import logit_reader_model
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        def dataset_fn(ctx):
            b = ctx.get_per_replica_batch_size(10)
            ds = pipelines.build_dataset({path!r}, split="eval", image_size={NUM_CLASSES},
                                         batch_size=b, input_context=ctx, training=False)
            return ds
        with strategy.scope():
            model = logit_reader_model({NUM_CLASSES})
        counts, stats = evaluation.evaluate(model, dataset_fn, strategy=strategy)
        print(json.dumps({{"n": counts.num_examples, "top1": counts.top_k_accuracy(1),
                          "top5": counts.top_k_accuracy(5), "replicas": stats["num_replicas"],
                          "confusion": counts.confusion.tolist()}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    top1, top5, _ = expected_metrics(logits, labels)
    assert out["replicas"] == 2 and out["n"] == NUM_EXAMPLES
    assert out["top1"] == pytest.approx(top1) and out["top5"] == pytest.approx(top5)
    np.testing.assert_array_equal(np.sum(out["confusion"], axis=1),
                                  np.bincount(labels, minlength=NUM_CLASSES))


def test_format_report_lists_headline_numbers():
    counts = evaluation.ConfusionCounts(2)
    counts.update(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]))
    text = evaluation.format_report(counts.summary(["cat", "dog"]))
    assert "examples: 2" in text and "top1: 50.00%" in text
    assert "cat  100.00%  (n=1)" in text and "dog  0.00%  (n=1)" in text


# --- tools/evaluate.py end to end -----------------------------------------------------------


def zero_head_vit(num_classes, bias, image_size=16):
    """A tiny ViT whose head kernel is 0, so its logits are `bias` for every image."""
    config = keras_vit.ViTConfig(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    model = keras_vit.create_model(config, image_size=image_size, num_classes=num_classes)
    head = model.get_layer("head")
    head.set_weights([np.zeros_like(head.get_weights()[0]), np.asarray(bias, np.float32)])
    return model


def run_tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_evaluate_tool_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 17)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tf.io.TFRecordWriter(str(data_dir / "test-00000-of-00001.tfrecord")) as writer:
        for label in labels:
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            png = tf.io.encode_png(pixels).numpy()
            writer.write(records.encode_example(png, image_format="png", label=int(label),
                                                height=20, width=20))
    # Bias order: class 3 first, then 1, 5, 0, 4, 2.
    bias = [0.3, 0.5, 0.0, 0.9, 0.2, 0.4]
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    zero_head_vit(6, bias).save(model_dir / "model.keras")
    keras_vit.write_class_names([f"c{i}" for i in range(6)], str(model_dir))
    output, confusion = tmp_path / "results.json", tmp_path / "confusion.png"
    result = run_tool("evaluate.py", f"--checkpoint={model_dir}", f"--data={data_dir}",
                      "--batch_size=4", "--strategy=mirrored", f"--output={output}",
                      f"--confusion_png={confusion}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    # Every image is predicted as class 3; top-5 misses only class 2 (the lowest bias).
    assert results["num_examples"] == 17 and results["strategy"] == "mirrored"
    assert results["top1"] == pytest.approx(np.mean(labels == 3))
    assert results["top5"] == pytest.approx(np.mean(labels != 2))
    assert [e["accuracy"] for e in results["per_class"] if e["num_examples"]] == [
        1.0 if c == 3 else 0.0 for c in range(6) if np.any(labels == c)]
    assert results["per_class"][0]["name"] == "c0"
    assert "examples: 17" in result.stdout
    with Image.open(confusion) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_evaluate_tool_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_tool("evaluate.py", f"--checkpoint={tmp_path}/nothing.keras", f"--data={tmp_path}")
    assert result.returncode != 0
    assert f"Model file {tmp_path}/nothing.keras does not exist" in result.stderr
