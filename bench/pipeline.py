r"""Input pipeline benchmark on real ImageNet photographs.

Writes JPEG shards (stored as-is) from `../shared/data/imagenet/sample_images` (or scikit-learn's
two sample images when that is absent), then measures, in one run:

  (a) decode-only: read records + full `decode_jpeg`, no augmentation;
  (b) the full training pipeline of `pipelines.build_dataset` at --image_size, with the compiled
      resize op (`pipelines.compiled_ops`) where it builds, and (b') with TensorFlow's resize;
  (c) the eval pipeline (`preprocess_for_eval`), repeated for a steady-state rate;

and prints a table with the ratio b/a. `--threads=1,2` repeats the measurements with tf.data's
thread pool limited to each size, to show how throughput scales with cores.

    python bench/pipeline.py                      # all 601 images, 224 px, 30 s per pipeline
    python bench/pipeline.py --threads=1,2 --seconds=30
"""

import os
import statistics
import tempfile
import time
from pathlib import Path

import tensorflow as tf
from absl import app, flags

import pipelines
from pipelines import compiled_ops, records

REPO = Path(__file__).resolve().parents[1]

_DATA_DIR = flags.DEFINE_string(
    "data_dir", str(REPO.parent / "shared" / "data" / "imagenet" / "sample_images"),
    "Folder of JPEGs (named <synset>_<name>.JPEG); scikit-learn's sample images when absent.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Use only the first N images (sorted).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "Shards to write.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output side of (b) and (c).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size of (b) and (c).")
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Timed seconds per pipeline, over all rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds per measurement; the median is shown.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 3, "Batches read before timing starts.")
_THREADS = flags.DEFINE_list("threads", ["0"], "tf.data thread pool sizes to try; 0 = default.")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where to write shards (default: a temp dir).")


def _source_folder(work_dir: Path) -> Path:
    """A class-folder tree of symlinks to the benchmark JPEGs."""
    data_dir = Path(_DATA_DIR.value)
    if data_dir.is_dir():
        files = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    else:
        from sklearn.datasets import _base

        images = Path(_base.__file__).parent / "images"
        files = sorted(images.glob("*.jpg"))
        print(f"{data_dir} is absent; using scikit-learn's sample images {[f.name for f in files]}")
    if _NUM_IMAGES.value:
        files = files[: _NUM_IMAGES.value]
    root = work_dir / "images"
    for f in files:
        folder = root / f.name.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), folder / f.name)
    return root


def _with_threads(ds, threads):
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        ds = ds.with_options(options)
    return ds


def decode_only(shards, threads):
    """(a): read + parse + full decode_jpeg, repeated; yields image shapes in batches."""
    files = tf.data.Dataset.from_tensor_slices(shards).repeat()
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=len(shards),
                          num_parallel_calls=tf.data.AUTOTUNE)

    def decode(serialized):
        image = tf.io.decode_jpeg(records.parse_example(serialized)[records.IMAGE_ENCODED], channels=3)
        return tf.shape(image)

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(_BATCH_SIZE.value)
    return _with_threads(ds.prefetch(tf.data.AUTOTUNE), threads)


def measure(make_dataset, seconds):
    """Images/s of iterating `make_dataset()` for `seconds` after a warm-up."""
    ds = make_dataset()
    it = iter(ds)
    for _ in range(_WARMUP.value):
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        count += int(tf.shape(tf.nest.flatten(batch)[0])[0])
    return count / (time.perf_counter() - start)


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(_WORK_DIR.value or tmp)
        root = _source_folder(work_dir)
        out = work_dir / "shards"
        start = time.perf_counter()
        info = pipelines.convert(f"folder:{root}", out, split="train",
                                 num_shards=_NUM_SHARDS.value, verbose=False)
        num_images = info["splits"]["train"]["num_examples"]
        print(f"wrote {num_images} JPEGs into {len(info['splits']['train']['shards'])} shards "
              f"in {time.perf_counter() - start:.1f} s")
        shards = [str(out / s["file"]) for s in info["splits"]["train"]["shards"]]
        size, batch = _IMAGE_SIZE.value, _BATCH_SIZE.value
        compiled = compiled_ops.load_resize_op() is not None
        train = lambda t, kernel: _with_threads(pipelines.build_dataset(  # noqa: E731
            out, split="train", image_size=size, batch_size=batch,
            shuffle_buffer=min(num_images, 1000), resize_kernel=kernel), t)
        pipelines_to_time = {
            "a": lambda t: decode_only(shards, t),
            "b": lambda t: train(t, "auto"),
            "b_tf": lambda t: train(t, "tensorflow"),
            "c": lambda t: _with_threads(pipelines.build_dataset(
                out, split="train", training=False, repeat=True, image_size=size,
                batch_size=batch), t),
        }
        rows = []
        for threads in [int(t) for t in _THREADS.value]:
            # Rounds alternate the pipelines so that load from other processes hits all three alike.
            rates = {name: [] for name in pipelines_to_time}
            for _ in range(_ROUNDS.value):
                for name, make in pipelines_to_time.items():
                    rates[name].append(measure(lambda: make(threads), _SECONDS.value / _ROUNDS.value))
            a, b, b_tf, c = (statistics.median(rates[name]) for name in pipelines_to_time)
            rows.append((threads or os.cpu_count(), a, b, b_tf, c))
        print(f"\ninput pipeline, {num_images} JPEGs, {size}px, batch {batch}, {os.cpu_count()} CPUs, "
              f"median of {_ROUNDS.value} rounds, load average {os.getloadavg()[0]:.2f} (1 min)")
        print(f"(b) resizes with {'the compiled op' if compiled else 'TensorFlow (no compiled op)'};"
              " (b') with TensorFlow's Cast + Reverse + ResizeBilinear")
        print("| threads | (a) decode-only img/s | (b) train img/s | (b') train, TF resize img/s "
              "| (c) eval img/s | b/a | b'/a |")
        print("|---|---|---|---|---|---|---|")
        for threads, a, b, b_tf, c in rows:
            print(f"| {threads} | {a:.0f} | {b:.0f} | {b_tf:.0f} | {c:.0f} | {b / a:.2f} "
                  f"| {b_tf / a:.2f} |")


if __name__ == "__main__":
    app.run(main)
