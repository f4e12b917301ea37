"""Tests of pipelines.convert / tools/convert_data.py against independent truths."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import pipelines
from pipelines import records, safe_pickle, sources
from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


def read_records(path):
    return [records.decode_example_py(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]


def all_records(output_dir, split):
    info = pipelines.load_dataset_info(str(output_dir))
    out = []
    for shard in info["splits"][split]["shards"]:
        out += read_records(Path(output_dir) / shard["file"])
    return out


def decode_png(data):
    return np.asarray(Image.open(io.BytesIO(data)))


# ----------------------------------------------------------------------------- digits


def test_digits_train_and_test_merge_into_one_info(tmp_path):
    from sklearn.datasets import load_digits

    train = pipelines.convert("digits:", tmp_path, split="train", num_shards=3, verbose=False)
    info = pipelines.convert("digits:", tmp_path, split="test", verbose=False)
    assert train["splits"]["train"]["num_examples"] == 1438
    assert set(info["splits"]) == {"train", "test"}
    assert info["splits"]["test"]["num_examples"] == 359
    assert [s["num_examples"] for s in info["splits"]["train"]["shards"]] == [479, 479, 480]
    assert info["class_names"] == [str(i) for i in range(10)] and info["num_classes"] == 10
    assert json.loads((tmp_path / "dataset_info.json").read_text()) == info
    # Truth: sklearn's own 8x8 arrays, scaled and repeated 4x4.
    digits = load_digits()
    test = all_records(tmp_path, "test")
    train_records = all_records(tmp_path, "train")
    seen = set()
    for rec in test[:20] + train_records[:20]:
        index = int(rec[records.FILENAME].decode().split(":")[1])
        seen.add(index)
        pixels = decode_png(rec[records.IMAGE_ENCODED])
        assert pixels.shape == (32, 32, 3) and rec[records.IMAGE_FORMAT] == b"png"
        expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(pixels[::4, ::4, 0], expected)
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
        assert rec[records.LABEL] == digits.target[index]
    all_indices = [int(r[records.FILENAME].decode().split(":")[1]) for r in test + train_records]
    assert sorted(all_indices) == list(range(1797))


def test_conversion_is_deterministic(tmp_path):
    pipelines.convert("digits:", tmp_path / "a", split="test", num_shards=3, num_workers=3, verbose=False)
    pipelines.convert("digits:", tmp_path / "b", split="test", num_shards=3, num_workers=1, verbose=False)
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_cli_writes_shards_and_stale_shards_are_removed(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_data.py"), "--source=digits:",
         f"--output_dir={tmp_path}", "--split=test", "--num_shards=2", "--num_workers=2"],
        capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["num_examples"] == 359
    assert sorted(os.listdir(tmp_path)) == [
        "dataset_info.json", "test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord"]
    pipelines.convert("digits:", tmp_path, split="test", num_shards=1, verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["dataset_info.json", "test-00000-of-00001.tfrecord"]
