"""`dataset_info.json`: what a converted directory holds, and how to find a source's shards.

Layout (written by `pipelines.convert`, merged across splits)::

    {"source": "digits:", "class_names": ["0", ...], "num_classes": 10, "label_offset": 0,
     "splits": {"train": {"num_examples": 1438, "source": "digits:",
                          "shards": [{"file": "train-00000-of-00002.tfrecord", "num_examples": 719}, ...]},
                "test": {...}}}
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from pipelines.errors import MissingFileError, UserError

INFO_FILENAME = "dataset_info.json"
TFDS_PREFIX = "tfds:"


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
    splits = dict(info.get("splits", {}))
    splits[split] = split_info
    merged = {**common, "splits": dict(sorted(splits.items()))}
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(merged, f, indent=2)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return merged


def resolve_shards(source: str, split: str) -> tuple[list[str], dict | None]:
    """The shard files of `split` in a directory or file pattern, and the info if there is one.

    Args:
        source: a directory written by `pipelines.convert` (its json's shard list, else its
            `{split}-*` files) or a TFRecord file pattern.
        split: the split's name.

    Returns:
        `(sorted list of shard paths, info or None)`.

    Raises:
        MissingFileError: no shards match, or shards the json lists are missing; names the source.
    """
    source = os.fspath(source)
    info = load_dataset_info(source)
    if tf.io.gfile.isdir(source):
        if info is not None and split in info.get("splits", {}) and "shards" in info["splits"][split]:
            files = [os.path.join(source, s["file"]) for s in info["splits"][split]["shards"]]
            missing = [f for f in files if not tf.io.gfile.exists(f)]
            if missing:
                raise MissingFileError(
                    f"{source}/{INFO_FILENAME} lists {len(files)} '{split}' shards but "
                    f"{len(missing)} are missing, e.g. {missing[0]}; re-run tools/convert_data.py."
                )
            return files, info
        pattern = os.path.join(source, f"{split}-*")
    else:
        pattern = source
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        known = sorted(info["splits"]) if info else []
        raise MissingFileError(
            f"No TFRecord shards for split '{split}' found at {pattern!r}"
            + (f" (dataset_info.json lists splits {known})" if info else "")
            + ". Expected a directory written by tools/convert_data.py, a file pattern, or tfds:NAME."
        )
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

    Args:
        source: a converted directory, a TFRecord file pattern, a json file or `tfds:NAME`.
        split: the split's name.
        tfds_data_dir: for `tfds:NAME`.

    Returns:
        `(class_names or None, number of examples in split or None)`. For a file pattern the
        count is the sum over the matched shards recorded in dataset_info.json, None when any
        matched shard is not recorded there.
    """
    source = os.fspath(source)
    info = load_dataset_info(source, tfds_data_dir)
    if info is None:
        return None, None
    class_names = info.get("class_names")
    split_info = info.get("splits", {}).get(split)
    if split_info is None:
        return class_names, None
    if source.startswith(TFDS_PREFIX) or tf.io.gfile.isdir(source) or source.endswith(".json"):
        return class_names, split_info.get("num_examples")
    files = sorted(tf.io.gfile.glob(source))
    counts = expected_counts(files, info, split)
    if not files or len(counts) != len(files):
        return class_names, None
    return class_names, sum(counts.values())
