"""Data pipelines for keras-vit: TFRecord conversion and the tf.data input pipeline.

Never imports `keras_vit`: data flows from here into the model, not back.
"""

from pipelines.dataset import BadRecordCounter, CorruptShardError, build_dataset, shard_files
from pipelines.info import describe_source, load_dataset_info
from pipelines.preprocess import preprocess_for_eval
from pipelines.sources import CorruptSourceError
from pipelines.writer import convert

__all__ = [
    "BadRecordCounter",
    "CorruptShardError",
    "CorruptSourceError",
    "build_dataset",
    "convert",
    "describe_source",
    "load_dataset_info",
    "preprocess_for_eval",
    "shard_files",
]
