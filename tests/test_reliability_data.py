"""Issue 14, data: no record lost uncounted when reading; conversion never destroys.

Truths: the record counts `pipelines.convert` writes into dataset_info.json; TFRecord framing
(uint64 length, uint32 masked CRC of the length, data, uint32 masked CRC of the data), so a byte
flipped in a record's payload or in its length CRC is a known corrupt record; PIL's own refusal
of a truncated image when it decodes it fully; a process's peak resident memory (`VmHWM`).
"""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import pipelines
from pipelines import info as info_lib, records, sources
from tests.train_helpers import flip_byte, record_offsets

REPO = Path(__file__).resolve().parents[1]
SHARD0 = "test-00000-of-00002.tfrecord"
SHARD1 = "test-00001-of-00002.tfrecord"


@pytest.fixture(scope="module")
def digits_master(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    pipelines.convert("digits:", out, split="test", num_shards=2, verbose=False)
    return out


@pytest.fixture
def digits(digits_master, tmp_path):
    """A fresh copy of digits' test split: 359 examples in shards of 179 and 180."""
    return Path(shutil.copytree(digits_master, tmp_path / "digits"))


def read_all(directory, mode, **kwargs):
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(directory, split="test", image_size=8, batch_size=64,
                                 on_bad_record=mode, bad_record_counter=counter, **kwargs)
    return sum(int(y.shape[0]) for _, y in ds), counter


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_flipped_byte_is_counted_and_the_shard_named_in_skip_mode(digits, where):
    flip_byte(digits / SHARD0, 50, where)
    delivered, counter = read_all(digits, "skip")
    # The reader cannot resynchronize after a corrupt record: records 50..178 of shard 0 are lost.
    assert delivered == 359 - 129
    assert counter.count == 359 - delivered
    assert list(counter.shard_errors) == [str(digits / SHARD0)]
    assert counter.shard_errors[str(digits / SHARD0)][1] == 129


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_flipped_byte_is_an_error_naming_the_shard_in_fail_mode(digits, where):
    flip_byte(digits / SHARD1, 3, where)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"(?s){SHARD1}.*ended after.*3"):
        read_all(digits, "fail")


def test_a_flipped_byte_in_training_is_counted(digits):
    flip_byte(digits / SHARD0, 10, "payload")
    counter = pipelines.BadRecordCounter()
    ds = pipelines.build_dataset(digits, split="test", training=True, repeat=False, image_size=8,
                                 batch_size=1, seed=0, bad_record_counter=counter)
    assert sum(1 for _ in ds) == 359 - 169
    assert counter.count == 169 and list(counter.shard_errors) == [str(digits / SHARD0)]


def test_training_on_shards_corrupt_at_their_first_record_stops_instead_of_spinning(digits):
    # Skip mode drops a shard's rest at a corrupt record; with every shard's first record
    # corrupt a repeated pass would cycle over the files forever. Run in a subprocess so a
    # regression fails on its timeout instead of hanging the suite.
    for shard in (SHARD0, SHARD1):
        flip_byte(digits / shard, 0, "payload")
    script = (
        "import sys, pipelines\n"
        "ds = pipelines.build_dataset(sys.argv[1], split='test', training=True, image_size=8,"
        " batch_size=4, seed=0)\n"
        "next(iter(ds))\n")
    result = subprocess.run([sys.executable, "-c", script, str(digits)], capture_output=True,
                            text=True, timeout=120, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode != 0
    assert "ended before its first record" in result.stderr, result.stderr[-2000:]
    assert SHARD0 in result.stderr and SHARD1 in result.stderr
    # Evaluation reads each shard once, so skip mode counts the loss instead, as it promises.
    delivered, counter = read_all(digits, "skip")
    assert delivered == 0 and counter.count == 359


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_a_shard_that_ends_at_a_record_boundary_is_counted_or_refused(digits, mode):
    path = digits / SHARD1
    data = path.read_bytes()
    path.write_bytes(data[:record_offsets(data)[100][0]])  # 100 whole records of 180
    if mode == "fail":
        with pytest.raises(pipelines.CorruptShardError,
                           match=f"{SHARD1}.*100 complete records.*180"):
            read_all(digits, mode)
        return
    delivered, counter = read_all(digits, mode)
    assert delivered == 359 - 80 and counter.count == 80
    assert list(counter.shard_errors) == [str(path)]


@pytest.mark.parametrize("mode", ["skip", "fail"])
@pytest.mark.parametrize("cache", [False, True])
def test_a_zero_byte_shard_is_an_error_before_any_batch(digits, mode, cache):
    (digits / SHARD1).write_bytes(b"")
    for build in (
        lambda: pipelines.build_dataset(digits, split="test", image_size=8, batch_size=4,
                                        training=True, cache=cache, on_bad_record=mode),
        lambda: pipelines.build_dataset(str(digits / "test-*"), split="test", image_size=8,
                                        batch_size=4, training=True, on_bad_record=mode),
        lambda: pipelines.describe_source(digits, "test"),
    ):
        with pytest.raises(info_lib.EmptyShardError, match=f"{SHARD1} is empty"):
            build()


def test_a_missing_shard_is_an_error_naming_it(digits):
    (digits / SHARD0).unlink()
    with pytest.raises(pipelines.MissingFileError, match=SHARD0):
        pipelines.build_dataset(digits, split="test", image_size=8, batch_size=4)
    with pytest.raises(pipelines.MissingFileError, match=SHARD0):
        pipelines.describe_source(digits, "test")


def test_an_empty_split_is_a_named_error(digits):
    info = json.loads((digits / "dataset_info.json").read_text())
    info["splits"]["test"].update(num_examples=0, shards=[])
    (digits / "dataset_info.json").write_text(json.dumps(info))
    for call in (lambda: pipelines.build_dataset(digits, split="test", image_size=8, batch_size=4),
                 lambda: pipelines.describe_source(digits, "test")):
        with pytest.raises(pipelines.UserError, match="Split 'test' of .* is empty"):
            call()


@pytest.mark.parametrize("name", ["batch_size", "image_size"])
def test_batch_and_image_size_must_be_positive(digits, name):
    kwargs = {"image_size": 8, "batch_size": 4, name: 0}
    with pytest.raises(pipelines.UserError, match=f"{name} must be an integer >= 1"):
        pipelines.build_dataset(digits, split="test", **kwargs)


def _dead_pid():
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    return int(finished.stdout)


def test_a_leftover_temporary_shard_is_not_read_and_the_next_run_removes_it(digits):
    dead = _dead_pid()
    leftovers = [digits / f"{SHARD0}.tmp-{dead}-1", digits / f".{SHARD0}.tmp-{dead}"]
    for leftover in leftovers:  # the old naming (matched by test-*) and the hidden one
        shutil.copy(digits / SHARD0, leftover)
    no_info = digits.parent / "no_info"
    shutil.copytree(digits, no_info)
    (no_info / "dataset_info.json").unlink()
    for source in (digits, no_info, str(digits / "test-*")):
        assert read_all(source, "skip")[0] == 359
    pipelines.convert("digits:", digits, split="test", num_shards=2, verbose=False)
    assert not any(leftover.exists() for leftover in leftovers)
    assert sorted(os.listdir(digits)) == ["dataset_info.json", SHARD0, SHARD1]


def test_a_running_conversions_temporaries_and_other_splits_shards_are_kept(tmp_path):
    out = tmp_path / "out"
    pipelines.convert("digits:", out, split="test", num_shards=2, verbose=False)
    # A split whose name starts like "test-": the stale-shard clean-up of "test" is not for it.
    other = out / "test-hard-00000-of-00001.tfrecord"
    shutil.copy(out / SHARD0, other)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as writer:
        try:
            running = out / f".{SHARD0}.tmp-{writer.pid}"
            shutil.copy(out / SHARD0, running)
            pipelines.convert("digits:", out, split="test", num_shards=1, verbose=False)
            assert running.exists() and other.exists()
        finally:
            writer.kill()
    assert not (out / SHARD1).exists()  # the earlier conversion's second shard is stale


# ----------------------------------------------------------------------------- evaluate


def run_evaluate(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture
def zero_head_model(tmp_path):
    import keras_vit

    model = keras_vit.create_model(keras_vit.ViTConfig(4, 16, 1, 2, 16), image_size=8,
                                   num_classes=10)
    path = tmp_path / "model.keras"
    model.save(path)
    return path


@pytest.mark.slow
def test_evaluate_mismatch_is_an_error_unless_skip(digits, zero_head_model):
    flip_byte(digits / SHARD1, 3, "payload")
    common = [f"--checkpoint={zero_head_model}", f"--data={digits}", "--batch_size=64"]
    failed = run_evaluate(*common)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert f"split 'test': TFRecord shard {digits / SHARD1} ended after 3" in failed.stderr
    # A count mismatch the pipeline cannot see (the json's total disagrees with its shards).
    flip_byte(digits / SHARD1, 3, "payload")  # flip back: the shards are sound again
    info = json.loads((digits / "dataset_info.json").read_text())
    info["splits"]["test"]["num_examples"] = 360
    (digits / "dataset_info.json").write_text(json.dumps(info))
    failed = run_evaluate(*common)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert f"Evaluated 359 examples but {digits} lists 360 for split 'test'" in failed.stderr
    skipped = run_evaluate(*common, "--on_bad_record=skip")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "Evaluated 359 examples but" in skipped.stderr


@pytest.mark.slow
def test_evaluate_batch_size_must_be_positive(digits):
    result = run_evaluate("--checkpoint=unused.keras", f"--data={digits}", "--batch_size=0")
    assert result.returncode == 1 and "--batch_size must be >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("settings", [{"num_shards": -1, "num_workers": 1}, {"num_shards": 0},
                                      {"num_workers": 0}, {"num_workers": -2}])
def test_bad_settings_are_refused_before_anything_is_touched(digits, settings):
    before = {name: (digits / name).read_bytes() for name in os.listdir(digits)}
    name = next(iter(settings)) if len(settings) == 1 else "num_shards"
    with pytest.raises(pipelines.UserError, match=f"{name} must be an integer >= 1"):
        pipelines.convert("digits:", digits, split="test", verbose=False, **settings)
    assert {name: (digits / name).read_bytes() for name in os.listdir(digits)} == before


def test_convert_cli_refuses_negative_num_shards(digits):
    before = (digits / "dataset_info.json").read_bytes()
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_data.py"), "--source=digits:",
         f"--output_dir={digits}", "--split=test", "--num_shards=-1", "--num_workers=1"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and "num_shards must be an integer >= 1" in result.stderr
    assert (digits / "dataset_info.json").read_bytes() == before
    assert sorted(os.listdir(digits)) == ["dataset_info.json", SHARD0, SHARD1]


def image_bytes(fmt, size=(24, 16)):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root, files):
    for rel, data in files.items():
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), os.fsencode(rel))))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return f"folder:{root}"


@pytest.mark.parametrize("fmt, name", [("JPEG", "cut.jpg"), ("PNG", "cut.png")])
def test_a_truncated_image_is_refused_naming_it_and_earlier_shards_stay(tmp_path, fmt, name):
    data = image_bytes(fmt, (64, 48))
    good = {"a/1.png": image_bytes("PNG"), "b/2.jpg": image_bytes("JPEG")}
    source = make_folder(tmp_path / "src", good)
    out = tmp_path / "out"
    pipelines.convert(source, out, split="test", num_shards=2, verbose=False)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    # Truth: PIL's header parse accepts the file; only a full decode sees the truncation.
    truncated = data[: len(data) * 2 // 3]
    with Image.open(io.BytesIO(truncated)) as image:
        assert image.size == (64, 48)
    (tmp_path / "src" / "b" / name).write_bytes(truncated)
    with pytest.raises(sources.CorruptSourceError,
                       match=f"{name}: not a readable image, or truncated"):
        pipelines.convert(source, out, split="test", num_shards=2, verbose=False)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def png_claiming_size(width, height):
    """A small PNG whose header claims `width` x `height` (IHDR patched, CRC recomputed)."""
    data = bytearray(image_bytes("PNG", (4, 4)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL opening it
def test_an_oversized_image_is_refused_from_its_header(tmp_path):
    # 30000 x 20000 = 600M pixels claimed (1.8 GB decoded) by a file of ~100 bytes.
    source = make_folder(tmp_path / "src", {"a/huge.png": png_claiming_size(30000, 20000)})
    with pytest.raises(sources.ImageTooLargeError, match="huge.png"):
        pipelines.convert(source, tmp_path / "out", split="test", verbose=False)
    assert not (tmp_path / "out" / "dataset_info.json").exists()
    # The stated rule: more than max_image_pixels (width x height) is refused.
    source = make_folder(tmp_path / "src2", {"a/img.png": image_bytes("PNG", (24, 16))})
    with pytest.raises(sources.ImageTooLargeError,
                       match=r"24 x 16 = 384 pixels .*max_image_pixels=383"):
        pipelines.convert(source, tmp_path / "out2", split="test", max_image_pixels=383,
                          verbose=False)
    info = pipelines.convert(source, tmp_path / "out2", split="test", max_image_pixels=384,
                             verbose=False)
    assert info["splits"]["test"]["num_examples"] == 1
    # The default limit is PIL's (89,478,485 pixels): 9459 x 9460 is just over it.
    source = make_folder(tmp_path / "src3", {"a/big.png": png_claiming_size(9459, 9460)})
    with pytest.raises(sources.ImageTooLargeError, match="big.png"):
        pipelines.convert(source, tmp_path / "out3", split="test", verbose=False)


def test_a_non_utf8_file_name_is_kept_and_a_non_utf8_class_is_named(tmp_path):
    source = make_folder(tmp_path / "src", {b"a/caf\xe9.png": image_bytes("PNG")})
    pipelines.convert(source, tmp_path / "out", split="test", verbose=False)
    shard = next(p for p in (tmp_path / "out").iterdir() if p.suffix == ".tfrecord")
    (record,) = [records.decode_example_py(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
    assert record[records.FILENAME] == b"a/caf\xe9.png"
    source = make_folder(tmp_path / "src2", {b"caf\xe9/1.png": image_bytes("PNG")})
    with pytest.raises(pipelines.UserError,
                       match=r"class folder name 'caf\\udce9' is not valid UTF-8"):
        pipelines.convert(source, tmp_path / "out2", split="test", verbose=False)


def cifar_tar(path, members):
    """A cifar-10-python-like .tar.gz; `members`: name -> bytes, or ("symlink", target)."""
    import pickle

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        meta = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
        for name, data in {"batches.meta": meta, **members}.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_symlink_member_in_a_cifar_tar_is_named(tmp_path):
    path = cifar_tar(tmp_path / "c.tar.gz", {"test_batch": ("symlink", "/etc/passwd")})
    with pytest.raises(sources.CorruptSourceError,
                       match=r"cifar-10-batches-py/test_batch is a link to '/etc/passwd'"):
        pipelines.convert(f"cifar10:{path}", tmp_path / "out", split="test", verbose=False)
    assert not (tmp_path / "out").exists()


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read in chunks (so the test never holds the bomb's content)."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@pytest.mark.slow
def test_a_decompression_bomb_fails_with_bounded_memory(tmp_path):
    size = 2 * sources.MAX_MEMBER_BYTES  # 512 MiB of zeros, ~0.5 MB compressed
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = 0
        tar.addfile(info, io.BytesIO())
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
    assert path.stat().st_size < size // 100
    script = textwrap.dedent(f"""
        from pipelines import sources

        def peak_kib():
            # VmHWM: this process's own peak. ru_maxrss would also count the parent's peak
            # before exec (Linux keeps it across execve), hiding any growth here.
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

        before = peak_kib()
        try:
            sources.open_source("cifar10:{path}", "test")
        except sources.CorruptSourceError as error:
            print("refused:", error)
        print("grew_kib", peak_kib() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "test_batch: 536,870,912 bytes" in result.stdout
    grew_kib = int(result.stdout.split("grew_kib")[1])
    assert grew_kib < 64 * 1024, result.stdout  # far below the 512 MiB the member holds


def test_another_dataset_into_the_same_directory_is_refused_before_any_shard_is_written(digits):
    before = {name: (digits / name).read_bytes() for name in os.listdir(digits)}
    source = make_folder(digits.parent / "src", {"a/1.png": image_bytes("PNG"),
                                                 "b/2.png": image_bytes("PNG")})
    with pytest.raises(pipelines.UserError, match="already lists class names"):
        pipelines.convert(source, digits, split="test", num_shards=2, verbose=False)
    assert {name: (digits / name).read_bytes() for name in os.listdir(digits)} == before
