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


# ----------------------------------------------------------------------------- CIFAR

CIFAR10_NAMES = [f"class{i}" for i in range(10)]


def _pickle(obj):
    return pickle.dumps(obj, protocol=2)


def make_cifar_python(root, kind, splits, meta_names=None, archive=False):
    """Writes a CIFAR python-format folder (or .tar.gz) in the official layout.

    `splits`: {"train": [(data uint8 (n, 3072), labels)], "test": [...]} (one tuple per batch file).
    """
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    files = {}
    if kind == "cifar10":
        files["batches.meta"] = _pickle({b"label_names": [n.encode() for n in meta_names or CIFAR10_NAMES]})
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = b"labels"
    else:
        files["meta"] = _pickle({b"fine_label_names": [n.encode() for n in meta_names],
                                 b"coarse_label_names": [b"c%d" % i for i in range(20)]})
        names = {"train": ["train"], "test": ["test"]}
        label_key = b"fine_labels"
    for split, batches in splits.items():
        for name, (data, labels) in zip(names[split], batches):
            d = {b"batch_label": b"batch", label_key: list(map(int, labels)), b"data": data,
                 b"filenames": [b"img_%s_%d.png" % (name.encode(), i) for i in range(len(labels))]}
            if kind == "cifar100":
                d[b"coarse_labels"] = [int(l) // 5 for l in labels]
            files[name] = _pickle(d)
    return _write_tree(root, folder, files, archive)


def make_cifar_binary(root, kind, split_rows, class_names, archive=False):
    """Binary format: rows of [label(s)] + 3072 pixels. `split_rows`: {"test": (data, labels)}."""
    folder = "cifar-10-batches-bin" if kind == "cifar10" else "cifar-100-binary"
    files = {}
    for split, (data, labels) in split_rows.items():
        labels = np.asarray(labels, np.uint8)[:, None]
        label_bytes = [labels] if kind == "cifar10" else [labels // 5, labels]  # (coarse, fine)
        rows = np.concatenate(label_bytes + [data], 1)
        name = {"cifar10": {"train": "data_batch_1.bin", "test": "test_batch.bin"},
                "cifar100": {"train": "train.bin", "test": "test.bin"}}[kind][split]
        files[name] = rows.astype(np.uint8).tobytes()
    meta = "batches.meta.txt" if kind == "cifar10" else "fine_label_names.txt"
    files[meta] = ("\n".join(class_names) + "\n\n").encode()
    return _write_tree(root, folder, files, archive)


def _write_tree(root, folder, files, archive):
    root = Path(root)
    if not archive:
        (root / folder).mkdir(parents=True)
        for name, data in files.items():
            (root / folder / name).write_bytes(data)
        return root / folder
    path = root / f"{folder}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cifar_pixels(data):
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def check_cifar_output(output_dir, split, data, labels, class_names):
    recs = all_records(output_dir, split)
    assert len(recs) == len(labels)
    for rec, row, label in zip(recs, cifar_pixels(data), labels):
        np.testing.assert_array_equal(decode_png(rec[records.IMAGE_ENCODED]), row)
        assert rec[records.LABEL] == label
        assert rec[records.CLASS_TEXT].decode() == class_names[label]
    assert pipelines.load_dataset_info(str(output_dir))["class_names"] == class_names


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_python_real_pixels_round_trip(tmp_path, archive):
    """Truth: the real first 1,017 CIFAR-10 test images and their labels, and the real meta file."""
    real = np.load(shared_data("cifar10", "test_batch_prefix_decoded.npz"), allow_pickle=False)
    with open(shared_data("cifar10", "batches.meta"), "rb") as f:
        meta = safe_pickle.restricted_loads(f.read(), source="batches.meta")
    class_names = [n.decode() for n in meta[b"label_names"]]
    data, labels = real["data"], real["labels"]
    src = make_cifar_python(tmp_path, "cifar10", {"test": [(data, labels)]}, class_names, archive)
    if not archive:  # the real meta file, byte for byte
        (src / "batches.meta").write_bytes(shared_data("cifar10", "batches.meta").read_bytes())
    pipelines.convert(f"cifar10:{src}", tmp_path / "out", split="test", num_shards=2, verbose=False)
    check_cifar_output(tmp_path / "out", "test", data, labels, class_names)
    assert class_names[:3] == ["airplane", "automobile", "bird"]
    # And back through the eval pipeline at the native size: exact pixels (PNG is lossless).
    ds = pipelines.build_dataset(tmp_path / "out", split="test", image_size=32, batch_size=500)
    images = np.concatenate([x.numpy() for x, _ in ds])
    got = np.concatenate([y.numpy() for _, y in ds])
    np.testing.assert_array_equal(images, cifar_pixels(data).astype(np.float32))
    np.testing.assert_array_equal(got, labels)


def test_cifar100_python_uses_fine_labels_and_real_meta(tmp_path):
    real = np.load(shared_data("cifar100", "test_prefix_decoded.npz"), allow_pickle=False)
    meta = safe_pickle.restricted_loads(shared_data("cifar100", "meta").read_bytes(), source="meta")
    names = [n.decode() for n in meta[b"fine_label_names"]]
    data, fine = real["data"][:200], real["fine_labels"][:200]
    src = make_cifar_python(tmp_path, "cifar100", {"test": [(data, fine)]}, names)
    (src / "meta").write_bytes(shared_data("cifar100", "meta").read_bytes())
    info = pipelines.convert(f"cifar100:{src}", tmp_path / "out", split="test", verbose=False)
    assert info["num_classes"] == 100
    check_cifar_output(tmp_path / "out", "test", data, fine, names)


def test_cifar10_python_train_split_reads_five_batches(tmp_path):
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, (3, 3072), np.uint8), rng.integers(0, 10, 3)) for _ in range(5)]
    src = make_cifar_python(tmp_path, "cifar10", {"train": batches}, archive=True)
    pipelines.convert(f"cifar10:{src}", tmp_path / "out", split="train", verbose=False)
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    check_cifar_output(tmp_path / "out", "train", data, labels, CIFAR10_NAMES)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar_binary_format(tmp_path, kind, archive):
    rng = np.random.default_rng(2)
    num_classes = 10 if kind == "cifar10" else 100
    names = [f"n{i}" for i in range(num_classes)]
    data, labels = rng.integers(0, 256, (7, 3072), np.uint8), rng.integers(0, num_classes, 7)
    src = make_cifar_binary(tmp_path, kind, {"test": (data, labels)}, names, archive)
    pipelines.convert(f"{kind}:{src}", tmp_path / "out", split="test", verbose=False)
    check_cifar_output(tmp_path / "out", "test", data, labels, names)


def test_cifar_binary_truncated_file_is_refused(tmp_path):
    data = np.zeros((3, 3072), np.uint8)
    src = make_cifar_binary(tmp_path, "cifar10", {"test": (data, [1, 2, 3])}, CIFAR10_NAMES)
    path = src / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(sources.CorruptSourceError, match="test_batch.bin.*truncated or corrupt"):
        pipelines.convert(f"cifar10:{src}", tmp_path / "out", split="test", verbose=False)


@pytest.mark.parametrize("kind,real,member,meta", [
    ("cifar10", ("cifar10", "test_batch.first3145728bytes"), "test_batch", ("cifar10", "batches.meta")),
    ("cifar100", ("cifar100", "test.first3145728bytes"), "test", ("cifar100", "meta")),
])
@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_real_truncated_cifar_file_is_refused_without_output(tmp_path, kind, real, member, meta, archive):
    """Truth: the real CIFAR python files cut at 3 MiB (the full ones are 31 MB)."""
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    files = {member: shared_data(*real).read_bytes(), meta[1]: shared_data(*meta).read_bytes()}
    src = _write_tree(tmp_path, folder, files, archive)
    out = tmp_path / "out"
    with pytest.raises(sources.CorruptSourceError, match=f"{member}.*truncated or corrupt"):
        pipelines.convert(f"{kind}:{src}", out, split="test", num_shards=4, verbose=False)
    assert not out.exists() or os.listdir(out) == []


class CallsAFunction:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_a_pickle_that_calls_a_function(tmp_path):
    src = make_cifar_python(tmp_path, "cifar10", {"test": [(np.zeros((1, 3072), np.uint8), [0])]})
    (src / "test_batch").write_bytes(pickle.dumps({b"data": CallsAFunction()}, protocol=2))
    with pytest.raises(safe_pickle.ForbiddenGlobalError,
                       match=r"test_batch.*refusing.*(posix|os)\.system") as refused:
        pipelines.convert(f"cifar10:{src}", tmp_path / "out", split="test", verbose=False)
    assert isinstance(refused.value, pipelines.CorruptSourceError)  # a UserError: one CLI line
    # Plain data and numpy arrays (protocol 2 as in the official files, and protocol 5) load.
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for protocol in (2, 5):
        loaded = safe_pickle.restricted_loads(pickle.dumps({b"a": array}, protocol=protocol), source="x")
        np.testing.assert_array_equal(loaded[b"a"], array)


# ----------------------------------------------------------------------------- folder


def make_folder(root):
    """Two classes, nested sub-folders, JPEG/PNG/BMP files; returns {relative path: (bytes, label)}."""
    rng = np.random.default_rng(3)
    layout = {"b_dog/x/1.jpg": ("JPEG", 1), "b_dog/2.png": ("PNG", 1), "a_cat/deep/er/3.JPEG": ("JPEG", 0),
              "a_cat/4.bmp": ("BMP", 0), "a_cat/5.jpeg": ("JPEG", 0)}
    out = {}
    for rel, (fmt, label) in layout.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (9, 13, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        path.write_bytes(buf.getvalue())
        out[rel] = (buf.getvalue(), label, pixels)
    (Path(root) / "a_cat" / "notes.txt").write_text("not an image")
    return out


def test_folder_with_nested_classes(tmp_path):
    expected = make_folder(tmp_path / "src")
    info = pipelines.convert(f"folder:{tmp_path / 'src'}", tmp_path / "out", split="train",
                             num_shards=2, verbose=False)
    assert info["class_names"] == ["a_cat", "b_dog"]
    recs = {r[records.FILENAME].decode(): r for r in all_records(tmp_path / "out", "train")}
    assert sorted(recs) == sorted(expected)
    for rel, (data, label, pixels) in expected.items():
        rec = recs[rel]
        assert rec[records.LABEL] == label
        assert (rec[records.HEIGHT], rec[records.WIDTH]) == (9, 13)
        if rel.endswith(".bmp"):  # converted to PNG, losslessly
            assert rec[records.IMAGE_FORMAT] == b"png"
            np.testing.assert_array_equal(decode_png(rec[records.IMAGE_ENCODED]), pixels)
        else:  # stored as-is
            assert rec[records.IMAGE_ENCODED] == data


def test_folder_unreadable_image_fails_naming_file_and_leaves_nothing(tmp_path):
    make_folder(tmp_path / "src")
    (tmp_path / "src" / "b_dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(sources.CorruptSourceError, match="broken.jpg"):
        pipelines.convert(f"folder:{tmp_path / 'src'}", tmp_path / "out", split="test",
                          num_shards=3, verbose=False)
    assert [p for p in os.listdir(tmp_path / "out")] == []


def test_folder_with_images_at_top_level_is_refused(tmp_path):
    make_folder(tmp_path / "src")
    (tmp_path / "src" / "stray.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="one sub-folder per class"):
        pipelines.convert(f"folder:{tmp_path / 'src'}", tmp_path / "out", verbose=False)


def test_a_missing_or_unreadable_class_index_names_the_file(tmp_path):
    make_folder(tmp_path / "src")
    with pytest.raises(pipelines.MissingFileError, match="Class index file .*none.json does not"):
        pipelines.convert(f"folder:{tmp_path / 'src'}", tmp_path / "out",
                          class_index=str(tmp_path / "none.json"), verbose=False)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(pipelines.UserError, match="index.json is not a JSON class index"):
        pipelines.convert(f"folder:{tmp_path / 'src'}", tmp_path / "out",
                          class_index=str(tmp_path / "index.json"), verbose=False)


def test_imagenet_sample_folder_with_class_index(tmp_path):
    """Truth: sample_images_labels.csv (Keras class indices and sha256 of every file)."""
    import csv

    images = shared_data("imagenet", "sample_images")
    class_index = shared_data("imagenet", "imagenet_class_index.json")
    rows = list(csv.DictReader(open(shared_data("imagenet", "sample_images_labels.csv"))))
    for row in rows:  # one synset folder per image, as in ImageNet's train set
        (tmp_path / "src" / row["synset"]).mkdir(parents=True)
        os.symlink(images / row["filename"], tmp_path / "src" / row["synset"] / row["filename"])
    info = pipelines.convert(f"folder:{tmp_path / 'src'}", tmp_path / "out", split="test",
                             num_shards=4, class_index=str(class_index), verbose=False)
    assert info["num_classes"] == 1000 and info["class_names"][0] == "tench"
    recs = {r[records.FILENAME].decode().split("/")[1]: r for r in all_records(tmp_path / "out", "test")}
    assert len(recs) == len(rows) == 601
    for row in rows:
        rec = recs[row["filename"]]
        assert rec[records.LABEL] == int(row["class_index"])
        assert rec[records.CLASS_TEXT].decode() == row["class_name"]
        assert hashlib.sha256(rec[records.IMAGE_ENCODED]).hexdigest() == row["sha256"]
        assert (rec[records.WIDTH], rec[records.HEIGHT]) == (int(row["width"]), int(row["height"]))


@pytest.mark.slow
def test_real_cifar10_jpeg_test_set_through_folder_converter(tmp_path):
    """Truth: the 10,000 CIFAR-10 test JPEGs, 1,000 per class, byte for byte."""
    with tarfile.open(shared_data("cifar10", "cifar10_test_jpg.tar.gz")) as tar:
        tar.extractall(tmp_path / "src", filter="data")
    root = tmp_path / "src" / "test"
    pipelines.convert(f"folder:{root}", tmp_path / "out", split="test", num_shards=8, verbose=False)
    recs = all_records(tmp_path / "out", "test")
    assert len(recs) == 10_000
    for rec in recs:
        assert rec[records.IMAGE_ENCODED] == (root / rec[records.FILENAME].decode()).read_bytes()
    ds = pipelines.build_dataset(tmp_path / "out", split="test", image_size=32, batch_size=1000)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert len(labels) == 10_000
    assert np.bincount(labels).tolist() == [1000] * 10
    assert pipelines.describe_source(str(tmp_path / "out"), "test") == (sorted(os.listdir(root)), 10_000)


# ----------------------------------------------------------------------------- TFDS


def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class KerasVitTinyImages(tfds.core.GeneratorBasedBuilder):
        """12 train and 5 test 8x8 PNG images whose pixel value encodes (index, label)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["red", "green", "blue"]),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((8, 8, 3), 10 * i, np.uint8), "label": i % 3}

    return KerasVitTinyImages


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    _tiny_tfds_builder()(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def test_tfds_source_convert_and_read(tfds_dir, tmp_path):
    """Truth: the generator's pixel values (10 * index) and labels (index % 3)."""
    name = "keras_vit_tiny_images"
    info = pipelines.convert(f"tfds:{name}", tmp_path, split="test", num_shards=2,
                             tfds_data_dir=str(tfds_dir), verbose=False)
    assert info["class_names"] == ["red", "green", "blue"]
    assert info["splits"]["test"]["num_examples"] == 5
    recs = all_records(tmp_path, "test")
    got = sorted((int(decode_png(r[records.IMAGE_ENCODED])[0, 0, 0]), r[records.LABEL]) for r in recs)
    assert got == [(10 * i, i % 3) for i in range(5)]
    assert all(r[records.IMAGE_FORMAT] == b"png" for r in recs)
    # The pipeline reads tfds:NAME directly too.
    ds = pipelines.build_dataset(f"tfds:{name}", split="test", image_size=8, batch_size=4,
                                 tfds_data_dir=str(tfds_dir))
    pairs = sorted((int(x[0, 0, 0]), int(y)) for xb, yb in ds for x, y in zip(xb.numpy(), yb.numpy()))
    assert pairs == got
    assert pipelines.describe_source(f"tfds:{name}", "test", str(tfds_dir)) == (["red", "green", "blue"], 5)
    train = pipelines.build_dataset(f"tfds:{name}", split="train", image_size=8, batch_size=4,
                                    tfds_data_dir=str(tfds_dir), shuffle_buffer=12)
    assert next(iter(train))[0].shape == (4, 8, 8, 3)
