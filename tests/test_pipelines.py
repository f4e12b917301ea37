"""Tests of pipelines.build_dataset: shapes, counts, sharding, determinism, bad data."""

import numpy as np
import pytest
import tensorflow as tf

import pipelines


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    pipelines.convert("digits:", out, split="train", num_shards=4, verbose=False)
    pipelines.convert("digits:", out, split="test", num_shards=3, verbose=False)
    return out


def collect(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_eval_yields_every_example_once_with_partial_batch(digits_dir):
    ds = pipelines.build_dataset(digits_dir, split="test", image_size=32, batch_size=100)
    sizes = [int(y.shape[0]) for _, y in ds]
    assert sizes == [100, 100, 100, 59]
    images, labels = collect(ds)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.min() >= 0 and images.max() <= 255 and images.max() > 200
    # Truth: the labels as written, counted per class.
    from sklearn.datasets import load_digits
    target = load_digits().target
    order = np.random.default_rng(0).permutation(1797)[1438:]
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(target[order], minlength=10))
    assert ds.bad_records.count == 0


def test_train_batches_have_fixed_shape(digits_dir):
    ds = pipelines.build_dataset(digits_dir, split="train", image_size=24, batch_size=32, shuffle_buffer=100)
    assert ds.element_spec[0].shape.as_list() == [32, 24, 24, 3]
    assert ds.element_spec[1].shape.as_list() == [32]
    for x, y in ds.take(3):
        assert x.dtype == tf.float32 and y.dtype == tf.int32
        assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255
