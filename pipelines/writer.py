"""`convert`: write an `ImageSource` as TFRecord shards plus `dataset_info.json`.

Shard `k` of `n` holds examples `[k*N//n, (k+1)*N//n)` of the source's fixed order, so the
output is byte-identical for the same input whatever the number of workers. Settings are checked
before the output directory is touched. Each shard is written to a hidden temporary name
(`.{shard}.tmp-{pid}`, which no `{split}-*` pattern matches); only when every shard is complete
are they renamed into place, so a run that fails or is killed while writing leaves the shards of
an earlier run and its dataset_info.json as they were. The renames themselves are not one atomic
step: a kill among them (milliseconds) leaves shards whose counts disagree with
dataset_info.json, which the reader then reports as broken until the split is converted again.
The next run of the split removes the temporaries of a killed run (those whose process is gone).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import math
import os
import re
import threading
import time

import tensorflow as tf
from absl import logging

from pipelines import info as info_lib
from pipelines import records, sources
from pipelines.errors import UserError

#: Default shard size: ImageNet's 1.28M training images give Model Garden's 1024 shards.
EXAMPLES_PER_SHARD = 1250


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One output shard: examples `[start, stop)` of the source, written to `path`."""

    name: str
    path: str
    start: int
    stop: int


def _check_at_least_one(name, value) -> None:
    """`value` is None (the default) or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(
            f"{name} must be an integer >= 1 (or unset for the default), got {value!r}; nothing "
            "was written.")


def _plan_shards(output_dir, split, num_examples, num_shards) -> list[_Shard]:
    """Shard `k` of `n` gets examples `[k*N//n, (k+1)*N//n)`; `n` defaults to `ceil(N / 1250)`.

    Args:
        output_dir: where the shards go.
        split: the shard name prefix.
        num_examples: N, the source's number of examples (> 0).
        num_shards: n, or None for the default; more shards than examples become one per example.

    Returns:
        The shards in order.
    """
    n = num_examples
    num_shards = math.ceil(n / EXAMPLES_PER_SHARD) if num_shards is None else num_shards
    if num_shards > n:
        logging.warning("Only %d examples: writing %d shards instead of %d.", n, n, num_shards)
        num_shards = n
    names = [info_lib.shard_name(split, k, num_shards) for k in range(num_shards)]
    return [
        _Shard(name, os.path.join(output_dir, name), k * n // num_shards, (k + 1) * n // num_shards)
        for k, name in enumerate(names)
    ]


class _Progress:
    """Images written so far, counted from the writer threads; a progress bar when verbose."""

    def __init__(self, total: int, verbose: bool):
        self._lock = threading.Lock()
        self._done = 0
        self._bar = None
        if verbose:
            import keras

            self._bar = keras.utils.Progbar(total, unit_name="image", stateful_metrics=["images/s"])
        self._start_time = time.time()

    def add(self, num_images: int) -> None:
        with self._lock:
            self._done += num_images

    def show(self) -> None:
        if self._bar is not None:
            self._bar.update(self._done, values=[("images/s", self._done / self.elapsed())])

    def elapsed(self) -> float:
        """Seconds since the start, at least 1 us."""
        return max(time.time() - self._start_time, 1e-6)


def _temporary_path(shard: _Shard) -> str:
    """Where `shard` is written until every shard of the run is complete: a hidden name."""
    directory, name = os.path.split(shard.path)
    return os.path.join(directory, f".{name}{info_lib.TMP_MARKER}{os.getpid()}")


def _write_shard(source, shard: _Shard, label_offset, progress: _Progress) -> int:
    """Writes one shard to its temporary name (`_temporary_path`).

    Returns:
        The number of examples written.

    Raises:
        RuntimeError: the source yielded another number of examples than `stop - start`.
    """
    path, start, stop = shard.path, shard.start, shard.stop
    count = 0
    with tf.io.TFRecordWriter(_temporary_path(shard)) as writer:
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
            progress.add(1)
    if count != stop - start:
        raise RuntimeError(f"{path}: expected {stop - start} examples, read {count}.")
    return count


def _wait_showing_progress(futures, progress: _Progress) -> None:
    """Waits for all shard writers, updating the progress bar every second.

    Raises:
        The first error of any shard writer, as soon as it happens.
    """
    pending = set(futures)
    while pending:
        finished, pending = concurrent.futures.wait(
            pending, timeout=1.0, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        for future in finished:
            future.result()  # re-raises a shard's error
        progress.show()


def _remove_temporaries(futures, shards: list[_Shard]) -> None:
    """After a failure: stops the writers that have not started and removes this run's files."""
    for future in futures:
        future.cancel()
    concurrent.futures.wait(futures)
    for shard in shards:
        if os.path.exists(_temporary_path(shard)):
            os.remove(_temporary_path(shard))


def _write_shards(source, shards, label_offset, num_workers, progress: _Progress) -> None:
    """Writes the shards in `num_workers` threads, then renames them all into place.

    If any fails, removes this run's temporaries (the earlier shards stay) and re-raises.
    """
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        futures = [
            pool.submit(_write_shard, source, shard, label_offset, progress) for shard in shards
        ]
        try:
            _wait_showing_progress(futures, progress)
        except BaseException:
            _remove_temporaries(futures, shards)
            raise
    for shard in shards:
        os.replace(_temporary_path(shard), shard.path)


def _remove_leftover_temporaries(output_dir, split) -> None:
    """Removes the temporary shards of `split` that a killed conversion left in `output_dir`.

    Both this version's hidden `.{split}-*.tmp-*` names and the `{split}-*.tmp-*` names of
    earlier versions (which a `{split}-*` pattern matched).
    """
    for pattern in (f".{split}-*{info_lib.TMP_MARKER}*", f"{split}-*{info_lib.TMP_MARKER}*"):
        for leftover in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
            if _writer_is_running(leftover):
                continue  # another conversion of this split, still writing
            logging.warning("Removing %s, left by a conversion that did not finish.", leftover)
            os.remove(leftover)


def _writer_is_running(temporary_path) -> bool:
    """Whether the process named in a temporary shard's `.tmp-{pid}` suffix is alive here."""
    suffix = temporary_path.rsplit(info_lib.TMP_MARKER, 1)[-1]
    pid = re.match(r"\d+", suffix)
    if pid is None or int(pid.group()) == os.getpid():
        return False
    try:
        os.kill(int(pid.group()), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_stale_shards(output_dir, split, shards: list[_Shard]) -> None:
    """Removes shards of `split` from an earlier conversion with another number of shards."""
    names = {shard.name for shard in shards}
    # Exactly this split's names: the glob alone would also match a split named "{split}-more".
    own_name = re.compile(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.tfrecord")
    pattern = os.path.join(glob.escape(output_dir), f"{split}-*-of-*.tfrecord")
    for stale in sorted(glob.glob(pattern)):
        name = os.path.basename(stale)
        if own_name.fullmatch(name) and name not in names:
            logging.warning("Removing stale shard %s from an earlier conversion.", stale)
            os.remove(stale)


def _common_info(source, label_offset) -> dict:
    """The dataset_info.json entries shared by all splits."""
    return {
        "source": source.source,
        "class_names": source.class_names,
        "num_classes": len(source.class_names),
        "label_offset": label_offset,
    }


def _write_info(output_dir, split, source, shards, label_offset) -> dict:
    """Merges this split's shards and the source's classes into `output_dir/dataset_info.json`."""
    split_info = {
        "num_examples": source.num_examples,
        "source": source.source,
        "shards": [{"file": s.name, "num_examples": s.stop - s.start} for s in shards],
    }
    common = _common_info(source, label_offset)
    return info_lib.write_dataset_info(output_dir, split, split_info, common)


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
    max_image_pixels: int | None = sources.MAX_IMAGE_PIXELS,
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
        max_image_pixels: `folder:` and `tfds:` images with more pixels (width x height, read
            from the header before decoding) are refused with `sources.ImageTooLargeError`;
            default PIL's `Image.MAX_IMAGE_PIXELS` (89,478,485); None: no limit of ours.
        verbose: show a progress bar.

    Returns:
        The merged dataset_info dict that was written.

    Raises:
        UserError: `num_shards` or `num_workers` below 1 (checked before anything is read or
            written), the split has no examples, or `output_dir` holds another dataset (see
            `sources.open_source` for the errors of the source itself).
    """
    _check_at_least_one("num_shards", num_shards)
    _check_at_least_one("num_workers", num_workers)
    _check_at_least_one("max_image_pixels", max_image_pixels)
    src = sources.open_source(source, split, tfds_data_dir=tfds_data_dir, class_index=class_index,
                              max_image_pixels=max_image_pixels)
    n = src.num_examples
    if n == 0:
        raise UserError(f"{source}: the '{split}' split has no examples.")
    info_lib.check_mergeable(output_dir, split, _common_info(src, label_offset))
    shards = _plan_shards(output_dir, split, n, num_shards)
    num_workers = num_workers or min(len(shards), os.cpu_count() or 1)
    os.makedirs(output_dir, exist_ok=True)
    _remove_leftover_temporaries(output_dir, split)
    logging.info("Converting %s (%s, %d examples) into %d shards in %s with %d workers.",
                 source, split, n, len(shards), output_dir, num_workers)
    progress = _Progress(n, verbose)
    try:
        _write_shards(src, shards, label_offset, num_workers, progress)
    except BaseException:
        logging.error("Conversion of %s failed; removed this run's %s shards (earlier shards "
                      "are kept).", source, split)
        raise
    elapsed = progress.elapsed()
    logging.info("Wrote %d images in %.1f s (%.0f images/s).", n, elapsed, n / elapsed)
    _remove_stale_shards(output_dir, split, shards)
    return _write_info(output_dir, split, src, shards, label_offset)
