"""`build_dataset`: the tf.data input pipeline for training and evaluation.

The pipeline is a chain of named stages, each a function below, in this order:

1. source records: the shard files of this input pipeline (`_tfrecord_source`) or a TFDS split
   (`_tfds_source`), then cache, record shuffle and repeat (`_shuffle_and_repeat`). Training
   shuffles and repeats the file list and interleaves the files; evaluation reads every example
   exactly once, in the order of the (sorted) shards and of the records within them.
2. parse and decode (`_decode_records`): training delivers each record `aug_repeats` times in a
   row (`_repeat_each_record`), gives each copy its augmentation seed, decodes an Inception crop
   (only the crop window of a JPEG) and draws the flip; evaluation and `augment="none"` run
   `preprocess.decode_for_eval`. Bad records are skipped and counted (`_skip_bad_records`) or
   raise naming the shard (`_fail_on_bad_records`); see `BadRecordCounter`.
3. augment and batch (`_resize_and_batch`): resize and flip (one compiled op, see
   `compiled_ops`), optional RandAugment, optional random erasing (`pipelines.erasing`), fused
   with the batching.
4. batch checks (`_check_labels`, `_fixed_batch_shape`, `_mix`): labels in range, fixed-shape
   training batches, optional mixup / CutMix (`pipelines.mixing`).
5. options and prefetch (`_with_options_and_prefetch`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import operator
import os
import struct

import tensorflow as tf
from absl import logging

from pipelines import augment as augment_lib, compiled_ops, erasing, info as info_lib, mixing
from pipelines import preprocess, records
from pipelines.errors import UserError
from pipelines.info import EmptyShardError
from pipelines.positions import DroppedPositions

AUTOTUNE = tf.data.AUTOTUNE
_BAD_RECORD_MODES = ("skip", "fail")
#: `augment=`: the Inception crop + flip of the ViT paper, or the eval preprocessing (for data
#: whose labels a crop or a flip changes, such as digits).
AUGMENT_MODES = ("inception_crop", "none")


class CorruptShardError(UserError):
    """A TFRecord shard is truncated or its record framing is corrupt."""


class BadRecordCounter:
    """Counts the records a pipeline skipped (`on_bad_record="skip"`).

    Pass one to `build_dataset(bad_record_counter=...)` and read it while or after iterating.
    Three kinds of bad data are counted:
    * broken shards (truncated file, corrupt record framing, fewer records than
      dataset_info.json lists), found when the pipeline is built; the complete records before
      the break are still read.
    * shards that end early while being read: a record whose CRC does not match ends its shard
      (TFRecord readers cannot resynchronize); the records of the shard that were not delivered
      are counted against the shard's count (dataset_info.json, else the framing scan).
    * records whose Example cannot be parsed or whose image cannot be decoded; each is logged
      (absl/TF warning with the shard's file name) and counted as `seen - delivered`.
    The first two are listed, per shard, in `shard_errors`.

    `count` is exact once an iterator is exhausted (eval); while training it may lag by the
    records in flight inside the parallel decode and by the shards being read.
    """

    def __init__(self):
        with tf.init_scope(), tf.device("/cpu:0"):
            self._seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="records_seen")
            self._delivered = tf.Variable(0, dtype=tf.int64, trainable=False, name="records_ok")
        self._build_errors: dict[str, tuple[str, int]] = {}
        self._tallies: list[_ShardTally] = []

    def add_shard_error(self, path: str, message: str, num_lost: int) -> None:
        """Records that `num_lost` records of the shard at `path` are unreadable, and why."""
        self._build_errors[path] = (message, num_lost)

    @property
    def shard_errors(self) -> dict[str, tuple[str, int]]:
        """Broken shard path -> (what is wrong, number of its records not delivered)."""
        errors = dict(self._build_errors)
        for tally in self._tallies:
            for path, (message, num_lost) in tally.shortfalls().items():
                if path in errors:
                    message, num_lost = f"{errors[path][0]}; {message}", errors[path][1] + num_lost
                errors[path] = (message, num_lost)
        return errors

    @property
    def num_bad_records(self) -> int:
        """Records that were read but whose Example did not parse or image did not decode."""
        return int(self._seen.numpy() - self._delivered.numpy())

    @property
    def count(self) -> int:
        """Total skipped records: undecodable records plus records lost in broken shards."""
        return self.num_bad_records + sum(n for _, n in self.shard_errors.values())

    def _new_tally(self, files, expected) -> _ShardTally:
        tally = _ShardTally(list(files), list(expected))
        self._tallies.append(tally)
        return tally

    def _mark_seen(self):
        return self._seen.assign_add(1, read_value=False)

    def _mark_delivered(self, num_records):
        return self._delivered.assign_add(tf.cast(num_records, tf.int64), read_value=False)


class _ShardTally:
    """Per shard of one pipeline: records read, complete passes, and the records a pass holds.

    A pass over a shard that delivers fewer than `expected` records ended early (a corrupt
    record); `shortfalls` counts the difference.
    """

    def __init__(self, files: list[str], expected: list[int]):
        self.files = files
        self.expected = expected  # records one pass delivers; -1: unknown
        with tf.init_scope(), tf.device("/cpu:0"):
            self.read = tf.Variable(tf.zeros([len(files)], tf.int64), trainable=False,
                                    name="shard_records_read")
            self.passes = tf.Variable(tf.zeros([len(files)], tf.int64), trainable=False,
                                      name="shard_passes")

    def shortfalls(self) -> dict[str, tuple[str, int]]:
        """Shard path -> (message, records not delivered) for the shards that ended early."""
        read, passes = self.read.numpy(), self.passes.numpy()
        out = {}
        for path, expected, num_read, num_passes in zip(self.files, self.expected, read, passes):
            lost = int(num_passes * expected - num_read)
            if expected >= 0 and num_passes and lost > 0:
                out[path] = (
                    f"a corrupt record (CRC mismatch) or a read error ended the shard early: "
                    f"{int(num_read)} "
                    f"records read in {int(num_passes)} pass(es) of {expected}", lost)
        return out

    def count_read(self, index):
        """Op: one more record read from shard `index` (int64 scalar)."""
        return _scatter_add_one(self.read, index)

    def count_pass(self, index):
        """Op: one more complete pass over shard `index` (int64 scalar)."""
        return _scatter_add_one(self.passes, index)


def _scatter_add_one(variable, index):
    return variable.scatter_add(tf.IndexedSlices(tf.ones([1], tf.int64), tf.reshape(index, [1])))


@dataclasses.dataclass(frozen=True)
class _RecordOrder:
    """Which records a pipeline reads, in what order and how often (resolved arguments)."""

    training: bool  # shuffle files and records; fixed-size batches
    deterministic: bool  # as passed to `build_dataset`
    seed: int | None
    repeat_count: int | None  # None: once; -1: forever; n: n times
    shuffle_buffer: int
    cache: bool
    skip_examples: int  # of the delivered stream (copies), before decoding (a resumed run)
    aug_repeats: int = 1  # copies of each record, delivered in a row (training)

    @property
    def is_fixed(self) -> bool:
        """Do parallel stages keep their input order? Deterministic runs, evaluation, and
        repeated augmentation (which needs the copies of a record to stay in one batch)."""
        return bool(self.deterministic or not self.training or self.aug_repeats > 1)


@dataclasses.dataclass(frozen=True)
class _BadRecordPolicy:
    """What happens to broken shards and undecodable records (`on_bad_record`)."""

    mode: str  # "skip": log, count in `counter` and go on; "fail": raise naming the shard
    counter: BadRecordCounter
    check_shards: bool  # walk each shard's record framing when the pipeline is built
    dropped: DroppedPositions | None = None  # skip mode, fixed order: where records were dropped


@dataclasses.dataclass(frozen=True)
class _Augmentation:
    """How one decoded record becomes a model input (resolved arguments)."""

    mode: str  # "inception_crop", or "none" for the eval preprocessing
    image_size: int
    central_crop_fraction: float | None
    resize_kernel: str
    randaugment: str | None  # "num_layers,magnitude"; None when not training
    crop_sampler: str = "tensorflow"  # augment.CROP_SAMPLERS
    crop_area_range: tuple[float, float] = augment_lib.AREA_RANGE
    erase: erasing.ErasingSettings = erasing.ErasingSettings()  # off unless training


@dataclasses.dataclass(frozen=True)
class _Batching:
    """How records are batched and what the labels must be (resolved arguments)."""

    batch_size: int
    num_classes: int | None
    label_offset: int
    fixed_shape: bool  # drop a partial batch and declare the batch dimension (training)
    mix: mixing.MixingSettings  # mixup / CutMix; off unless training


# ----------------------------------------------------------------------------- 1. source records


def shard_files(files: list[str], input_context) -> list[str]:
    """The files of one input pipeline: `files[pipeline_id::num_pipelines]` (all when no context)."""
    if input_context is None or input_context.num_input_pipelines <= 1:
        return list(files)
    return list(files[input_context.input_pipeline_id :: input_context.num_input_pipelines])


def _files_of_pipeline(all_files, input_context):
    """The files one input pipeline reads, and whether it must shard by record instead.

    With fewer files than input pipelines every pipeline reads all files and keeps every n-th
    record.

    Returns:
        `(files to read, the input context to shard the records by, or None)`.
    """
    if input_context is None or input_context.num_input_pipelines <= len(all_files):
        return shard_files(all_files, input_context), None
    num_pipelines = input_context.num_input_pipelines
    logging.warning(
        "%d shards for %d input pipelines: every pipeline reads all files and keeps every "
        "%d-th record. Convert with --num_shards >= %d to shard by file.",
        len(all_files), num_pipelines, num_pipelines, num_pipelines)
    return list(all_files), input_context


def scan_shard(path: str) -> tuple[int, str | None]:
    """Walks a TFRecord file's record framing without reading the payloads.

    Record layout: uint64 length, uint32 crc, `length` bytes, uint32 crc.

    Args:
        path: a local or remote (`scheme://`) TFRecord file.

    Returns:
        `(number of complete records, None)` for a sound file, else `(records before the break,
        what is wrong)`.
    """
    size = tf.io.gfile.stat(path).length
    count = pos = 0
    # Local files: unbuffered reads of the 8-byte headers only (see docs/data.md, 'Bad data').
    remote = "://" in path
    with (tf.io.gfile.GFile(path, "rb") if remote else open(path, "rb", buffering=0)) as f:
        while pos < size:
            if pos + 12 > size:
                return count, f"truncated record header at byte {pos} of {size}"
            f.seek(pos)
            (length,) = struct.unpack("<Q", f.read(8))
            end = pos + 12 + length + 4
            if end > size:
                return count, (
                    f"record {count} at byte {pos} claims {length} bytes but the file ends at "
                    f"byte {size} (truncated or corrupt)"
                )
            pos = end
            count += 1
    return count, None


def _shard_problem(path, num_ok, error, recorded):
    """What is wrong with a scanned shard, or None: broken framing, or fewer records than listed."""
    if error is not None or recorded is None:
        return error
    if num_ok < recorded:
        return (f"it holds {num_ok} complete records but {info_lib.INFO_FILENAME} lists "
                f"{recorded} (the shard ends early)")
    if num_ok > recorded:
        logging.warning("Shard %s holds %d records, %s lists %d; reading all of them.",
                        path, num_ok, info_lib.INFO_FILENAME, recorded)
    return None


def _check_shards(files, counts, policy: _BadRecordPolicy, num_threads=8):
    """Scans the shards for broken framing and applies `policy` to the broken ones.

    Args:
        files: shard paths.
        counts: path -> the number of records `dataset_info.json` records for it (may be partial).
        policy: "fail" raises; "skip" logs and counts the lost records in `policy.counter`.

    Returns:
        `(limits, expected)`: per file, how many records to read (-1 for all, else the complete
        records before the break) and how many a pass over it must deliver.

    Raises:
        CorruptShardError: a shard is broken or shorter than listed and `policy.mode` is "fail".
        EmptyShardError: no shard of this pipeline has a readable record.
    """
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        scans = list(pool.map(scan_shard, files))
    limits, expected = [], []
    for path, (num_ok, error) in zip(files, scans):
        error = _shard_problem(path, num_ok, error, counts.get(path))
        expected.append(num_ok)
        if error is None:
            limits.append(-1)
            continue
        if policy.mode == "fail":
            raise CorruptShardError(
                f"TFRecord shard {path} is broken after {num_ok} complete records: {error}. "
                "Re-create it with tools/convert_data.py, or pass on_bad_record='skip' to read "
                "the complete records and count the rest as skipped."
            )
        num_lost = max(counts.get(path, num_ok + 1) - num_ok, 1)
        logging.warning("Skipping %d record(s) of broken shard %s (%s); reading its first %d.",
                        num_lost, path, error, num_ok)
        policy.counter.add_shard_error(path, error, num_lost)
        limits.append(num_ok)
    if not any(expected):
        raise EmptyShardError(
            f"None of the {len(files)} shards {files[:3]}... has a readable record; re-create "
            "them with tools/convert_data.py.")
    return limits, expected


def _repeat(ds, count):
    """`count`: None = once, -1 = forever, n = n times."""
    return ds if count is None else ds.repeat(None if count < 0 else count)


def _read_shard(path, limit, index, expected, *, tally: _ShardTally, fail: bool):
    """The first `limit` (-1: all) records of one shard, each as `(serialized Example, path)`.

    A corrupt record (CRC mismatch) ends its shard: a TFRecord reader cannot find the next
    record, and its `DataLossError` does not name the file. So the error is dropped here, each
    record read is counted in `tally` (shard `index`), and at the end of the shard
    `_end_of_shard` counts the pass, which lets `tally` count the `expected` records that were
    not delivered (skip mode) or raises naming the shard (fail mode).
    """

    def counted(record):
        with tf.control_dependencies([tally.count_read(index)]):
            return tf.identity(record), path

    records = _map_inline(tf.data.TFRecordDataset(path, buffer_size=8 << 20).take(limit), counted)
    end = functools.partial(_end_of_shard, path=path, index=index, expected=expected,
                            tally=tally, fail=fail)
    marker = tf.data.Dataset.from_tensors((tf.constant(""), path)).map(end).filter(_never)
    return records.ignore_errors().concatenate(marker)


def _map_inline(ds, fn):
    """`ds.map(fn)`, run on the calling thread (a single-threaded executor).

    For a function as small as a counter update, handing each call to the inter-op pool costs
    several times what the update itself does (docs/data.md, "Bad data"). `tf.data.Dataset.map`
    does not expose the switch, so this uses tf.data's own `_MapDataset` where it exists.
    """
    try:
        from tensorflow.python.data.ops import map_op

        return map_op._MapDataset(ds, fn, use_inter_op_parallelism=False, preserve_cardinality=True)
    except (ImportError, AttributeError, TypeError):
        return ds.map(fn)


def _never(*_):
    return tf.constant(False)


def _nothing_readable(tally: _ShardTally) -> tf.Tensor:
    """Bool scalar: every shard of the pipeline was read to its end and none gave a record.

    Skip mode drops a shard's rest at a corrupt record; when that is every shard's first
    record, a repeated training pass would cycle over the files forever without a batch.
    """
    every_shard_passed = tf.reduce_all(tally.passes.read_value() >= 1)
    return tf.logical_and(every_shard_passed, tf.equal(tf.reduce_sum(tally.read.read_value()), 0))


def _files_while_readable(ds, tally: _ShardTally):
    """The file stream, ended once `_nothing_readable` (checked before each file is read)."""
    return ds.take_while(lambda *_: tf.logical_not(_nothing_readable(tally)))


def _then_refuse_if_nothing_was_read(ds, tally: _ShardTally):
    """`ds`, then (when it ends) an error naming the shards if none gave a record.

    Placed after the skip stage's `ignore_errors`, which would drop an error raised earlier:
    a marker element runs the assertion and is filtered out, and `flat_map` of an empty
    `ds` gives the marker `ds`'s element structure.
    """
    assertion_message = [
        "Every TFRecord shard of this input pipeline ended before its first record (a corrupt "
        "first record, CRC mismatch, or a read error), so it has no data to deliver:",
        ", ".join(tally.files), "Re-create the shards with tools/convert_data.py."]

    def check(marker):
        refused = tf.debugging.Assert(tf.logical_not(_nothing_readable(tally)), assertion_message)
        with tf.control_dependencies([refused]):
            return tf.identity(marker)

    marker = tf.data.Dataset.from_tensors(tf.constant(0)).map(check).filter(_never)
    return ds.concatenate(marker.flat_map(lambda _: ds.take(0)))


def _end_of_shard(record, _, *, path, index, expected, tally: _ShardTally, fail):
    """Counts a finished pass over shard `index`; fail mode asserts it delivered `expected`."""
    with tf.control_dependencies([tally.count_pass(index)]):
        if not fail:
            return tf.identity(record), path
        num_read = tf.gather(tally.read, index)
        passes = tf.gather(tally.passes, index)
    delivered = num_read - (passes - 1) * expected
    assertion = tf.debugging.Assert(
        tf.logical_or(expected < 0, num_read >= passes * expected),
        ["TFRecord shard", path, "ended after", delivered, "of its", expected,
         "records: a corrupt record (CRC mismatch) or a read error. Re-create the shard with "
         "tools/convert_data.py, or pass on_bad_record='skip' to count its missing records."])
    with tf.control_dependencies([assertion]):
        return tf.identity(record), path


def _tfrecord_elements(files, plan, order: _RecordOrder, repeat_count=None):
    """Dataset of `(serialized Example string, shard file name string)`.

    `plan` is `(limits, expected, tally, fail)`, see `_read_shard`. `repeat_count` repeats the
    (reshuffled) file list, so the reading and decoding never drain at an epoch boundary (a
    record-level repeat after the record shuffle would wait for the shuffle buffer to refill
    every epoch).
    """
    limits, expected, tally, fail = plan
    ds = tf.data.Dataset.from_tensor_slices((
        files, tf.constant(limits, tf.int64), tf.range(len(files), dtype=tf.int64),
        tf.constant(expected, tf.int64)))
    if order.training:
        ds = ds.shuffle(len(files), seed=order.seed, reshuffle_each_iteration=True)
    ds = _files_while_readable(_repeat(ds, repeat_count), tally)
    read_shard = functools.partial(_read_shard, tally=tally, fail=fail)
    if not order.training:  # shard after shard: eval sees the examples in the order written
        return ds.flat_map(read_shard)
    return ds.interleave(
        read_shard,
        cycle_length=min(len(files), 16),
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=order.deterministic,
    )


def _tfrecord_source(source, split, input_context, order, policy, repeat_files):
    """The records of this input pipeline's shards of `split` at `source`.

    Args:
        source: a directory written by `pipelines.convert` or a TFRecord file pattern.
        split: selects the `{split}-*` shards of a directory.
        input_context: a `tf.distribute.InputContext` or None.
        order: training shuffles the files and interleaves them.
        policy: what to do with broken shards.
        repeat_files: repeat the file list `order.repeat_count` times (else read it once).

    Returns:
        `(dataset of (serialized Example string, shard file name string), dataset info or None,
        the pipeline's `_ShardTally`)`.
    """
    all_files, info = info_lib.resolve_shards(source, split)
    files, record_shard = _files_of_pipeline(all_files, input_context)
    counts = info_lib.expected_counts(files, info, split)
    if policy.check_shards:
        limits, expected = _check_shards(files, counts, policy)
    else:
        limits, expected = [-1] * len(files), [counts.get(f, -1) for f in files]
    tally = policy.counter._new_tally(files, expected)
    file_repeat_count = order.repeat_count if repeat_files else None
    plan = (limits, expected, tally, policy.mode == "fail")
    elements = _tfrecord_elements(files, plan, order, file_repeat_count)
    if record_shard is not None:
        elements = elements.shard(record_shard.num_input_pipelines, record_shard.input_pipeline_id)
    return elements, info, tally


def _tfds_source(source, split, input_context, order, tfds_data_dir):
    """The examples of a prepared TFDS split, sharded by TFDS per input pipeline.

    Returns:
        `(dataset of (encoded image string, label int64, "tfds:NAME/SPLIT" string), dataset info)`.
    """
    import tensorflow_datasets as tfds

    name = source[len(info_lib.TFDS_PREFIX):]
    info = info_lib.load_dataset_info(source, tfds_data_dir)
    builder = tfds.builder(name, data_dir=tfds_data_dir)
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=order.seed)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=order.training,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    context = f"tfds:{name}/{split}"
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int64), context)), info


def _shuffle_and_repeat(ds, order: _RecordOrder, repeat_count):
    """Optional in-memory cache of the records, the record shuffle (training), `repeat_count`."""
    if order.cache:
        ds = ds.cache()
    if order.training:
        ds = ds.shuffle(order.shuffle_buffer, seed=order.seed, reshuffle_each_iteration=True)
    return _repeat(ds, repeat_count)


# ----------------------------------------------------------------------------- 2. parse and decode


def _parse_tfrecord(serialized, path):
    """`(serialized Example, path)` -> `(encoded image string, label int64, path)`."""
    image_bytes, label = records.parse_image_and_label(serialized)
    return image_bytes, label, path


def _already_parsed(image_bytes, label, context):
    """TFDS elements are `(encoded image, label, context)` already."""
    return image_bytes, label, context


def _parse_counted(element, parse, counter):
    """`parse(*element)`, counting the record as seen first."""
    with tf.control_dependencies([counter._mark_seen()]):
        return parse(*element)


def _record_seeds(seed):
    """The per-record int64 seed -> `(crop seed, flip seed, erase seed)`, each int64 `(2,)`.

    The crop and flip seeds are those of earlier versions, so seeded runs keep their crops.
    """
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([seed, tf.constant(0, tf.int64)]), 2))
    return crop_seed, flip_seed, tf.stack([seed, tf.constant(1, tf.int64)])


def _decode_inception_crop(element, seed, *, parse, counter, crop_sampler, area_range):
    """One record -> `(uint8 (crop_h, crop_w, 3) crop, bool flip, int64 (2,) erase seed,
    int64 label, context string)`.

    Only the crop window of a JPEG is decoded; `seed` (int64 scalar) draws the crop, the flip and
    the random erasing.
    """
    image_bytes, label, context = _parse_counted(element, parse, counter)
    crop_seed, flip_seed, erase_seed = _record_seeds(seed)
    image = augment_lib.decode_and_random_crop(image_bytes, crop_seed, context,
                                               crop_sampler=crop_sampler, area_range=area_range)
    flip = augment_lib.random_flip_decision(flip_seed)
    return image, flip, erase_seed, label, context


def _decode_for_eval(*element, parse, counter, central_crop_fraction):
    """One record -> `(uint8 (h, w, 3) image, False, zero erase seed, int64 label, context)`."""
    image_bytes, label, context = _parse_counted(element, parse, counter)
    image = preprocess.decode_for_eval(image_bytes, central_crop_fraction, context=context)
    return image, tf.constant(False), tf.zeros([2], tf.int64), label, context


def _decode_for_eval_seeded(element, seed, **kwargs):
    """Training with `augment="none"`: the eval decode, with the record's erase seed (which
    seeds random erasing and RandAugment)."""
    image, flip, _, label, context = _decode_for_eval(*element, **kwargs)
    return image, flip, _record_seeds(seed)[2], label, context


def _repeat_each_record(ds, times):
    """Each element of `ds` `times` times in a row (DeiT's repeated augmentation)."""
    if times <= 1:
        return ds
    tile = lambda *element: tuple(tf.repeat(t[None], times, axis=0) for t in element)  # noqa: E731
    return ds.map(tile).unbatch()


def _decoder(augmentation: _Augmentation, parse, counter):
    """The per-record decode function of `augmentation.mode`, and whether it takes a seed."""
    if augmentation.mode == "inception_crop":
        return functools.partial(
            _decode_inception_crop, parse=parse, counter=counter,
            crop_sampler=augmentation.crop_sampler, area_range=augmentation.crop_area_range), True
    kwargs = dict(parse=parse, counter=counter,
                  central_crop_fraction=augmentation.central_crop_fraction)
    if augmentation.erase.enabled or augmentation.randaugment:
        return functools.partial(_decode_for_eval_seeded, **kwargs), True
    return functools.partial(_decode_for_eval, **kwargs), False


def _decode_records(ds, augmentation: _Augmentation, policy, order, records_are_examples,
                    dropped=None, skip=0):
    """Per record: repeat it, count it as seen, parse, decode (and draw the flip), apply the
    bad-record policy.

    Args:
        ds: `(serialized Example, shard path)` when `records_are_examples`, else TFDS's
            `(encoded image, int64 label, context)`.
        augmentation: `mode` selects the Inception crop or the eval decode.
        policy: skip or fail on records whose Example does not parse or image does not decode.
        order: the per-record seeds, `aug_repeats`, and whether parallel decoding keeps the order.
        records_are_examples: `ds` holds serialized Examples (TFRecord shards), not TFDS elements.
        dropped: skip mode, fixed order: `_tracked_drops`; each element then starts with its
            int64 stream position.
        skip: records of the stream to skip (`_stream_skip`).

    Returns:
        A dataset of `(image uint8 (h, w, 3), flip bool, erase seed int64 (2,), label int64,
        context string)`, in fail mode followed by an int32 record status (see
        `_fail_on_bad_records`), with `dropped` preceded by the stream position.
    """
    parse = _parse_tfrecord if records_are_examples else _already_parsed
    decode, seeded = _decoder(augmentation, parse, policy.counter)
    ds = _repeat_each_record(ds, order.aug_repeats)
    if seeded:  # one seed per delivered copy: the K copies of a record are augmented apart
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=order.seed)))
    if dropped is not None:
        ds = ds.enumerate()  # stream positions, counted before the skip
    if skip:
        # After the zip, so each record keeps the augmentation seed it had in the first run.
        ds = ds.skip(skip)
    if policy.mode == "skip":
        return _skip_bad_records(ds, decode, order, positioned=dropped is not None)
    return _fail_on_bad_records(ds, decode, order, records_are_examples)


def _tracked_drops(policy, order) -> DroppedPositions | None:
    """Where this pipeline notes the records it drops: skip mode, in a fixed order (which the
    noting needs, and without which no run can resume exactly anyway); else None."""
    if policy.mode == "skip" and order.training and order.deterministic:
        return policy.dropped
    return None


def _stream_skip(order, dropped) -> int:
    """Records of the stream a resumed pipeline skips: the examples it delivered before, and
    the records it dropped among them."""
    return dropped.resume_position(order.skip_examples) if dropped else order.skip_examples


def _skip_bad_records(ds, decode, order, positioned=False):
    """Skip mode: records whose decode fails are dropped, logged with TF's error and counted.

    They count as `seen - delivered` in the `BadRecordCounter`. `positioned`: `ds` holds
    `(stream position, element)`, and the position stays in front of the decoded record (for
    `_note_dropped_positions`). `ignore_errors` sits between the decode and the resize so that
    the resize map stays fused with `batch`.
    """
    if positioned:
        decode = functools.partial(_decode_positioned, decode)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=order.is_fixed)
    return ds.ignore_errors(log_warning=True)


def _decode_positioned(decode, position, element):
    return (position,) + decode(*element)


def _note_dropped_positions(ds, dropped, first_position):
    """Batches `(positions, *batch)` -> `batch`, noting in `dropped` the positions missing
    from the run of consecutive positions that starts at `first_position` (the records
    `ignore_errors` dropped). A sequential scan over batches, so the order must be fixed;
    Python runs only for a batch with a gap (a scan per record would cost ~40 us each)."""

    def gap(expected, batch):
        positions = batch[0]
        consecutive = expected + tf.range(tf.size(positions, out_type=tf.int64))
        noted = tf.cond(tf.reduce_all(positions == consecutive),
                        lambda: tf.constant(0, tf.int64),
                        lambda: tf.py_function(dropped.note_missing, [expected, positions],
                                               tf.int64))
        with tf.control_dependencies([noted]):
            return positions[-1] + 1, tuple(tf.identity(t) for t in batch[1:])

    return ds.scan(tf.constant(first_position, tf.int64), gap)


# Fail mode decodes each record in a one-element dataset (see `_decode_or_report`); this many
# run in parallel.
_FAIL_MODE_CYCLE = 16
_RECORD_OK, _RECORD_UNPARSEABLE, _RECORD_UNDECODABLE = 0, 1, 2


def _fail_on_bad_records(ds, decode, order, records_are_examples):
    """Fail mode: each record decoded with a status that `_assert_record_ok` later checks."""
    return ds.interleave(
        functools.partial(_decode_or_report, decode, records_are_examples),
        cycle_length=_FAIL_MODE_CYCLE, block_length=1,
        num_parallel_calls=AUTOTUNE, deterministic=order.is_fixed,
    )


def _decode_or_report(decode, records_are_examples, *args):
    """Fail mode: `decode(*args)` as a one-element dataset of
    `(image, flip, erase seed, label, context, status)`.

    TF's errors from a corrupt Example or a JPEG that breaks after a valid header do not say
    which file the record came from. Here a failed decode becomes an element with `status`
    `_RECORD_UNPARSEABLE` or `_RECORD_UNDECODABLE` and the record's shard as `context`, which
    `_assert_record_ok` turns into an error naming the shard.
    """
    single = tf.data.Dataset.from_tensors(args)
    decoded = single.map(lambda *a: decode(*a) + (tf.constant(_RECORD_OK),)).ignore_errors()
    element = args[0] if isinstance(args[0], tuple) else args  # (element, seed) or element
    serialized, context = element[0], element[-1]

    def failure(status):
        return lambda *_: (tf.zeros([0, 0, 3], tf.uint8), tf.constant(False),
                           tf.zeros([2], tf.int64), tf.constant(-1, tf.int64), context,
                           tf.constant(status))

    # Tried only when the decode failed: does the Example at least parse?
    parses = single
    if records_are_examples:
        parses = single.map(lambda *_: records.parse_example(serialized)).ignore_errors()
    undecodable = parses.map(failure(_RECORD_UNDECODABLE))
    unparseable = single.map(failure(_RECORD_UNPARSEABLE))
    return decoded.concatenate(undecodable).concatenate(unparseable).take(1)


def _assert_record_ok(status, context):
    """An assertion that fails, naming the shard `context`, unless `status` is `_RECORD_OK`."""
    return tf.debugging.Assert(
        tf.equal(status, _RECORD_OK),
        [
            tf.where(
                tf.equal(status, _RECORD_UNPARSEABLE),
                "a record that is not a parseable tf.train.Example (corrupt record) in shard",
                f"{preprocess.NOT_AN_IMAGE} (missing, corrupt or truncated image data) in a "
                "record of shard",
            ),
            context,
            "Re-create the shard with tools/convert_data.py, or pass on_bad_record='skip' to "
            "count and skip such records.",
        ],
    )


# ----------------------------------------------------------------------------- 3. augment and batch


def _resize_for_eval(image, flip, *, image_size):
    del flip  # the eval preprocessing never flips
    return preprocess.resize(image, image_size)


def _flip_and_resize(image, flip, *, image_size):
    return preprocess.resize(augment_lib.flip_left_right_if(image, flip), image_size)


def _flip_and_resize_compiled(image, flip, *, image_size, resize_op):
    return compiled_ops.resize_bilinear_flip(resize_op, image, image_size, flip)


def _resizer(augmentation: _Augmentation):
    """`fn(uint8 (h, w, 3) image, bool flip) -> float32 (image_size, image_size, 3)` in [0, 255]."""
    size = augmentation.image_size
    if augmentation.mode != "inception_crop":
        return functools.partial(_resize_for_eval, image_size=size)
    if augmentation.resize_kernel != "tensorflow":
        required = augmentation.resize_kernel == "compiled"
        resize_op = compiled_ops.load_resize_op(required=required)
        if resize_op is not None:
            return functools.partial(_flip_and_resize_compiled, image_size=size,
                                     resize_op=resize_op)
    return functools.partial(_flip_and_resize, image_size=size)


def _finish_record(image, flip, erase_seed, label, context, status=None, *, resize, randaug,
                   erase):
    """Per record: (fail mode) check the status, resize and flip, optional RandAugment, optional
    random erasing (`erase`: `erasing.ErasingSettings` or None).

    Returns:
        `(image float32 (image_size, image_size, 3) in [0, 255] (erased pixels are noise around
        `erase.mean` and may leave that range), label int64, context string)`.
    """
    checks = []
    if status is not None:
        checks.append(_assert_record_ok(status, context))
    with tf.control_dependencies(checks):
        image = resize(image, flip)
    if randaug is not None:
        # A stream of its own, derived from the record's seed like the erasing's.
        randaug_seed = tf.random.experimental.stateless_fold_in(erase_seed, 1)
        image = tf.cast(randaug.augment(image, randaug_seed), tf.float32)
    if erase is not None:
        image = erasing.random_erase(image, erase_seed, erase)
    return image, label, context


def _resize_and_batch(ds, augmentation: _Augmentation, randaug, batch_size, order,
                      positioned=False):
    """Resize (and flip) each decoded record to float32, augment it, then batch.

    The map is directly followed by `batch`, which tf.data fuses with it (map_and_batch_fusion),
    so the images go straight into the batch (see docs/data.md, 'Benchmark').

    Returns:
        A dataset of `(images float32 (batch, image_size, image_size, 3), labels int64 (batch,),
        contexts string (batch,))`, with `positioned` preceded by the int64 stream positions
        `(batch,)`; the last batch may be partial.
    """
    erase = augmentation.erase if augmentation.erase.enabled else None
    finish = functools.partial(_finish_record, resize=_resizer(augmentation), randaug=randaug,
                               erase=erase)
    if positioned:  # the stream position rides along, in front (`_note_dropped_positions`)
        finish = functools.partial(_finish_positioned, finish)
    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=order.is_fixed)
    return ds.batch(batch_size)


def _finish_positioned(finish, position, *element):
    return (position,) + finish(*element)


# ----------------------------------------------------------------------------- 4. batch checks


def _check_batch_labels(images, labels, contexts, *, batching: _Batching, counter):
    """Subtracts the label offset, asserts the labels are in range, counts the batch delivered."""
    labels = labels - batching.label_offset
    num_classes = batching.num_classes
    in_range = tf.greater_equal(labels, 0)
    if num_classes:
        in_range = tf.logical_and(in_range, tf.less(labels, num_classes))
    bad = tf.logical_not(in_range)
    assertion = tf.debugging.Assert(
        tf.reduce_all(in_range),
        [f"label outside [0, {num_classes}) (after label_offset={batching.label_offset}) in shard",
         tf.boolean_mask(contexts, bad), "label:", tf.boolean_mask(labels, bad)],
    )
    with tf.control_dependencies([assertion, counter._mark_delivered(tf.size(labels))]):
        return tf.identity(images), tf.cast(labels, tf.int32)


def _check_labels(ds, batching: _Batching, counter, order):
    """Per batch (one op per batch, not per image): label check and delivered-record count.

    A partial batch is dropped only after this count, so a finite training pass counts it as
    delivered, not as bad.

    Returns:
        A dataset of `(images float32 (batch, H, W, 3), labels int32 (batch,))`.
    """
    check = functools.partial(_check_batch_labels, batching=batching, counter=counter)
    return ds.map(check, num_parallel_calls=AUTOTUNE, deterministic=order.is_fixed)


def _is_full_batch(images, labels, *, batch_size):
    del images
    return tf.equal(tf.shape(labels)[0], batch_size)


def _ensure_batch_shape(images, labels, *, batch_size, image_size):
    return (tf.ensure_shape(images, [batch_size, image_size, image_size, 3]),
            tf.ensure_shape(labels, [batch_size]))


def _fixed_batch_shape(ds, batch_size, image_size):
    """Drops a partial batch and declares the static batch shape `(batch_size, ...)`."""
    ds = ds.filter(functools.partial(_is_full_batch, batch_size=batch_size))
    return ds.map(functools.partial(_ensure_batch_shape, batch_size=batch_size,
                                    image_size=image_size))


def _mix(ds, batching: _Batching, order: _RecordOrder, input_context):
    """Mixup / CutMix of whole batches (`pipelines.mixing`); labels become float32
    `(batch, num_classes)`. Batch draws follow the input pipeline's id and the stream's batch
    index, which a resumed run continues from `skip_examples // batch_size`."""
    first_batch = order.skip_examples // batching.batch_size
    pipeline = input_context.input_pipeline_id if input_context is not None else 0
    return mixing.mix_dataset(ds, batching.mix, batching.num_classes, order.seed, first_batch,
                              pipeline)


# ----------------------------------------------------------------------------- 5. options


def _with_options_and_prefetch(ds, order: _RecordOrder):
    options = tf.data.Options()
    options.deterministic = order.is_fixed
    return ds.with_options(options).prefetch(AUTOTUNE)


# ----------------------------------------------------------------------------- the pipeline


def _check_choice(name, value, choices):
    if value not in choices:
        raise UserError(f"{name} must be one of {choices}, got {value!r}.")


def _check_positive(name, value):
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}.")


def _repeat_count(repeat) -> int | None:
    """`build_dataset(repeat=...)` (True/False/None or a count) -> None, -1 (forever) or n."""
    if repeat is True:
        return -1
    return None if repeat in (False, None, 0, 1) else int(repeat)


def _check_settings(on_bad_record, augment, resize_kernel, batch_size, image_size) -> None:
    """UserError for a setting of `build_dataset` outside its choices or range."""
    _check_choice("on_bad_record", on_bad_record, _BAD_RECORD_MODES)
    _check_choice("augment", augment, AUGMENT_MODES)
    _check_choice("resize_kernel", resize_kernel, compiled_ops.RESIZE_KERNELS)
    _check_positive("batch_size", batch_size)
    _check_positive("image_size", image_size)


def _check_aug_repeats(aug_repeats, batch_size, training) -> int:
    """`aug_repeats` (1 when not training); UserError unless it is >= 1. A batch size that is
    not a multiple of it is allowed (DeiT's batch of 1024 with 3 repeats is not) and logged."""
    _check_positive("aug_repeats", aug_repeats)
    if not training:
        return 1
    if batch_size % aug_repeats:
        logging.warning(
            "aug_repeats=%d does not divide the per-replica batch size %d: the copies of one "
            "image in %d straddle two consecutive batches (as DeiT's RASampler's do at batch "
            "edges). Choose a batch size that is a multiple of %d to keep them together.",
            aug_repeats, batch_size, aug_repeats, aug_repeats)
    return int(aug_repeats)


def _record_order(training, deterministic, seed, repeat, shuffle_buffer, cache,
                  skip_examples, aug_repeats=1) -> _RecordOrder:
    """Resolves the defaults: seed 0 for deterministic runs; repeat forever when training."""
    if isinstance(skip_examples, bool) or not isinstance(skip_examples, int) or skip_examples < 0:
        raise UserError(f"skip_examples must be an integer >= 0, got {skip_examples!r}.")
    return _RecordOrder(
        training=training,
        deterministic=deterministic,
        seed=0 if seed is None and deterministic else seed,
        repeat_count=_repeat_count(training if repeat is None else repeat),
        shuffle_buffer=shuffle_buffer,
        cache=cache,
        skip_examples=skip_examples if training else 0,
        aug_repeats=aug_repeats,
    )


def _batching(info, batch_size, num_classes, label_offset, training,
              mix: mixing.MixingSettings) -> _Batching:
    """Fills `num_classes` and `label_offset` from the dataset info where they are None."""
    info = info or {}
    batching = _Batching(
        batch_size=batch_size,
        num_classes=info.get("num_classes") if num_classes is None else num_classes,
        label_offset=info.get("label_offset", 0) if label_offset is None else label_offset,
        fixed_shape=training,
        mix=mix if training else mixing.MixingSettings(),
    )
    if batching.mix.enabled and not batching.num_classes:
        which = "mixup_alpha" if mix.mixup_alpha > 0 else "cutmix_alpha"
        raise UserError(f"{which} > 0 needs num_classes (no dataset_info.json gives it); pass "
                        "num_classes=.")
    return batching


def build_dataset(
    source,
    *,
    split: str,
    image_size: int,
    batch_size: int,
    input_context: tf.distribute.InputContext | None = None,
    training: bool | None = None,
    num_classes: int | None = None,
    label_offset: int | None = None,
    shuffle_buffer: int = 10_000,
    deterministic: bool = False,
    cache: bool = False,
    repeat: bool | int | None = None,
    augment: str = "inception_crop",
    randaugment: str | None = None,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mixup_prob: float = 1.0,
    mixup_switch_prob: float = 0.5,
    random_erase: float = 0.0,
    erase_mean: tuple[float, float, float] = (127.5, 127.5, 127.5),
    erase_std: tuple[float, float, float] = (127.5, 127.5, 127.5),
    aug_repeats: int = 1,
    crop_sampler: str = "tensorflow",
    crop_area_range: tuple[float, float] = augment_lib.AREA_RANGE,
    central_crop_fraction: float | None = None,
    on_bad_record: str = "skip",
    tfds_data_dir: str | None = None,
    seed: int | None = None,
    bad_record_counter: BadRecordCounter | None = None,
    check_shards: bool = True,
    resize_kernel: str = "auto",
    skip_examples: int = 0,
    dropped_positions: DroppedPositions | None = None,
) -> tf.data.Dataset:
    """Builds the input pipeline of one split.

    Args:
        source: a TFRecord file pattern, a directory written by `pipelines.convert`, or `tfds:NAME`.
        split: `"train"`, `"test"`, ... (selects `{split}-*` shards of a directory).
        image_size: output side in pixels.
        batch_size: examples per batch. With `input_context` this is the PER-REPLICA batch size:
            pass `input_context.get_per_replica_batch_size(global_batch_size)`.
        input_context: from `strategy.distribute_datasets_from_function`; files are sharded
            `files[input_pipeline_id::num_input_pipelines]` (records when there are fewer files
            than input pipelines).
        training: random crop/flip, shuffle, repeat, drop remainder. Default `split == "train"`.
        num_classes: labels must lie in `[0, num_classes)`; default from dataset_info.json.
        label_offset: subtracted from stored labels (1 for Model Garden's 1-based ImageNet
            shards); default from dataset_info.json, else 0.
        shuffle_buffer: records in the shuffle buffer (training).
        deterministic: the same batches on every run: seeded shuffles/augmentation (`seed` or 0)
            and deterministic parallel ops.
        cache: cache the serialized records in memory (small datasets); augmentation stays random.
        repeat: True/False or a count; default: forever when training, once otherwise.
        augment: training preprocessing: `"inception_crop"` (random-resized crop, flip, resize)
            or `"none"` (`preprocess_for_eval`: decode, optional central crop, resize) with the
            training order, shuffle, repeat and fixed batch size. Ignored when not training.
        randaugment: `"num_layers,magnitude"` such as `"2,15"`, or None.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) of mixup and of CutMix; either > 0 mixes
            whole batches with their reverse (training only, timm's `Mixup`, mode "batch", see
            `pipelines.mixing`); labels become float32 `(batch, num_classes)`, each row summing
            to 1. Label smoothing stays with the loss (it commutes with the mixing).
        mixup_prob: probability that a batch is mixed at all (timm's `prob`).
        mixup_switch_prob: with both alphas > 0, probability of CutMix instead of mixup.
        random_erase: per-image probability of timm's `RandomErasing` (mode "pixel": one box of
            2-33 % of the image, aspect 0.3-3.3, filled with `erase_mean + erase_std * N(0, 1)`
            per pixel and channel, not clipped), after resize, flip and RandAugment (training
            only, see `pipelines.erasing`).
        erase_mean, erase_std: the model's input normalisation in pixel units, per channel,
            so that the erased pixels become N(0, 1) after it (timm erases normalised tensors).
        aug_repeats: K >= 1, DeiT's repeated augmentation (training only): each record of the
            shuffled stream is delivered K times in a row, each copy with its own augmentation
            seed, so a per-replica batch holds K differently augmented copies of each of its
            images (when `batch_size` is not a multiple of K, the copies of some images straddle
            two consecutive batches, as DeiT's do at batch edges). Unlike DeiT's `RASampler`, which sends
            the copies to K different GPUs and cuts each epoch to `len(dataset)` samples (so an
            epoch sees about 1/K of the images), the copies stay in one replica's batch and the
            stream has no epochs: N delivered examples hold N / K distinct images. Parallel
            stages keep their order (as with `deterministic`) so that copies never change batch.
            A bad record is counted once per copy by the `BadRecordCounter`.
        crop_sampler: the Inception crop's sampling rule, one of `augment.CROP_SAMPLERS`:
            `"tensorflow"` (`sample_distorted_bounding_box`, Google's ViT code) or
            `"torchvision"` (`RandomResizedCrop.get_params`, timm and DeiT).
        crop_area_range: `(min, max)` fraction of the image area an Inception crop covers
            (big_vision (0.05, 1); torchvision/timm/DeiT (0.08, 1)).
        central_crop_fraction: see `preprocess_for_eval`; eval and `augment="none"`.
        on_bad_record: `"skip"` counts (see `BadRecordCounter`), logs and skips corrupt records
            and undecodable images; `"fail"` raises naming the shard. Out-of-range labels always
            raise.
        tfds_data_dir: for `tfds:NAME`.
        seed: base seed of shuffles and augmentation.
        bad_record_counter: a `BadRecordCounter` the pipeline updates; keep it and read its
            `count` and `shard_errors` to know what was skipped. Without one, skipped records
            are still logged (and counted internally) but not reported.
        check_shards: walk each shard's record framing when building, to find truncated files.
        resize_kernel: how the Inception crop becomes an `image_size` float32 image, flipped or
            not: `"compiled"`: `compiled_ops.resize_bilinear_flip` (built on first use; an error
            if it cannot be); `"tensorflow"`: TensorFlow's Cast, Reverse and ResizeBilinear;
            `"auto"`: the compiled op where it builds, else TensorFlow's ops with a warning. The
            pixels agree to ~3e-5. Evaluation and `augment="none"` always use TensorFlow's ops.
        skip_examples: training only: examples of the shuffled record stream to skip before
            any is decoded, so that a resumed run goes on where the last one stopped (with
            `aug_repeats`, copies count as examples). With `deterministic` the stream then
            continues with exactly the examples an uninterrupted run would have seen next,
            crops, RandAugment, erasing and mixing included (the mixing draws of batch i come
            from `(seed, skip_examples // batch_size + i)`), as long as the records that earlier
            runs dropped as undecodable are in `dropped_positions`. The skipped records are
            read, not decoded.
        dropped_positions: training, `on_bad_record="skip"`, `deterministic` only: a
            `DroppedPositions` holding where earlier runs dropped undecodable records (what
            `skip_examples` skips past) and noting where this pipeline drops them; save its
            `positions` with each backup (the training engine does). None: the skip counts
            records as if none was dropped.

    Returns:
        A dataset of `(images float32 (batch, image_size, image_size, 3) in [0, 255],
        labels int32 (batch,))`, or float32 `(batch, num_classes)` soft labels with mixup or
        CutMix. Training batches have a fixed batch dimension.

    Raises:
        UserError: an unknown `on_bad_record`, `augment` or `resize_kernel`, a malformed
            `randaugment`, a `central_crop_fraction` outside (0, 1], a `batch_size` or
            `image_size` below 1; mixup / CutMix without `num_classes`; an alpha below 0, a
            probability outside [0, 1], an unknown `crop_sampler`, a `crop_area_range` outside
            (0, 1], `erase_mean`/`erase_std` not 3 values, `aug_repeats` < 1.
        MissingFileError: no shards of `split` at a TFRecord `source`, or a listed shard is
            missing (names it).
        EmptyShardError: a zero-byte shard, a split without examples, or no readable record.
        CorruptShardError: a broken shard (truncated, corrupt framing, fewer records than
            dataset_info.json lists) with `on_bad_record="fail"`.
        tf.errors.InvalidArgumentError: (while iterating, fail mode) a corrupt record or a
            shard that ends early, naming the shard; (training, skip mode) every shard of the
            pipeline ended before its first record, naming the shards.
        CompiledOpError: `resize_kernel="compiled"` and the op cannot be built or loaded.
    """
    _check_settings(on_bad_record, augment, resize_kernel, batch_size, image_size)
    source = os.fspath(source)
    training = split == "train" if training is None else training
    mix = mixing.MixingSettings(mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob).check()
    erase = erasing.ErasingSettings.from_args(random_erase, erase_mean, erase_std)
    crop_area_range = augment_lib.check_crop_settings(crop_sampler, crop_area_range)
    order = _record_order(training, deterministic, seed, repeat, shuffle_buffer, cache,
                          skip_examples, _check_aug_repeats(aug_repeats, batch_size, training))
    policy = _BadRecordPolicy(
        on_bad_record, BadRecordCounter() if bad_record_counter is None else bad_record_counter,
        check_shards, dropped_positions if training else None)
    from_tfds = source.startswith(info_lib.TFDS_PREFIX)
    # A cache holds one pass of records, so cached records are repeated after it, not the files.
    repeat_files = not (from_tfds or cache)
    if from_tfds:
        elements, info = _tfds_source(source, split, input_context, order, tfds_data_dir)
        tally = None
    else:
        elements, info, tally = _tfrecord_source(source, split, input_context, order, policy,
                                                 repeat_files)
    batching = _batching(info, batch_size, num_classes, label_offset, training, mix)
    augmentation = _Augmentation(
        mode=augment if training else "none",
        image_size=image_size,
        central_crop_fraction=central_crop_fraction,
        resize_kernel=resize_kernel,
        randaugment=randaugment if training else None,
        crop_sampler=crop_sampler,
        crop_area_range=crop_area_range,
        erase=erase if training else erasing.ErasingSettings(),
    )
    randaug = augment_lib.make_randaugment(augmentation.randaugment)

    dropped = _tracked_drops(policy, order)
    skip = _stream_skip(order, dropped)
    ds = _shuffle_and_repeat(elements, order, None if repeat_files else order.repeat_count)
    ds = _decode_records(ds, augmentation, policy, order, not from_tfds, dropped, skip)
    if tally is not None and policy.mode == "skip" and order.training:
        # Training repeats its files and would cycle over them forever; evaluation reads them
        # once and counts what it skipped, as skip mode promises.
        ds = _then_refuse_if_nothing_was_read(ds, tally)
    ds = _resize_and_batch(ds, augmentation, randaug, batch_size, order, dropped is not None)
    if dropped is not None:
        ds = _note_dropped_positions(ds, dropped, skip)
    ds = _check_labels(ds, batching, policy.counter, order)
    if batching.fixed_shape:
        ds = _fixed_batch_shape(ds, batch_size, image_size)
    if batching.mix.enabled:
        ds = _mix(ds, batching, order, input_context)
    return _with_options_and_prefetch(ds, order)
