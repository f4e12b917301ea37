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
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(digits_dir, split="test", image_size=32, batch_size=100,
                                 bad_record_counter=counter)
    sizes = [int(y.shape[0]) for _, y in ds]
    assert sizes == [100, 100, 100, 59]
    images, labels = collect(ds)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.min() >= 0 and images.max() <= 255 and images.max() > 200
    # Truth: the labels as written, counted per class.
    from sklearn.datasets import load_digits
    target = load_digits().target
    order = np.random.default_rng(0).permutation(1797)[1438:]
    np.testing.assert_array_equal(
        np.bincount(labels, minlength=10), np.bincount(target[order], minlength=10))
    assert counter.count == 0


def test_train_batches_have_fixed_shape(digits_dir):
    ds = pipelines.build_dataset(
        digits_dir, split="train", image_size=24, batch_size=32, shuffle_buffer=100)
    assert ds.element_spec[0].shape.as_list() == [32, 24, 24, 3]
    assert ds.element_spec[1].shape.as_list() == [32]
    for x, y in ds.take(3):
        assert x.dtype == tf.float32 and y.dtype == tf.int32
        assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255


# ----------------------------------------------------------------------------- bad data

import io
import json

from PIL import Image

from pipelines import records


def png(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, items):
    """items: (image bytes or raw record bytes, label); raw when label is None."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for data, label in items:
            writer.write(data if label is None else records.encode_example(
                data, image_format="png", label=label, height=4, width=4))


def write_info(directory, shards, num_classes=10):
    info = {"source": "test", "class_names": [str(i) for i in range(num_classes)],
            "num_classes": num_classes, "label_offset": 0,
            "splits": {"test": {"num_examples": sum(n for _, n in shards),
                                "shards": [{"file": f, "num_examples": n} for f, n in shards]}}}
    (directory / "dataset_info.json").write_text(json.dumps(info))


@pytest.fixture
def bad_dir(tmp_path):
    """Shard 0: 5 good records; shard 1: 3 good, garbage image bytes, a non-Example record."""
    write_shard(tmp_path / "test-00000-of-00002.tfrecord", [(png(i), i) for i in range(5)])
    write_shard(tmp_path / "test-00001-of-00002.tfrecord",
                [(png(5), 5), (b"garbage, not an image", 6), (png(7), 7),
                 (b"\x0a\xff\xff not a proto", None), (png(8), 8)])
    write_info(tmp_path, [("test-00000-of-00002.tfrecord", 5), ("test-00001-of-00002.tfrecord", 5)])
    return tmp_path


def test_skip_counts_bad_records(bad_dir):
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(bad_dir, split="test", image_size=4, batch_size=3,
                                 bad_record_counter=counter)
    images, labels = collect(ds)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1, 2, 3, 4, 5, 7, 8])
    assert counter.count == 2


def test_without_a_counter_bad_records_are_skipped_and_nothing_is_attached(bad_dir):
    ds = pipelines.build_dataset(bad_dir, split="test", image_size=4, batch_size=3)
    assert collect(ds)[1].tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    assert not hasattr(ds, "bad_records")


def test_skip_in_a_finite_training_pass_counts_only_bad_records(bad_dir):
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(bad_dir, split="test", training=True, repeat=False,
                                 image_size=4, batch_size=3, seed=0, bad_record_counter=counter)
    sizes = [int(y.shape[0]) for _, y in ds]
    assert sizes == [3, 3]  # 8 good records, fixed-size batches, remainder of 2 dropped
    assert counter.count == 2


def test_resume_position_skips_past_the_dropped_records():
    # Hand computation: positions 2, 3 and 6 dropped; 0 1 4 5 7 8 ... delivered.
    positions = pipelines.DroppedPositions([6, 2, 3, 3])
    assert positions.positions == [2, 3, 6]
    assert [positions.resume_position(n) for n in range(7)] == [0, 1, 2, 5, 6, 8, 9]
    assert positions.note(9, 11) == 2 and positions.positions == [2, 3, 6, 9, 10]
    assert pipelines.DroppedPositions().resume_position(7) == 7


def test_a_resumed_training_pipeline_continues_past_its_dropped_records(bad_dir):
    # Truth: the same deterministic pipeline without a skip. Its 2 bad records (of 10) recur
    # in every pass, so skipping k batches' 3k examples as 3k records would start early.
    def batches(skip, count, dropped):
        ds = pipelines.build_dataset(bad_dir, split="test", training=True, image_size=4,
                                     batch_size=3, deterministic=True, seed=1, shuffle_buffer=4,
                                     augment="none", skip_examples=skip, dropped_positions=dropped)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]

    noted = pipelines.DroppedPositions()
    whole = batches(0, 10, noted)
    assert len(noted.positions) >= 5  # 10 batches = 30 examples span 3+ passes of 8 good ones
    late = []
    for k in (1, 4, 7):
        resumed = batches(3 * k, 10 - k, pipelines.DroppedPositions(noted.positions))
        for (x1, y1), (x2, y2) in zip(whole[k:], resumed):
            np.testing.assert_array_equal(y1, y2)
            np.testing.assert_array_equal(x1, x2)
        late.append(all(np.array_equal(a[1], b[1])
                        for a, b in zip(whole[k:], batches(3 * k, 10 - k, None))))
    assert not all(late)  # counting records as examples does start early


def test_fail_raises_naming_the_shard(bad_dir):
    ds = pipelines.build_dataset(bad_dir, split="test", image_size=4, batch_size=3, on_bad_record="fail")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="(?s)not a decodable image.*test-00001-of-00002.tfrecord"):
        collect(ds)


def test_truncated_shard(bad_dir):
    good = bad_dir / "test-00000-of-00002.tfrecord"
    good.write_bytes(good.read_bytes()[:-10])  # cuts into the 5th record
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(bad_dir, split="test", image_size=4, batch_size=4,
                                 bad_record_counter=counter)
    _, labels = collect(ds)
    assert labels.tolist() == [0, 1, 2, 3, 5, 7, 8]
    assert counter.count == 3
    assert list(counter.shard_errors) == [str(good)]
    with pytest.raises(pipelines.CorruptShardError, match="test-00000-of-00002.tfrecord.*truncated"):
        pipelines.build_dataset(bad_dir, split="test", image_size=4, batch_size=4, on_bad_record="fail")


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_out_of_range_label_raises_naming_the_shard(tmp_path, mode):
    write_shard(tmp_path / "test-00000-of-00001.tfrecord", [(png(0), 0), (png(1), 10)])
    write_info(tmp_path, [("test-00000-of-00001.tfrecord", 2)])
    ds = pipelines.build_dataset(tmp_path, split="test", image_size=4, batch_size=2, on_bad_record=mode)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)label outside \[0, 10\).*test-00000-of-00001.tfrecord"):
        collect(ds)
    # Model Garden's 1-based labels: label_offset=1 maps 1..10 to 0..9.
    write_shard(tmp_path / "test-00000-of-00001.tfrecord", [(png(0), 1), (png(1), 10)])
    ds = pipelines.build_dataset(tmp_path, split="test", image_size=4, batch_size=2, label_offset=1)
    assert collect(ds)[1].tolist() == [0, 9]


# ----------------------------------------------------------------------------- distribution


def test_two_input_contexts_see_every_file_once(digits_dir):
    files, _ = pipelines.info.resolve_shards(str(digits_dir), "train")
    contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    parts = [pipelines.shard_files(files, c) for c in contexts]
    assert sorted(parts[0] + parts[1]) == sorted(files) and not set(parts[0]) & set(parts[1])
    # And through the pipeline: the two eval streams together are the whole split, once.
    seen = []
    for c in contexts:
        images, labels = collect(pipelines.build_dataset(
            digits_dir, split="train", training=False, image_size=32, batch_size=50, input_context=c))
        seen += [(int(l), float(x.sum())) for x, l in zip(images, labels)]
    images, labels = collect(pipelines.build_dataset(
        digits_dir, split="train", training=False, image_size=32, batch_size=50))
    assert sorted(seen) == sorted((int(l), float(x.sum())) for x, l in zip(images, labels))
    assert len(seen) == 1438


def test_deterministic_mode_gives_identical_batches(digits_dir):
    def batches(seed):
        ds = pipelines.build_dataset(digits_dir, split="train", image_size=16, batch_size=16,
                                     deterministic=True, seed=seed, shuffle_buffer=200)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    first, second, other = batches(1), batches(1), batches(2)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other))


def test_skipped_examples_continue_the_same_stream(digits_dir):
    # Truth: the same deterministic pipeline without a skip. Skipping k batches' examples gives
    # its batches from k on, crops and flips included (each record keeps its augmentation
    # seed), across the end of the first pass over the 1438 records (batch 90 of 16).
    def batches(skip, count):
        ds = pipelines.build_dataset(digits_dir, split="train", image_size=16, batch_size=16,
                                     deterministic=True, seed=3, shuffle_buffer=200,
                                     resize_kernel="tensorflow", skip_examples=skip)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]

    whole = batches(0, 93)
    for k in (1, 89):
        for (x1, y1), (x2, y2) in zip(whole[k:], batches(16 * k, 93 - k)):
            np.testing.assert_array_equal(y1, y2)
            np.testing.assert_array_equal(x1, x2)
    with pytest.raises(pipelines.UserError, match="skip_examples"):
        pipelines.build_dataset(digits_dir, split="train", image_size=16, batch_size=16,
                                skip_examples=-1)


def test_mixup_randaugment_and_cache(digits_dir):
    ds = pipelines.build_dataset(digits_dir, split="train", image_size=16, batch_size=8,
                                 mixup_alpha=0.5, randaugment="2,15", cache=True, seed=0)
    x, y = next(iter(ds))
    assert x.shape == (8, 16, 16, 3) and y.shape == (8, 10) and y.dtype == tf.float32
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, rtol=1e-5)
    assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 255.0


def test_mixup_needs_num_classes_without_dataset_info(digits_dir, tmp_path):
    import shutil

    shutil.copy(digits_dir / "train-00000-of-00004.tfrecord", tmp_path)
    pattern = str(tmp_path / "train-*.tfrecord")
    assert pipelines.describe_source(pattern, "train") == (None, None)
    with pytest.raises(ValueError, match="mixup_alpha > 0 needs num_classes"):
        pipelines.build_dataset(pattern, split="train", image_size=16, batch_size=8, mixup_alpha=0.5)
    ds = pipelines.build_dataset(pattern, split="train", image_size=16, batch_size=8,
                                 mixup_alpha=0.5, num_classes=10)
    assert next(iter(ds))[1].shape == (8, 10)


def jpeg(value, size=32):
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def corrupt_after_header(data):
    """A JPEG whose headers are intact and whose entropy-coded data stops half-way."""
    start_of_scan = data.index(b"\xff\xda")
    return data[: start_of_scan + (len(data) - start_of_scan) // 2]


@pytest.fixture(params=["corrupt_jpeg", "unparseable_example"])
def one_bad_record_dir(tmp_path, request):
    """Shard 0: 4 good JPEG records; shard 1: good (label 4), the bad record, good (label 6)."""
    bad = ((corrupt_after_header(jpeg(5)), 5) if request.param == "corrupt_jpeg"
           else (b"\x0a\x05\x0a\x03 truncated proto", None))

    def jpeg_shard(path, items):
        with tf.io.TFRecordWriter(str(path)) as writer:
            for data, label in items:
                writer.write(data if label is None else records.encode_example(
                    data, image_format="jpeg", label=label, height=32, width=32))

    jpeg_shard(tmp_path / "test-00000-of-00002.tfrecord", [(jpeg(i), i) for i in range(4)])
    jpeg_shard(tmp_path / "test-00001-of-00002.tfrecord", [(jpeg(4), 4), bad, (jpeg(6), 6)])
    write_info(tmp_path, [("test-00000-of-00002.tfrecord", 4), ("test-00001-of-00002.tfrecord", 3)])
    return tmp_path, request.param


def test_bad_record_truths_hold():
    # The corrupt JPEG keeps a valid header (so only the decode proper fails) and TF rejects it.
    data = corrupt_after_header(jpeg(5))
    assert tf.image.extract_jpeg_shape(data).numpy().tolist() == [32, 32, 3]
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(data)
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.parse_single_example(b"\x0a\x05\x0a\x03 truncated proto", records.FEATURE_SPEC)


@pytest.mark.parametrize("training", [False, True])
def test_fail_mode_names_the_shard_of_a_corrupt_record(one_bad_record_dir, training):
    directory, kind = one_bad_record_dir
    expected = ("not a decodable image" if kind == "corrupt_jpeg"
                else "not a parseable tf.train.Example")
    ds = pipelines.build_dataset(directory, split="test", training=training, repeat=False,
                                 image_size=8, batch_size=2, seed=0, on_bad_record="fail")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"(?s){expected}.*test-00001-of-00002.tfrecord"):
        collect(ds)


@pytest.mark.parametrize("training", [False, True])
def test_skip_mode_counts_a_corrupt_record(one_bad_record_dir, training):
    directory, _ = one_bad_record_dir
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(directory, split="test", training=training, repeat=False,
                                 image_size=8, batch_size=1, seed=0, bad_record_counter=counter)
    _, labels = collect(ds)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4, 6]
    assert counter.count == 1


def test_fail_mode_reads_good_data_like_skip_mode(digits_dir):
    def images(mode):
        return collect(pipelines.build_dataset(digits_dir, split="test", image_size=16,
                                               batch_size=64, on_bad_record=mode))

    (x_skip, y_skip), (x_fail, y_fail) = images("skip"), images("fail")
    np.testing.assert_array_equal(y_skip, y_fail)
    np.testing.assert_array_equal(x_skip, x_fail)
    assert len(y_fail) == 359


# ----------------------------------------------------------------------------- augment option


def eval_preprocessed_records(directory, split, image_size):
    """Truth: `preprocess_for_eval` of every record's bytes, read in Python: {bytes: label}."""
    out = {}
    for path in sorted(directory.glob(f"{split}-*.tfrecord")):
        for serialized in tf.data.TFRecordDataset(str(path)):
            example = records.decode_example_py(serialized.numpy())
            image = pipelines.preprocess_for_eval(example[records.IMAGE_ENCODED], image_size)
            out[image.numpy().tobytes()] = example[records.LABEL]
    return out


@pytest.mark.parametrize("augment", ["none", "inception_crop"])
def test_augment_none_trains_on_the_eval_preprocessing(digits_dir, augment):
    truth = eval_preprocessed_records(digits_dir, "train", 24)
    ds = pipelines.build_dataset(digits_dir, split="train", image_size=24, batch_size=32,
                                 shuffle_buffer=500, repeat=False, seed=0, augment=augment)
    assert ds.element_spec[0].shape.as_list() == [32, 24, 24, 3]
    images, labels = collect(ds)
    found = [truth.get(x.tobytes()) for x in images]
    if augment == "none":
        # Every training image is exactly the eval preprocessing of a record, with its label...
        assert found == labels.tolist()
        # ...a full pass but the dropped remainder, shuffled (not in the order written).
        assert len(labels) == 1438 // 32 * 32
        in_order = collect(pipelines.build_dataset(
            digits_dir, split="train", training=False, image_size=24, batch_size=32))[1]
        assert labels.tolist() != in_order[: len(labels)].tolist()
    else:  # the Inception crop and flip change (nearly) every image
        assert sum(f is not None for f in found) < len(found) // 2


def test_augment_must_be_known(digits_dir):
    with pytest.raises(ValueError, match="augment must be one of"):
        pipelines.build_dataset(digits_dir, split="train", image_size=8, batch_size=4,
                                augment="crop_flip")
