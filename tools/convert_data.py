r"""Converts an image dataset into TFRecord shards plus dataset_info.json.

    python tools/convert_data.py --source=digits: --output_dir=/tmp/digits --split=train
    python tools/convert_data.py --source=folder:/data/imagenet/train --output_dir=/data/in1k \
        --class_index=imagenet_class_index.json --num_shards=1024 --num_workers=16
    python tools/convert_data.py --source=cifar10:cifar-10-python.tar.gz --output_dir=/data/c10 --split=test
    python tools/convert_data.py --source=tfds:cifar10 --tfds_data_dir=~/tensorflow_datasets \
        --output_dir=/data/c10

See docs/data.md for the record format and the sources.
"""

import json

from absl import flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)
import pipelines
from keras_vit import cli

_SOURCE = flags.DEFINE_string(
    "source", None, "KIND:PATH: folder:DIR, cifar10:PATH, cifar100:PATH, tfds:NAME or digits:.",
    required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write shards.", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "train or test (any split name for tfds).")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, "At least 1. Default: one per 1250 examples.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Parallel shard writers, at least 1. Default: min(shards, CPUs).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "Data dir of prepared TFDS datasets.")
_LABEL_OFFSET = flags.DEFINE_integer(
    "label_offset", 0, "Added to 0-based class indices (1 for Model Garden style ImageNet).")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", None, "folder:/tfds: refuse images with more pixels (width x height, from "
    "the header). Default: PIL's Image.MAX_IMAGE_PIXELS (89,478,485).")
_CLASS_INDEX = flags.DEFINE_string(
    "class_index", None, "folder: JSON mapping folder names to classes (Keras imagenet_class_index.json).")


def main(argv):
    del argv
    limit = _MAX_IMAGE_PIXELS.value
    limits = {} if limit is None else {"max_image_pixels": limit}
    info = pipelines.convert(
        _SOURCE.value,
        _OUTPUT_DIR.value,
        split=_SPLIT.value,
        num_shards=_NUM_SHARDS.value,
        num_workers=_NUM_WORKERS.value,
        tfds_data_dir=_TFDS_DATA_DIR.value,
        label_offset=_LABEL_OFFSET.value,
        class_index=_CLASS_INDEX.value,
        **limits,
    )
    split = info["splits"][_SPLIT.value]
    print(json.dumps({"output_dir": _OUTPUT_DIR.value, "split": _SPLIT.value,
                      "num_examples": split["num_examples"], "num_shards": len(split["shards"]),
                      "num_classes": info["num_classes"]}))


def run():
    """Console script `keras-vit-convert-data`."""
    cli.run(main)


if __name__ == "__main__":
    run()
