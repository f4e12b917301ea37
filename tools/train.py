r"""Trains a Vision Transformer: `python tools/train.py --flagfile=configs/NAME.flags [--flag=...]`.

    python tools/train.py --flagfile=configs/demo.flags            # CPU demo on sklearn digits
    python tools/train.py --flagfile=configs/cifar10_b16.flags \
        --train_data=/data/cifar10 --model=npz:ViT-B_16.npz --model_dir=/tmp/c10

One process per host; the strategy comes from --strategy (auto: TPU if --tpu, multi-worker if
TF_CONFIG names several tasks, all GPUs of the host otherwise). Kill it and start it again with
the same flags: it resumes from MODEL_DIR/backup. See docs/training.md.
"""

import dataclasses
import json

from absl import app, flags

import keras_vit_tools  # noqa: F401  (first: the TF backend, a quiet TF start-up)

from keras_vit import cli
from keras_vit.training import config as config_lib
from keras_vit.training import engine


def _define_flag(field):
    """One absl flag for a `TrainConfig` field: its type from the default, help from metadata."""
    name, default, help_text = field.name, field.default, field.metadata["help"]
    if "choices" in field.metadata:
        flags.DEFINE_enum(name, default, field.metadata["choices"], help_text)
    elif isinstance(default, bool):
        flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
        flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
        flags.DEFINE_float(name, default, help_text)
    elif isinstance(default, tuple):
        flags.DEFINE_list(name, list(default), help_text)
    else:
        flags.DEFINE_string(name, default, help_text)


def _define_flags():
    for field in dataclasses.fields(config_lib.TrainConfig):
        _define_flag(field)


_define_flags()


def config_from_flags():
    """The `TrainConfig` of the parsed command line."""
    values = {}
    for field in dataclasses.fields(config_lib.TrainConfig):
        value = flags.FLAGS[field.name].value
        values[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    return config_lib.TrainConfig(**values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; every setting is a --flag.")
    config = config_from_flags()
    results = engine.train(config)  # validates `config` before any work
    print(json.dumps({"model_dir": config.model_dir, **results}, indent=1))


def run():
    """Console script `keras-vit-train`."""
    cli.run(main)


if __name__ == "__main__":
    run()
