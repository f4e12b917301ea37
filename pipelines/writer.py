"""`convert`: write an `ImageSource` as TFRecord shards plus `dataset_info.json`.

Shard `k` of `n` holds examples `[k*N//n, (k+1)*N//n)` of the source's fixed order, so the
output is byte-identical for the same input whatever the number of workers. Each shard is written
to a temporary name and renamed when complete; if any shard fails, the shards of this run are
removed and no dataset_info.json is written.
"""

from __future__ import annotations

import concurrent.futures
import glob
import math
import os
import threading
import time

import tensorflow as tf
from absl import logging

from pipelines import info as info_lib
from pipelines import records, sources

#: Default shard size: ImageNet's 1.28M training images give Model Garden's 1024 shards.
EXAMPLES_PER_SHARD = 1250


def _write_shard(source, path, start, stop, label_offset, progress):
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    count = 0
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in source.read(start, stop):
                writer.write(
                    records.encode_example(
                        record.image_bytes,
                        image_format=record.image_format,
                        label=record.label + label_offset,
                        height=record.height,
                        width=record.width,
                        class_text=source.class_names[record.label],
                        filename=record.filename,
                    )
                )
                count += 1
                progress(1)
        if count != stop - start:
            raise RuntimeError(f"{path}: expected {stop - start} examples, read {count}.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def convert(
    source: str,
    output_dir: str,
    *,
    split: str = "train",
    num_shards: int | None = None,
    num_workers: int | None = None,
    tfds_data_dir: str | None = None,
    label_offset: int = 0,
    class_index: str | None = None,
    verbose: bool = True,
) -> dict:
    """Converts `source` (`folder:PATH`, `cifar10:PATH`, `cifar100:PATH`, `tfds:NAME`, `digits:`).

    Writes `output_dir/{split}-{i:05d}-of-{n:05d}.tfrecord` and merges the split into
    `output_dir/dataset_info.json`.

    Args:
      source: `KIND:PATH`, see `pipelines.sources`.
      output_dir: created if needed; may already hold other splits.
      split: `"train"` or `"test"` (any split name for tfds).
      num_shards: default `ceil(num_examples / 1250)`.
      num_workers: threads writing shards in parallel; default `min(num_shards, cpu count)`.
      tfds_data_dir: where prepared TFDS datasets live.
      label_offset: added to the 0-based class index in every record (1 gives Model Garden's
        1-based ImageNet labels); recorded in dataset_info.json.
      class_index: for `folder:`, a JSON mapping folder names to class indices (Keras'
        `imagenet_class_index.json` or a list of names); default: sorted folder names.
      verbose: show a progress bar.

    Returns:
      The merged dataset_info dict that was written.
    """
    src = sources.open_source(source, split, tfds_data_dir=tfds_data_dir, class_index=class_index)
    n = src.num_examples
    if n == 0:
        raise ValueError(f"{source}: the '{split}' split has no examples.")
    num_shards = num_shards or math.ceil(n / EXAMPLES_PER_SHARD)
    if num_shards > n:
        logging.warning("Only %d examples: writing %d shards instead of %d.", n, n, num_shards)
        num_shards = n
    num_workers = num_workers or min(num_shards, os.cpu_count() or 1)
    os.makedirs(output_dir, exist_ok=True)
    bounds = [(k * n // num_shards, (k + 1) * n // num_shards) for k in range(num_shards)]
    names = [info_lib.shard_name(split, k, num_shards) for k in range(num_shards)]
    paths = [os.path.join(output_dir, name) for name in names]

    lock = threading.Lock()
    done = [0]

    def progress(k):
        with lock:
            done[0] += k

    logging.info("Converting %s (%s, %d examples) into %d shards in %s with %d workers.",
                 source, split, n, num_shards, output_dir, num_workers)
    bar = None
    if verbose:
        import keras

        bar = keras.utils.Progbar(n, unit_name="image", stateful_metrics=["images/s"])
    start_time = time.time()
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        futures = [
            pool.submit(_write_shard, src, path, a, b, label_offset, progress)
            for path, (a, b) in zip(paths, bounds)
        ]
        pending = set(futures)
        try:
            while pending:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=1.0, return_when=concurrent.futures.FIRST_EXCEPTION
                )
                for future in finished:
                    future.result()  # re-raises a shard's error
                rate = done[0] / max(time.time() - start_time, 1e-6)
                if bar is not None:
                    bar.update(done[0], values=[("images/s", rate)])
        except BaseException:
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            for path in paths:
                if os.path.exists(path):
                    os.remove(path)
            logging.error("Conversion of %s failed; removed this run's %s shards.", source, split)
            raise
    elapsed = time.time() - start_time
    logging.info("Wrote %d images in %.1f s (%.0f images/s).", n, elapsed, n / max(elapsed, 1e-6))

    for stale in sorted(glob.glob(os.path.join(output_dir, f"{split}-*-of-*.tfrecord"))):
        if os.path.basename(stale) not in names:
            logging.warning("Removing stale shard %s from an earlier conversion.", stale)
            os.remove(stale)

    split_info = {
        "num_examples": n,
        "source": src.source,
        "shards": [{"file": name, "num_examples": b - a} for name, (a, b) in zip(names, bounds)],
    }
    common = {
        "source": src.source,
        "class_names": src.class_names,
        "num_classes": len(src.class_names),
        "label_offset": label_offset,
    }
    return info_lib.write_dataset_info(output_dir, split, split_info, common)
