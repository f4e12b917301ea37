"""Data pipelines for keras-vit: TFRecord conversion and the tf.data input pipeline.

Never imports `keras_vit`: data flows from here into the model, not back.

The names below are loaded on first use, so that `pipelines.errors` (the error base that
`keras_vit` derives from) imports without TensorFlow: the model itself runs on the JAX backend
where TensorFlow is not installed.
"""

import importlib

#: Public name -> the module that defines it.
_EXPORTS = {
    "CROP_SAMPLERS": "pipelines.augment",
    "BadRecordCounter": "pipelines.dataset",
    "CorruptShardError": "pipelines.dataset",
    "DroppedPositions": "pipelines.positions",
    "build_dataset": "pipelines.dataset",
    "shard_files": "pipelines.dataset",
    "MissingFileError": "pipelines.errors",
    "UserError": "pipelines.errors",
    "EmptyShardError": "pipelines.info",
    "describe_source": "pipelines.info",
    "load_dataset_info": "pipelines.info",
    "preprocess_for_eval": "pipelines.preprocess",
    "CorruptSourceError": "pipelines.sources",
    "ImageTooLargeError": "pipelines.sources",
    "convert": "pipelines.writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
