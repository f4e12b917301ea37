"""`dataset_info.json`: what a converted directory holds, and how to find a source's shards.

Layout (written by `pipelines.convert`, merged across splits)::

    {"source": "digits:", "class_names": ["0", ...], "num_classes": 10, "label_offset": 0,
     "splits": {"train": {"num_examples": 1438, "source": "digits:",
                          "shards": [{"file": "train-00000-of-00002.tfrecord", "num_examples": 719}, ...]},
                "test": {...}}}
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import tensorflow as tf
from absl import logging

from pipelines.errors import MissingFileError, UserError

INFO_FILENAME = "dataset_info.json"
TFDS_PREFIX = "tfds:"
#: What `pipelines.convert` puts in the names of the shards it is still writing (hidden names
#: `.{split}-...tfrecord.tmp-...`; earlier versions wrote `{split}-...tfrecord.tmp-...`, which a
#: `{split}-*` pattern matches). Such files are never read.
TMP_MARKER = ".tmp-"


class EmptyShardError(UserError):
    """A TFRecord shard holds no records (a zero-byte file), or a split has no examples."""


def is_temporary(path: str) -> bool:
    """Is `path` a shard that a conversion was still writing (left by a killed run)?"""
    return TMP_MARKER in os.path.basename(path)


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`train-00003-of-00016.tfrecord`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def _info_path(path_or_source: str) -> str:
    """Where the dataset_info.json of a json path, a directory or a file pattern would be."""
    if path_or_source.endswith(".json"):
        return path_or_source
    if tf.io.gfile.isdir(path_or_source):
        return os.path.join(path_or_source, INFO_FILENAME)
    # A file pattern: look beside the shards.
    return os.path.join(os.path.dirname(path_or_source) or ".", INFO_FILENAME)


def _tfds_info(name: str, tfds_data_dir: str | None) -> dict:
    """The dataset info of a prepared TFDS dataset, from its builder's metadata."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=tfds_data_dir)
    label = builder.info.features["label"]
    splits = {
        split: {"num_examples": int(info.num_examples)} for split, info in builder.info.splits.items()
    }
    return {
        "source": TFDS_PREFIX + name,
        "class_names": list(label.names),
        "num_classes": int(label.num_classes),
        "label_offset": 0,
        "splits": splits,
    }


def load_dataset_info(path_or_source: str, tfds_data_dir: str | None = None) -> dict | None:
    """Reads the dataset info of a converted directory, a shard pattern, a json file or `tfds:NAME`.

    Args:
        path_or_source: a directory written by `pipelines.convert`, a TFRecord file pattern (the
            json is looked for beside the shards), a dataset_info.json path or `tfds:NAME`.
        tfds_data_dir: for `tfds:NAME`.

    Returns:
        The info dict (layout in the module docstring), or None when there is none (e.g. shards
        written by other tools without a json).

    Raises:
        UserError: the json file is not valid JSON.
    """
    path_or_source = os.fspath(path_or_source)
    if path_or_source.startswith(TFDS_PREFIX):
        return _tfds_info(path_or_source[len(TFDS_PREFIX):], tfds_data_dir)
    path = _info_path(path_or_source)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} is not valid JSON ({e}); delete it and re-run tools/convert_data.py."
            ) from e


def write_dataset_info(output_dir: str, split: str, split_info: dict, common: dict) -> dict:
    """Merges one split into `output_dir/dataset_info.json` (atomically).

    Args:
        output_dir: the converted directory.
        split: the split's name.
        split_info: the split's entry: `num_examples`, `source`, `shards`.
        common: the entries shared by all splits: `source`, `class_names`, `num_classes`,
            `label_offset`.

    Returns:
        The merged info that was written.

    Raises:
        UserError: the split's class names or label offset disagree with those already recorded.
    """
    path = os.path.join(output_dir, INFO_FILENAME)
    info = check_mergeable(output_dir, split, common)
    splits = dict(info.get("splits", {}))
    splits[split] = split_info
    merged = {**common, "splits": dict(sorted(splits.items()))}
    tmp = f"{path}{TMP_MARKER}{os.getpid()}"  # one per process: conversions of two splits
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(merged, f, indent=2)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return merged


def check_mergeable(output_dir: str, split: str, common: dict) -> dict:
    """Checks that a split with `common` entries can be merged into `output_dir`'s json.

    `pipelines.convert` calls it before writing any shard, so a mismatch destroys nothing.

    Returns:
        The info already there (`{}` when there is none).

    Raises:
        UserError: the split's class names or label offset disagree with those already recorded.
    """
    path = os.path.join(output_dir, INFO_FILENAME)
    info = load_dataset_info(path) or {}
    if info.get("class_names") not in (None, common["class_names"]):
        raise UserError(
            f"{path} already lists class names {info['class_names'][:5]}... for splits "
            f"{sorted(info.get('splits', {}))}, but the '{split}' split has "
            f"{common['class_names'][:5]}...; write each dataset into its own --output_dir."
        )
    if info.get("label_offset", common["label_offset"]) != common["label_offset"]:
        raise UserError(
            f"{path} has label_offset={info['label_offset']} but this split uses "
            f"{common['label_offset']}; use one label offset per directory."
        )
    return info


def _shard_size(path: str) -> int | None:
    """The file's size in bytes, None when it does not exist."""
    try:
        return tf.io.gfile.stat(path).length
    except tf.errors.NotFoundError:
        return None


def check_shard_files(files: list[str], what: str, num_threads: int = 8) -> None:
    """Checks that every shard exists and is not empty (one `stat` per file, in threads).

    Args:
        files: shard paths.
        what: names the dataset and split in the messages, e.g. `"/data/c10 split 'test'"`.

    Raises:
        MissingFileError: a shard does not exist; names it and how many are missing.
        EmptyShardError: a shard is a zero-byte file; names it.
    """
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        sizes = list(pool.map(_shard_size, files))
    missing = [f for f, size in zip(files, sizes) if size is None]
    if missing:
        raise MissingFileError(
            f"{what}: {len(missing)} of {len(files)} shards are missing, e.g. {missing[0]}; "
            "re-run tools/convert_data.py."
        )
    empty = [f for f, size in zip(files, sizes) if size == 0]
    if empty:
        raise EmptyShardError(
            f"{what}: TFRecord shard {empty[0]} is empty (0 bytes; {len(empty)} of {len(files)} "
            "shards are), e.g. from a conversion that was killed or a copy that failed. "
            "Re-create it with tools/convert_data.py."
        )


def _listed_shards(source: str, info: dict | None, split: str) -> list[str] | None:
    """The shard paths `info` lists for `split` of directory `source`, None when it lists none.

    Raises:
        EmptyShardError: the json lists the split with no shards or no examples.
    """
    split_info = (info or {}).get("splits", {}).get(split)
    if split_info is None or "shards" not in split_info:
        return None
    if not split_info["shards"] or split_info.get("num_examples", 1) == 0:
        raise EmptyShardError(
            f"Split '{split}' of {source} is empty: {INFO_FILENAME} lists "
            f"{len(split_info['shards'])} shards and {split_info.get('num_examples')} examples. "
            "Convert a split that has examples (tools/convert_data.py)."
        )
    return [os.path.join(source, s["file"]) for s in split_info["shards"]]


def _glob_shards(pattern: str) -> list[str]:
    """The sorted files matching `pattern`, without the temporaries of a killed conversion."""
    files = sorted(tf.io.gfile.glob(pattern))
    leftovers = [f for f in files if is_temporary(f)]
    if leftovers:
        logging.warning(
            "Not reading %d temporary file(s) a killed conversion left, e.g. %s; the next "
            "conversion of this split removes them.", len(leftovers), leftovers[0])
    return [f for f in files if not is_temporary(f)]


def resolve_shards(source: str, split: str) -> tuple[list[str], dict | None]:
    """The shard files of `split` in a directory or file pattern, and the info if there is one.

    Args:
        source: a directory written by `pipelines.convert` (its json's shard list, else its
            `{split}-*` files) or a TFRecord file pattern. Temporary files of a killed
            conversion (`*.tmp-*`) are never read.
        split: the split's name.

    Returns:
        `(sorted list of shard paths, info or None)`.

    Raises:
        MissingFileError: no shards match, or shards the json lists are missing; names the source.
        EmptyShardError: the json lists the split without examples, or a shard is a zero-byte
            file; names the split or the shard.
    """
    source = os.fspath(source)
    info = load_dataset_info(source)
    is_dir = tf.io.gfile.isdir(source)
    listed = _listed_shards(source, info, split) if is_dir else None
    if listed is not None:
        check_shard_files(listed, f"{source}/{INFO_FILENAME}, split '{split}'")
        return listed, info
    pattern = os.path.join(source, f"{split}-*") if is_dir else source
    files = _glob_shards(pattern)
    if not files:
        known = sorted(info["splits"]) if info else []
        raise MissingFileError(
            f"No TFRecord shards for split '{split}' found at {pattern!r}"
            + (f" (dataset_info.json lists splits {known})" if info else "")
            + ". Expected a directory written by tools/convert_data.py, a file pattern, or tfds:NAME."
        )
    check_shard_files(files, f"{pattern!r}, split '{split}'")
    return files, info


def expected_counts(files: list[str], info: dict | None, split: str) -> dict[str, int]:
    """Per-shard example counts recorded in `info`, matched by file name.

    Returns:
        `{path in files: count}` for the files whose basename `info`'s `split` lists; empty when
        `info` does not list the split.
    """
    if not info or split not in info.get("splits", {}):
        return {}
    recorded = {s["file"]: s["num_examples"] for s in info["splits"][split].get("shards", [])}
    return {f: recorded[os.path.basename(f)] for f in files if os.path.basename(f) in recorded}


def describe_source(
    source: str, split: str, tfds_data_dir: str | None = None
) -> tuple[list[str] | None, int | None]:
    """The class names and the number of examples of a split, where the dataset info has them.

    Called before a run starts, so it also checks the shards the info lists (a `stat` each).

    Args:
        source: a converted directory, a TFRecord file pattern, a json file or `tfds:NAME`.
        split: the split's name.
        tfds_data_dir: for `tfds:NAME`.

    Returns:
        `(class_names or None, number of examples in split or None)`. For a file pattern the
        count is the sum over the matched shards recorded in dataset_info.json, None when any
        matched shard is not recorded there.

    Raises:
        MissingFileError: a shard the info lists is missing.
        EmptyShardError: the split is listed without examples, or a shard is a zero-byte file.
    """
    source = os.fspath(source)
    info = load_dataset_info(source, tfds_data_dir)
    if info is None:
        return None, None
    class_names = info.get("class_names")
    split_info = info.get("splits", {}).get(split)
    if split_info is None:
        return class_names, None
    if source.startswith(TFDS_PREFIX) or source.endswith(".json"):
        return class_names, split_info.get("num_examples")
    if tf.io.gfile.isdir(source):
        listed = _listed_shards(source, info, split)
        if listed is not None:
            check_shard_files(listed, f"{source}/{INFO_FILENAME}, split '{split}'")
        return class_names, split_info.get("num_examples")
    files = _glob_shards(source)
    counts = expected_counts(files, info, split)
    if not files or len(counts) != len(files):
        return class_names, None
    return class_names, sum(counts.values())
