"""`build_dataset`: the tf.data input pipeline for training and evaluation.

Training: shard files per input pipeline, shuffle and repeat the file list, parallel interleave,
shuffle records, parallel decode of an Inception crop (only the crop window of a JPEG is decoded)
and a flip decision (or, with `augment="none"`, the eval decode), skip bad records, resize and flip
(one compiled op, see `compiled_ops`) fused with the batching, optional RandAugment, fixed-shape
batches, optional mixup, prefetch.
Evaluation: every example exactly once, in the order of the (sorted) shards and of the records
within them, `preprocess_for_eval`, a final partial batch.

Bad data is never dropped without a count: see `BadRecordCounter`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import struct

import tensorflow as tf
from absl import logging

from pipelines import augment as augment_lib, compiled_ops, info as info_lib, preprocess, records

AUTOTUNE = tf.data.AUTOTUNE
_BAD_RECORD_MODES = ("skip", "fail")
#: `augment=`: the Inception crop + flip of the ViT paper, or the eval preprocessing (for data
#: whose labels a crop or a flip changes, such as digits).
AUGMENT_MODES = ("inception_crop", "none")


class CorruptShardError(ValueError):
    """A TFRecord shard is truncated or its record framing is corrupt."""


class BadRecordCounter:
    """Counts the records a pipeline skipped (`on_bad_record="skip"`).

    Two kinds of bad data are counted:
    * broken shards (truncated file, corrupt record framing), found when the pipeline is built;
      the complete records before the break are still read. Listed in `shard_errors`.
    * records whose Example cannot be parsed or whose image cannot be decoded; each is logged
      (absl/TF warning with the shard's file name) and counted as `seen - delivered`.

    `count` is exact once an iterator is exhausted (eval); while training it may lag by the few
    records in flight inside the parallel decode.
    """

    def __init__(self):
        with tf.init_scope(), tf.device("/cpu:0"):
            self._seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="records_seen")
            self._delivered = tf.Variable(0, dtype=tf.int64, trainable=False, name="records_ok")
        self.shard_errors: dict[str, tuple[str, int]] = {}

    def add_shard_error(self, path: str, message: str, num_lost: int) -> None:
        self.shard_errors[path] = (message, num_lost)

    @property
    def num_bad_records(self) -> int:
        return int(self._seen.numpy() - self._delivered.numpy())

    @property
    def count(self) -> int:
        """Total skipped records: undecodable records plus records lost in broken shards."""
        return self.num_bad_records + sum(n for _, n in self.shard_errors.values())

    def _mark_seen(self):
        return self._seen.assign_add(1, read_value=False)

    def _mark_delivered(self, num_records):
        return self._delivered.assign_add(tf.cast(num_records, tf.int64), read_value=False)


def shard_files(files: list[str], input_context) -> list[str]:
    """The files of one input pipeline: `files[pipeline_id::num_pipelines]` (all when no context)."""
    if input_context is None or input_context.num_input_pipelines <= 1:
        return list(files)
    return list(files[input_context.input_pipeline_id :: input_context.num_input_pipelines])


def scan_shard(path: str) -> tuple[int, str | None]:
    """Walks a TFRecord file's record framing without reading the payloads.

    Returns `(number of complete records, None)` or `(records before the break, error message)`.
    Record layout: uint64 length, uint32 crc, `length` bytes, uint32 crc.
    """
    size = tf.io.gfile.stat(path).length
    count = pos = 0
    # Local files: unbuffered reads of the 8-byte headers only, about 1 us per record.
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


def _check_shards(files, counts, on_bad_record, counter, num_threads=8):
    """Returns per-file record limits (-1 = all); handles broken shards per `on_bad_record`."""
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        scans = list(pool.map(scan_shard, files))
    limits = []
    for path, (num_ok, error) in zip(files, scans):
        if error is None:
            limits.append(-1)
            continue
        if on_bad_record == "fail":
            raise CorruptShardError(
                f"TFRecord shard {path} is broken after {num_ok} complete records: {error}. "
                "Re-create it with tools/convert_data.py, or pass on_bad_record='skip' to read "
                "the complete records and count the rest as skipped."
            )
        num_lost = max(counts.get(path, num_ok + 1) - num_ok, 1)
        logging.warning("Skipping %d record(s) of broken shard %s (%s); reading its first %d.",
                        num_lost, path, error, num_ok)
        counter.add_shard_error(path, error, num_lost)
        limits.append(num_ok)
    return limits


def _repeat(ds, count):
    """`count`: None = once, -1 = forever, n = n times."""
    return ds if count is None else ds.repeat(None if count < 0 else count)


def _tfrecord_elements(files, limits, training, deterministic, shuffle_seed, repeat_count=None):
    """Dataset of `(serialized Example, shard file name)`.

    `repeat_count` repeats the (reshuffled) file list, so the reading and decoding never drain
    at an epoch boundary (a record-level repeat after the record shuffle would wait for the
    shuffle buffer to refill every epoch).
    """
    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(limits, tf.int64)))
    if training:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = _repeat(ds, repeat_count)

    def read(path, limit):
        return tf.data.TFRecordDataset(path, buffer_size=8 << 20).take(limit).map(
            lambda r: (r, path)
        )

    if not training:  # shard after shard: eval sees the examples in the order they were written
        return ds.flat_map(read)
    return ds.interleave(
        read,
        cycle_length=min(len(files), 16),
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )


def _parse_tfrecord(serialized, path):
    image_bytes, label = records.parse_image_and_label(serialized)
    return image_bytes, label, path


def _call_with_tuple(fn, *element):
    return fn(element)


# Fail mode decodes each record in a one-element dataset (see `_decode_or_report`); this many
# run in parallel.
_FAIL_MODE_CYCLE = 16
_RECORD_OK, _RECORD_UNPARSEABLE, _RECORD_UNDECODABLE = 0, 1, 2


def _decode_or_report(decode, records_are_examples, *args):
    """Fail mode: `decode(*args)` as a one-element dataset of `(image, flip, label, context, status)`.

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
                           tf.constant(-1, tf.int64), context, tf.constant(status))

    # Tried only when the decode failed: does the Example at least parse?
    parses = single
    if records_are_examples:
        parses = single.map(lambda *_: records.parse_example(serialized)).ignore_errors()
    undecodable = parses.map(failure(_RECORD_UNDECODABLE))
    unparseable = single.map(failure(_RECORD_UNPARSEABLE))
    return decoded.concatenate(undecodable).concatenate(unparseable).take(1)


def _assert_record_ok(status, context):
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


def _tfds_elements(name, split, training, input_context, tfds_data_dir, shuffle_seed):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=tfds_data_dir)
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=shuffle_seed)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=training,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    context = f"tfds:{name}/{split}"
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int64), context))


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
    central_crop_fraction: float | None = None,
    on_bad_record: str = "skip",
    tfds_data_dir: str | None = None,
    seed: int | None = None,
    bad_record_counter: BadRecordCounter | None = None,
    check_shards: bool = True,
    resize_kernel: str = "auto",
) -> tf.data.Dataset:
    """Builds the input pipeline of one split.

    Args:
      source: a TFRecord file pattern, a directory written by `pipelines.convert`, or `tfds:NAME`.
      split: `"train"`, `"test"`, ... (selects `{split}-*` shards of a directory).
      image_size: output side in pixels.
      batch_size: examples per batch. With `input_context` this is the PER-REPLICA batch size:
        pass `input_context.get_per_replica_batch_size(global_batch_size)`.
      input_context: from `strategy.distribute_datasets_from_function`; files are sharded
        `files[input_pipeline_id::num_input_pipelines]` (records when there are fewer files than
        input pipelines).
      training: random crop/flip, shuffle, repeat, drop remainder. Default `split == "train"`.
      num_classes: labels must lie in `[0, num_classes)`; default from dataset_info.json.
      label_offset: subtracted from stored labels (1 for Model Garden's 1-based ImageNet shards);
        default from dataset_info.json, else 0.
      shuffle_buffer: records in the shuffle buffer (training).
      deterministic: the same batches on every run: seeded shuffles/augmentation (`seed` or 0)
        and deterministic parallel ops. RandAugment/mixup use Keras seeds and are not covered.
      cache: cache the serialized records in memory (small datasets); augmentation stays random.
      repeat: True/False or a count; default: forever when training, once otherwise.
      augment: training preprocessing: `"inception_crop"` (random-resized crop, flip, resize) or
        `"none"` (`preprocess_for_eval`: decode, optional central crop, resize) with the
        training order, shuffle, repeat and fixed batch size. Ignored when not training.
      randaugment: `"num_layers,magnitude"` such as `"2,15"`, or None.
      mixup_alpha: > 0 mixes batches (training only); labels become float32 `(batch, num_classes)`.
      central_crop_fraction: see `preprocess_for_eval`; eval and `augment="none"`.
      on_bad_record: `"skip"` counts (see `BadRecordCounter`), logs and skips corrupt records and
        undecodable images; `"fail"` raises naming the shard. Out-of-range labels always raise.
      tfds_data_dir: for `tfds:NAME`.
      seed: base seed of shuffles and augmentation.
      bad_record_counter: a counter to update; a new one is made otherwise. Either way it is
        available as `dataset.bad_records`.
      check_shards: walk each shard's record framing when building, to find truncated files.
      resize_kernel: how the Inception crop becomes an `image_size` float32 image, flipped or not:
        `"compiled"`: `compiled_ops.resize_bilinear_flip` (built on first use; an error if it
        cannot be); `"tensorflow"`: TensorFlow's Cast, Reverse and ResizeBilinear; `"auto"`: the
        compiled op where it builds, else TensorFlow's ops with a warning. The pixels agree to
        ~3e-5. Evaluation and `augment="none"` always use TensorFlow's ops.

    Returns:
      A dataset of `(images float32 (batch, image_size, image_size, 3) in [0, 255],
      labels int32 (batch,))`, or float32 `(batch, num_classes)` soft labels with mixup.
      Training batches have a fixed batch dimension.
    """
    if on_bad_record not in _BAD_RECORD_MODES:
        raise ValueError(f"on_bad_record must be one of {_BAD_RECORD_MODES}, got {on_bad_record!r}.")
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {augment!r}.")
    if resize_kernel not in compiled_ops.RESIZE_KERNELS:
        raise ValueError(
            f"resize_kernel must be one of {compiled_ops.RESIZE_KERNELS}, got {resize_kernel!r}.")
    source = os.fspath(source)
    training = split == "train" if training is None else training
    augment_mode = augment if training else "none"
    repeat = training if repeat is None else repeat
    repeat_count = -1 if repeat is True else (None if repeat in (False, None, 0, 1) else int(repeat))
    if seed is None and deterministic:
        seed = 0
    counter = bad_record_counter or BadRecordCounter()
    mixup_alpha = mixup_alpha if training else 0.0

    if source.startswith(info_lib.TFDS_PREFIX):
        name = source[len(info_lib.TFDS_PREFIX):]
        info = info_lib.load_dataset_info(source, tfds_data_dir)
        elements = _tfds_elements(name, split, training, input_context, tfds_data_dir, seed)
        parse = lambda image_bytes, label, context: (image_bytes, label, context)  # noqa: E731
        record_shard = None
    else:
        all_files, info = info_lib.resolve_shards(source, split)
        files = shard_files(all_files, input_context)
        record_shard = None
        if input_context is not None and input_context.num_input_pipelines > len(all_files):
            logging.warning(
                "%d shards for %d input pipelines: every pipeline reads all files and keeps every "
                "%d-th record. Convert with --num_shards >= %d to shard by file.",
                len(all_files), input_context.num_input_pipelines,
                input_context.num_input_pipelines, input_context.num_input_pipelines)
            files, record_shard = list(all_files), input_context
        counts = info_lib.expected_counts(files, info, split)
        limits = (
            _check_shards(files, counts, on_bad_record, counter) if check_shards else [-1] * len(files)
        )
        file_repeat = repeat_count if not cache else None
        elements = _tfrecord_elements(files, limits, training, deterministic, seed, file_repeat)
        repeat_count = None if file_repeat is not None else repeat_count
        parse = _parse_tfrecord
    if record_shard is not None:
        elements = elements.shard(record_shard.num_input_pipelines, record_shard.input_pipeline_id)

    info = info or {}
    if num_classes is None:
        num_classes = info.get("num_classes")
    if label_offset is None:
        label_offset = info.get("label_offset", 0)
    if mixup_alpha > 0 and not num_classes:
        raise ValueError("mixup_alpha > 0 needs num_classes (no dataset_info.json gives it).")

    randaug = augment_lib.make_randaugment(randaugment, seed) if training else None
    order_is_fixed = bool(deterministic or not training)
    ds = elements
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = _repeat(ds, repeat_count)  # when not repeated by file above

    # Stage 1, per record: count it as seen, parse, decode (training: only the Inception crop
    # window of a JPEG, and draw the flip). uint8, variable size.
    def decode(element, seed=None):
        with tf.control_dependencies([counter._mark_seen()]):
            image_bytes, label, context = parse(*element)
        if augment_mode == "inception_crop":
            crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(tf.stack([seed, tf.constant(0, tf.int64)]), 2))
            image = augment_lib.decode_and_random_crop(image_bytes, crop_seed, context)
            flip = augment_lib.random_flip_decision(flip_seed)
        else:
            image = preprocess.decode_for_eval(image_bytes, central_crop_fraction, context=context)
            flip = tf.constant(False)
        return image, flip, label, context

    if augment_mode == "inception_crop":
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed)))
    else:
        decode = functools.partial(_call_with_tuple, decode)
    if on_bad_record == "skip":
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=order_is_fixed)
        # Skipped records are logged with TF's error and counted (seen - delivered).
        ds = ds.ignore_errors(log_warning=True)
    else:
        ds = ds.interleave(
            functools.partial(_decode_or_report, decode, parse is _parse_tfrecord),
            cycle_length=_FAIL_MODE_CYCLE, block_length=1,
            num_parallel_calls=AUTOTUNE, deterministic=order_is_fixed,
        )

    resize_op = None
    if augment_mode == "inception_crop" and resize_kernel != "tensorflow":
        resize_op = compiled_ops.load_resize_op(required=resize_kernel == "compiled")

    def resize(image, flip):
        if augment_mode != "inception_crop":
            return preprocess.resize(image, image_size)
        if resize_op is not None:
            return compiled_ops.resize_bilinear_flip(resize_op, image, image_size, flip)
        return preprocess.resize(augment_lib.flip_left_right_if(image, flip), image_size)

    # Stage 2, per record: resize (and flip) to float32. Directly followed by `batch`, which
    # tf.data fuses with this map (map_and_batch_fusion): the images go straight into the batch.
    # (Measured: with `ignore_errors` between the map and the batch, training ran ~10% slower.)
    def finish(image, flip, label, context, status=None):
        checks = []
        if status is not None:
            checks.append(_assert_record_ok(status, context))
        with tf.control_dependencies(checks):
            image = resize(image, flip)
        if randaug is not None:
            image = tf.cast(randaug(image, training=True), tf.float32)
        return image, label, context

    # Labels are checked and delivered records counted per batch: one op per batch, not per image.
    # The remainder is dropped after counting, so a finite training pass counts it as delivered.
    def check_labels(images, labels, contexts):
        labels = labels - label_offset
        in_range = tf.greater_equal(labels, 0)
        if num_classes:
            in_range = tf.logical_and(in_range, tf.less(labels, num_classes))
        bad = tf.logical_not(in_range)
        assertion = tf.debugging.Assert(
            tf.reduce_all(in_range),
            [f"label outside [0, {num_classes}) (after label_offset={label_offset}) in shard",
             tf.boolean_mask(contexts, bad), "label:", tf.boolean_mask(labels, bad)],
        )
        with tf.control_dependencies([assertion, counter._mark_delivered(tf.size(labels))]):
            return tf.identity(images), tf.cast(labels, tf.int32)

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=order_is_fixed)
    ds = ds.batch(batch_size)
    ds = ds.map(check_labels, num_parallel_calls=AUTOTUNE, deterministic=order_is_fixed)
    if training:
        ds = ds.filter(lambda images, labels: tf.equal(tf.shape(labels)[0], batch_size))
        ds = ds.map(lambda images, labels: (
            tf.ensure_shape(images, [batch_size, image_size, image_size, 3]),
            tf.ensure_shape(labels, [batch_size])))
    if mixup_alpha > 0:
        ds = ds.map(augment_lib.make_mixup(mixup_alpha, num_classes, seed), num_parallel_calls=AUTOTUNE)

    options = tf.data.Options()
    options.deterministic = order_is_fixed
    ds = ds.with_options(options).prefetch(AUTOTUNE)
    ds.bad_records = counter
    return ds
