"""`TrainConfig`: every setting of a training run, one field per tools/train.py flag.

`validate` checks a config before any work starts (no TensorFlow op, no file written) and
raises `ConfigError` naming the flag, what it holds and what would be accepted.
"""

import dataclasses
import re

from keras_vit.training.losses import LOSSES
from keras_vit.training.optimizers import OPTIMIZERS, WEIGHT_DECAY_GROUPS
from keras_vit.training.schedules import DECAYS
from keras_vit.training.strategy import STRATEGIES
from keras_vit.variants import ViTConfig, parse_variant
from pipelines.compiled_ops import RESIZE_KERNELS

MIXED_PRECISION = {"none": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
POOLINGS = ("token", "gap")
AUGMENTS = ("crop_flip", "none")
# A custom encoder in the form of keras_vit's model names: d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch>.


class ConfigError(ValueError):
    """An invalid or inconsistent training setting; the message names the flag."""


@dataclasses.dataclass
class TrainConfig:
    """A training run. Field = flag of tools/train.py (see its --help for each meaning)."""

    model: str = "B/16"
    image_size: int = 224
    num_classes: int = 0
    pooling: str = "token"
    representation_size: int = 0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    train_data: str = ""
    eval_data: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    prepare_data: str = ""
    tfds_data_dir: str = ""
    shuffle_buffer: int = 10_000
    cache_data: bool = False
    augment: str = "crop_flip"
    randaugment: str = ""
    mixup_alpha: float = 0.0
    resize_kernel: str = "auto"
    global_batch_size: int = 512
    eval_batch_size: int = 0
    optimizer: str = "sgd"
    learning_rate: float = 0.03
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    weight_decay_exclude: tuple = WEIGHT_DECAY_GROUPS
    warmup_steps: int = 500
    total_steps: int = 10_000
    decay: str = "cosine"
    end_learning_rate: float = 0.0
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    loss: str = "softmax"
    mixed_precision: str = "none"
    jit_compile: bool = False
    steps_per_execution: int = 1
    strategy: str = "auto"
    tpu: str = ""
    model_dir: str = ""
    eval_every_steps: int = 1000
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 5
    seed: int = 0
    deterministic: bool = False

    @property
    def micro_batch_size(self):
        """Images per forward/backward pass over all replicas: global batch / accumulation."""
        return self.global_batch_size // self.grad_accum_steps


def parse_model(model):
    """"B/16" -> ViTConfig; "d64_l4_h4_m128_p4" -> custom ViTConfig; "npz:PATH" -> "PATH"."""
    if model.startswith("npz:"):
        return model[len("npz:"):]
    return parse_variant(model)


def _fail(flag, value, expected):
    raise ConfigError(f"--{flag}={value!r}: {expected}")


def _choice(config, flag, choices):
    value = getattr(config, flag)
    if value not in choices:
        _fail(flag, value, f"expected one of {', '.join(choices)}.")


def validate(config, num_replicas=1):
    """Raises ConfigError for the first bad or inconsistent setting; returns `config`."""
    c = config
    try:
        parsed = parse_model(c.model)
    except (ValueError, TypeError) as error:
        _fail("model", c.model, f"{error} Or npz:PATH for a checkpoint.")
    if isinstance(parsed, ViTConfig) and c.image_size % parsed.patch_size:
        _fail("image_size", c.image_size,
              f"must be a multiple of the patch size {parsed.patch_size} of --model={c.model}.")
    for flag in ("image_size", "global_batch_size", "total_steps", "eval_every_steps",
                 "checkpoint_every_steps", "grad_accum_steps", "steps_per_execution"):
        if getattr(c, flag) <= 0:
            _fail(flag, getattr(c, flag), "must be a positive integer.")
    for flag in ("num_classes", "representation_size", "warmup_steps", "eval_batch_size",
                 "shuffle_buffer"):
        if getattr(c, flag) < 0:
            _fail(flag, getattr(c, flag), "must be >= 0.")
    _choice(c, "pooling", POOLINGS)
    _choice(c, "augment", AUGMENTS)
    _choice(c, "resize_kernel", RESIZE_KERNELS)
    if c.augment == "none" and (c.randaugment or c.mixup_alpha):
        _fail("augment", c.augment, "--randaugment and --mixup_alpha need --augment=crop_flip.")
    _choice(c, "optimizer", OPTIMIZERS)
    _choice(c, "decay", DECAYS)
    _choice(c, "loss", LOSSES)
    _choice(c, "mixed_precision", tuple(MIXED_PRECISION))
    _choice(c, "strategy", STRATEGIES)
    unknown = set(c.weight_decay_exclude) - set(WEIGHT_DECAY_GROUPS)
    if unknown:
        _fail("weight_decay_exclude", ",".join(c.weight_decay_exclude),
              f"unknown group(s) {sorted(unknown)}; expected any of {', '.join(WEIGHT_DECAY_GROUPS)}.")
    for flag in ("dropout_rate", "attention_dropout_rate", "stochastic_depth_rate",
                 "label_smoothing"):
        if not 0.0 <= getattr(c, flag) < 1.0:
            _fail(flag, getattr(c, flag), "must be in [0, 1).")
    for flag in ("learning_rate", "weight_decay", "grad_clip_norm", "mixup_alpha",
                 "end_learning_rate", "momentum"):
        if getattr(c, flag) < 0:
            _fail(flag, getattr(c, flag), "must be >= 0.")
    for flag in ("beta1", "beta2"):
        if not 0.0 <= getattr(c, flag) < 1.0:
            _fail(flag, getattr(c, flag), "must be in [0, 1).")
    if not c.train_data:
        _fail("train_data", c.train_data, "required: a directory written by tools/convert_data.py, "
              "a TFRecord file pattern, or tfds:NAME.")
    if not c.model_dir:
        _fail("model_dir", c.model_dir, "required: where checkpoints, logs and the model go.")
    if c.warmup_steps >= c.total_steps:
        _fail("warmup_steps", c.warmup_steps, f"must be smaller than --total_steps={c.total_steps}.")
    if c.global_batch_size % (num_replicas * c.grad_accum_steps):
        _fail("global_batch_size", c.global_batch_size,
              f"must be divisible by replicas ({num_replicas}) x --grad_accum_steps "
              f"({c.grad_accum_steps}) = {num_replicas * c.grad_accum_steps}, so every replica "
              "gets the same whole micro-batch.")
    eval_batch = c.eval_batch_size or c.micro_batch_size
    if eval_batch % num_replicas:
        _fail("eval_batch_size", c.eval_batch_size,
              f"the eval batch ({eval_batch}) must be divisible by the {num_replicas} replicas.")
    if c.keep_checkpoints < 0:
        _fail("keep_checkpoints", c.keep_checkpoints,
              "expected >= 1 (the newest checkpoints/ files kept), or 0 to keep all.")
    if c.total_steps % c.checkpoint_every_steps:
        _fail("checkpoint_every_steps", c.checkpoint_every_steps,
              f"must divide --total_steps={c.total_steps} (training runs in chunks of "
              "--checkpoint_every_steps updates; a killed run resumes at a chunk boundary).")
    if c.eval_every_steps % c.checkpoint_every_steps:
        _fail("eval_every_steps", c.eval_every_steps,
              f"must be a multiple of --checkpoint_every_steps={c.checkpoint_every_steps}.")
    if (c.checkpoint_every_steps * c.grad_accum_steps) % c.steps_per_execution:
        _fail("steps_per_execution", c.steps_per_execution,
              f"must divide --checkpoint_every_steps x --grad_accum_steps = "
              f"{c.checkpoint_every_steps * c.grad_accum_steps} micro-steps.")
    if c.randaugment and not re.fullmatch(r"\d+,\d+", c.randaugment):
        _fail("randaugment", c.randaugment, "expected 'NUM_LAYERS,MAGNITUDE' such as '2,10'.")
    if c.strategy == "tpu" and not c.tpu:
        _fail("tpu", c.tpu, "--strategy=tpu needs --tpu (the TPU name or grpc:// address, "
              "'local' on a TPU VM).")
    return config
