"""`TrainConfig`: every setting of a training run, one field per tools/train.py flag.

Each field carries its flag's help text (and, for a choice, the accepted values) in its
metadata, so tools/train.py defines its flags from this class alone. `validate` checks a config
before any work starts (no TensorFlow op, no file written) and raises `ConfigError` naming the
flag, what it holds and what would be accepted.
"""

import dataclasses
import math
import re

from keras_vit.training.distillation import DISTILLATION_KINDS
from keras_vit.training.losses import LOSSES
from keras_vit.training.optimizers import OPTIMIZERS, WEIGHT_DECAY_GROUPS
from keras_vit.training.schedules import DECAYS
from keras_vit.training.strategy import STRATEGIES
from keras_vit.variants import POOLINGS, ViTConfig, parse_variant
from pipelines.augment import AREA_RANGE, CROP_SAMPLERS
from pipelines.compiled_ops import RESIZE_KERNELS
from pipelines.errors import UserError

#: --mixed_precision value -> Keras dtype policy (None: the float32 default).
MIXED_PRECISION = {"none": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
AUGMENTS = ("crop_flip", "none")


class ConfigError(UserError):
    """An invalid or inconsistent training setting; the message names the flag."""


def _flag(default, help_text, choices=None):
    """A `TrainConfig` field: its default, its flag's help text and, for an enum, its choices."""
    metadata = {"help": help_text}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """A training run. Field = flag of tools/train.py; `metadata["help"]` says what it means."""

    model: str = _flag(
        "B/16", "B/16 (any keras_vit variant), d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch> for "
                "a custom size, or a checkpoint to fine-tune: pretrained:NAME (keras_vit's "
                "registry, e.g. pretrained:augreg_B/16_i21k) or checkpoint:PATH (any layout "
                "keras_vit.from_checkpoint reads; npz:PATH too).")
    image_size: int = _flag(
        224, "Training and eval resolution in pixels (multiple of the patch size).")
    num_classes: int = _flag(
        0, "Classes of the head; 0 = from the training data's dataset_info.json.")
    pooling: str = _flag(
        "token", "token (class token) or gap (global average pooling).", POOLINGS)
    representation_size: int = _flag(
        0, "Width of the pre-logits Dense+tanh layer (pre-training); 0 = none.")
    dropout_rate: float = _flag(0.0, "Dropout after embeddings, attention and MLP.")
    attention_dropout_rate: float = _flag(0.0, "Dropout on attention probabilities.")
    stochastic_depth_rate: float = _flag(0.0, "Drop-path rate of the last block.")
    distillation_token: bool = _flag(
        False, "A new model gets DeiT's distillation token and second head (a checkpoint "
               "keeps its own tokens).")
    remat: bool = _flag(
        False, "Rematerialise each encoder block in the backward pass: less memory, more time.")
    train_data: str = _flag(
        "", "Converted directory, TFRecord pattern or tfds:NAME (pipelines.build_dataset).")
    eval_data: str = _flag("", "Same for evaluation; empty = no evaluation.")
    train_split: str = _flag("train", "Split of --train_data to train on.")
    eval_split: str = _flag("test", "Split of --eval_data to evaluate on.")
    prepare_data: str = _flag(
        "", "A converter source (e.g. digits:) to convert into --train_data/--eval_data "
            "when they lack their split; empty = data must exist.")
    tfds_data_dir: str = _flag("", "Data dir of prepared TFDS datasets.")
    shuffle_buffer: int = _flag(
        10_000, "Records in the training shuffle buffer, >= 1 (1 = no record shuffle; the "
                "file order is still shuffled).")
    cache_data: bool = _flag(
        False, "Cache the serialized training records in memory (small datasets).")
    augment: str = _flag(
        "crop_flip", "crop_flip: Inception crop + horizontal flip (pipelines' training "
                     "transform); none: the eval preprocessing only, for data a crop or flip "
                     "would mislabel.", AUGMENTS)
    randaugment: str = _flag("", "'NUM_LAYERS,MAGNITUDE' such as '2,10'; empty = none.")
    mixup_alpha: float = _flag(0.0, "Mixup Beta(alpha, alpha); 0 = none (timm's Mixup).")
    cutmix_alpha: float = _flag(0.0, "CutMix Beta(alpha, alpha); 0 = none (timm's Mixup).")
    mixup_prob: float = _flag(
        1.0, "Probability that a batch is mixed (mixup or CutMix) when either alpha is > 0.")
    mixup_switch_prob: float = _flag(
        0.5, "Probability of CutMix instead of mixup for a mixed batch when both alphas are > 0.")
    random_erase: float = _flag(
        0.0, "Probability of timm's RandomErasing per image (one box of per-pixel normal noise "
             "in normalised units); 0 = none.")
    aug_repeats: int = _flag(
        1, "DeiT's repeated augmentation: each image K times in a row, differently augmented "
           "(copies of one image share a batch unless they fall at its edge); 1 = none.")
    crop_sampler: str = _flag(
        "tensorflow", "Inception crop sampling: tensorflow (sample_distorted_bounding_box, "
                      "Google's ViT code) or torchvision (RandomResizedCrop, timm and DeiT).",
        CROP_SAMPLERS)
    crop_min_area: float = _flag(
        AREA_RANGE[0], "Smallest fraction of the image area an Inception crop keeps (big_vision "
                       "0.05; torchvision/timm/DeiT 0.08).")
    resize_kernel: str = _flag(
        "auto", "Training resize+flip: compiled (a C++ op built on first use), tensorflow "
                "(TF's ops), or auto (compiled where it builds). See docs/data.md.",
        RESIZE_KERNELS)
    global_batch_size: int = _flag(
        512, "Images per optimizer update, over all replicas and accumulation steps.")
    eval_batch_size: int = _flag(
        0, "Global eval batch; 0 = global_batch_size / grad_accum_steps.")
    optimizer: str = _flag("sgd", "sgd (momentum), adam or adamw.", OPTIMIZERS)
    learning_rate: float = _flag(0.03, "Peak learning rate (after warmup).")
    momentum: float = _flag(0.9, "SGD momentum.")
    beta1: float = _flag(0.9, "Adam beta1.")
    beta2: float = _flag(0.999, "Adam beta2.")
    weight_decay: float = _flag(0.0, "Decoupled weight decay (w -= lr * wd * w); 0 = none.")
    layer_decay: float = _flag(
        0.0, "Layer-wise learning-rate decay F in (0, 1]: block i of L learns at F^(L - i) of "
             "the rate, embeddings at F^(L + 1), the head at the full rate (BEiT/MAE, timm); "
             "0 = none.")
    ema_decay: float = _flag(
        0.0, "Decay of an exponential moving average of the weights, evaluated beside them "
             "(val_top1_ema); 0 = none.")
    ema_warmup: bool = _flag(
        False, "Warm the EMA decay up as timm's ModelEmaV3: min(--ema_decay, 1 - (1 + step)^(-2/3)).")
    export_ema: bool = _flag(
        False, "Save the EMA weights, not the raw ones, as MODEL_DIR/model.keras (needs "
               "--ema_decay).")
    teacher: str = _flag(
        "", "DeiT distillation from this teacher: a .keras model of any architecture taking "
            "[0, 255] pixels, a keras_vit model directory or checkpoint, or pretrained:NAME; "
            "empty = none.")
    distillation: str = _flag(
        "hard", "soft (KL at --distillation_tau) or hard (the teacher's argmax) distillation.",
        DISTILLATION_KINDS)
    distillation_alpha: float = _flag(
        0.5, "Weight of the distillation loss; the label loss gets 1 - alpha (DeiT).")
    distillation_tau: float = _flag(1.0, "Temperature of soft distillation (DeiT).")
    weight_decay_exclude: tuple = _flag(
        WEIGHT_DECAY_GROUPS, "Variable groups without weight decay: bias, norm, embedding.")
    warmup_steps: int = _flag(500, "Updates of linear warmup.")
    total_steps: int = _flag(10_000, "Optimizer updates of the whole run.")
    decay: str = _flag("cosine", "cosine, linear or constant decay after warmup.", DECAYS)
    end_learning_rate: float = _flag(0.0, "Learning rate reached at --total_steps.")
    grad_clip_norm: float = _flag(1.0, "Clip gradients to this global norm; 0 = no clipping.")
    grad_accum_steps: int = _flag(
        1, "Micro-batches averaged per update (memory: batch / this per pass).")
    label_smoothing: float = _flag(0.0, "Label smoothing epsilon.")
    loss: str = _flag("softmax", "softmax or sigmoid cross-entropy.", LOSSES)
    mixed_precision: str = _flag(
        "none", "none, bfloat16 or float16 (Keras mixed policy; logits/loss in float32).",
        MIXED_PRECISION)
    jit_compile: bool = _flag(False, "Compile the train step with XLA.")
    steps_per_execution: int = _flag(1, "Micro-steps per tf.function call.")
    strategy: str = _flag("auto", "auto, default, mirrored, multi_worker or tpu.", STRATEGIES)
    tpu: str = _flag("", "TPU name or grpc:// address ('local' on a TPU VM).")
    model_dir: str = _flag("", "Checkpoints, logs, backup, model.keras, results.json.")
    eval_every_steps: int = _flag(
        1000, "Evaluate every this many updates (a multiple of checkpoint_every_steps).")
    checkpoint_every_steps: int = _flag(1000, "Back up and checkpoint every this many updates.")
    log_every_steps: int = _flag(
        100, "Write training scalars (loss, learning rate, images/s) to TensorBoard every this "
             "many updates.")
    fewshot_every_steps: int = _flag(
        0, "Few-shot linear accuracy of the pre-logits (big_vision's fewshot_lsr) to "
           "TensorBoard every this many updates (a multiple of checkpoint_every_steps); "
           "0 = never.")
    fewshot_train: str = _flag("", "Data the shots are drawn from; empty = --train_data.")
    fewshot_train_split: str = _flag("", "Its split; empty = --train_split.")
    fewshot_test: str = _flag(
        "", "Data few-shot accuracy is measured on; empty = --fewshot_train where given, else "
            "--eval_data (else --train_data).")
    fewshot_test_split: str = _flag("", "Its split; empty = --eval_split.")
    fewshot_shots: str = _flag("1,5,10,25", "Images per class of each few-shot problem.")
    fewshot_seeds: int = _flag(3, "Draws of the shots; accuracy is their mean.")
    fewshot_l2_reg: float = _flag(2.0 ** 10, "Ridge regulariser (big_vision: 2^10).")
    fewshot_train_examples: int = _flag(
        0, "Read the first N examples of the few-shot training split (big_vision: 65000 of "
           "ImageNet's); 0 = all.")
    keep_checkpoints: int = _flag(
        5, "Keep the newest N files in MODEL_DIR/checkpoints (0 = all).")
    seed: int = _flag(0, "Seed of initialization, data order and augmentation.")
    deterministic: bool = _flag(False, "Deterministic input pipeline (slower).")
    resume_data_position: bool = _flag(
        True, "A resumed run first skips the training examples the backup's steps consumed "
              "(read, not decoded), so with --deterministic it sees exactly the examples an "
              "uninterrupted run would; the time grows with the step resumed from "
              "(docs/training.md).")

    @property
    def micro_batch_size(self):
        """Images per forward/backward pass over all replicas: global batch / accumulation."""
        return self.global_batch_size // self.grad_accum_steps


def parse_model(model):
    """Reads the --model flag.

    Args:
        model: a keras_vit variant name such as "B/16"; a custom encoder in the form of
            keras_vit's model names, d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch> (e.g.
            "d64_l4_h4_m128_p4"); "pretrained:NAME", a checkpoint of keras_vit's registry;
            or "checkpoint:PATH" (also "npz:PATH"), a checkpoint file or folder of any
            layout `keras_vit.from_checkpoint` reads, to fine-tune.

    Returns:
        The `ViTConfig` of a variant or custom encoder, or the checkpoint's PATH or registry
        NAME (a str).

    Raises:
        ValueError, TypeError: `model` is none of these forms.
    """
    for prefix in CHECKPOINT_PREFIXES:
        if model.startswith(prefix):
            return model[len(prefix):]
    return parse_variant(model)


# --model prefixes of a checkpoint to start from: a registry name, or a path of any layout.
CHECKPOINT_PREFIXES = ("pretrained:", "checkpoint:", "npz:")


def _fail(flag, value, expected):
    raise ConfigError(f"--{flag}={value!r}: {expected}")


def _check_model(config):
    """--model parses, and --image_size is a whole number of its patches."""
    try:
        parsed = parse_model(config.model)
    except (ValueError, TypeError) as error:
        _fail("model", config.model,
              f"{error} Or pretrained:NAME (a registry name) or checkpoint:PATH for a checkpoint.")
    if config.model.startswith("pretrained:"):
        _check_registry_name(config.model[len("pretrained:"):])
    if isinstance(parsed, ViTConfig) and config.image_size % parsed.patch_size:
        _fail("image_size", config.image_size,
              f"must be a multiple of the patch size {parsed.patch_size} of "
              f"--model={config.model}.")


def _check_registry_name(name):
    from keras_vit import pretrained  # Here: only a pretrained:NAME model needs the registry.

    try:
        pretrained.entry(name)
    except pretrained.UnknownNameError as error:
        _fail("model", f"pretrained:{name}", str(error))


def _check_counts(config):
    """Sizes, steps and intervals are positive; the ones where 0 means "none/auto" are >= 0."""
    for flag in ("image_size", "global_batch_size", "total_steps", "eval_every_steps",
                 "checkpoint_every_steps", "grad_accum_steps", "steps_per_execution",
                 "shuffle_buffer", "aug_repeats", "log_every_steps"):
        if getattr(config, flag) <= 0:
            _fail(flag, getattr(config, flag), "must be a positive integer.")
    for flag in ("num_classes", "representation_size", "warmup_steps", "eval_batch_size"):
        if getattr(config, flag) < 0:
            _fail(flag, getattr(config, flag), "must be >= 0.")


_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}


def _check_choices(config, *flags):
    """Each of `flags` holds one of the choices in its field's metadata."""
    for flag in flags:
        value, choices = getattr(config, flag), _FIELDS[flag].metadata["choices"]
        if value not in choices:
            _fail(flag, value, f"expected one of {', '.join(choices)}.")


def _check_augment_options(config):
    """RandAugment, mixing, erasing and repeats act on top of the crop+flip transform, not on
    the eval preprocessing (repeated copies of it would be identical)."""
    if config.augment != "none":
        return
    for flag, unset in (("randaugment", ""), ("mixup_alpha", 0.0), ("cutmix_alpha", 0.0),
                        ("random_erase", 0.0), ("aug_repeats", 1)):
        if getattr(config, flag) != unset:
            _fail("augment", config.augment, f"--{flag}={getattr(config, flag)!r} needs "
                  "--augment=crop_flip.")


def _check_weight_decay_exclude(config):
    unknown = set(config.weight_decay_exclude) - set(WEIGHT_DECAY_GROUPS)
    if unknown:
        _fail("weight_decay_exclude", ",".join(config.weight_decay_exclude),
              f"unknown group(s) {sorted(unknown)}; "
              f"expected any of {', '.join(WEIGHT_DECAY_GROUPS)}.")


def _check_float_ranges(config):
    """Probabilities and decay rates are in [0, 1); rates, norms and coefficients are >= 0."""
    for flag in ("dropout_rate", "attention_dropout_rate", "stochastic_depth_rate",
                 "label_smoothing", "ema_decay"):
        if not 0.0 <= getattr(config, flag) < 1.0:
            _fail(flag, getattr(config, flag), "must be in [0, 1).")
    for flag in ("mixup_prob", "mixup_switch_prob", "random_erase", "layer_decay",
                 "distillation_alpha"):
        if not 0.0 <= getattr(config, flag) <= 1.0:
            _fail(flag, getattr(config, flag), "must be in [0, 1].")
    if not 0.0 < config.crop_min_area <= 1.0:
        _fail("crop_min_area", config.crop_min_area, "must be in (0, 1].")
    if config.distillation_tau <= 0:
        _fail("distillation_tau", config.distillation_tau, "must be > 0.")
    for flag in ("learning_rate", "weight_decay", "grad_clip_norm", "mixup_alpha",
                 "cutmix_alpha", "end_learning_rate", "momentum"):
        if getattr(config, flag) < 0:
            _fail(flag, getattr(config, flag), "must be >= 0.")
    for flag in ("beta1", "beta2"):
        if not 0.0 <= getattr(config, flag) < 1.0:
            _fail(flag, getattr(config, flag), "must be in [0, 1).")


def _check_required_paths(config):
    if not config.train_data:
        _fail("train_data", config.train_data, "required: a directory written by "
              "tools/convert_data.py, a TFRecord file pattern, or tfds:NAME.")
    if not config.model_dir:
        _fail("model_dir", config.model_dir, "required: where checkpoints, logs and the model go.")


def _check_warmup(config):
    if config.warmup_steps >= config.total_steps:
        _fail("warmup_steps", config.warmup_steps,
              f"must be smaller than --total_steps={config.total_steps}.")


def _check_batch_divisibility(config, num_replicas):
    """Every replica gets the same whole micro-batch, in training and in evaluation."""
    per_update = num_replicas * config.grad_accum_steps
    if config.global_batch_size % per_update:
        _fail("global_batch_size", config.global_batch_size,
              f"must be divisible by replicas ({num_replicas}) x --grad_accum_steps "
              f"({config.grad_accum_steps}) = {per_update}, so every replica "
              "gets the same whole micro-batch.")
    eval_batch = config.eval_batch_size or config.micro_batch_size
    if eval_batch % num_replicas:
        _fail("eval_batch_size", config.eval_batch_size,
              f"the eval batch ({eval_batch}) must be divisible by the {num_replicas} replicas.")


def _check_chunks(config):
    """Checkpoints, evaluations and tf.function calls line up with the chunks `fit` runs in."""
    if config.keep_checkpoints < 0:
        _fail("keep_checkpoints", config.keep_checkpoints,
              "expected >= 1 (the newest checkpoints/ files kept), or 0 to keep all.")
    if config.total_steps % config.checkpoint_every_steps:
        _fail("checkpoint_every_steps", config.checkpoint_every_steps,
              f"must divide --total_steps={config.total_steps} (training runs in chunks of "
              "--checkpoint_every_steps updates; a killed run resumes at a chunk boundary).")
    if config.eval_every_steps % config.checkpoint_every_steps:
        _fail("eval_every_steps", config.eval_every_steps,
              f"must be a multiple of --checkpoint_every_steps={config.checkpoint_every_steps}.")
    micro_steps = config.checkpoint_every_steps * config.grad_accum_steps
    if micro_steps % config.steps_per_execution:
        _fail("steps_per_execution", config.steps_per_execution,
              f"must divide --checkpoint_every_steps x --grad_accum_steps = "
              f"{micro_steps} micro-steps.")


def _check_fewshot(config):
    """--fewshot_* hold positive counts, and the probe runs at a chunk boundary."""
    if config.fewshot_every_steps < 0 or config.fewshot_every_steps % config.checkpoint_every_steps:
        _fail("fewshot_every_steps", config.fewshot_every_steps,
              f"must be 0 (off) or a multiple of --checkpoint_every_steps="
              f"{config.checkpoint_every_steps}.")
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", config.fewshot_shots):
        _fail("fewshot_shots", config.fewshot_shots,
              "expected positive integers such as 1,5,10,25.")
    if config.fewshot_seeds < 1:
        _fail("fewshot_seeds", config.fewshot_seeds, "expected >= 1.")
    if not (math.isfinite(config.fewshot_l2_reg) and config.fewshot_l2_reg > 0):
        _fail("fewshot_l2_reg", config.fewshot_l2_reg, "expected a finite number > 0.")
    if config.fewshot_train_examples < 0:
        _fail("fewshot_train_examples", config.fewshot_train_examples,
              "expected >= 1, or 0 for all.")


def _check_randaugment_format(config):
    if config.randaugment and not re.fullmatch(r"\d+,\d+", config.randaugment):
        _fail("randaugment", config.randaugment, "expected 'NUM_LAYERS,MAGNITUDE' such as '2,10'.")


def _check_ema_and_distillation(config):
    """EMA flags need --ema_decay; a distillation token needs a teacher and a new model."""
    for flag in ("ema_warmup", "export_ema"):
        if getattr(config, flag) and not config.ema_decay:
            _fail(flag, True, "needs --ema_decay > 0 (the EMA to warm up or export).")
    if config.distillation_token and not config.teacher:
        _fail("distillation_token", True, "the distillation head learns from a teacher: pass "
              "--teacher, or leave the token out.")
    if config.distillation_token and parse_model_is_checkpoint(config.model):
        _fail("distillation_token", True, f"--model={config.model!r} is a checkpoint, which "
              "keeps its own tokens; the flag applies to a new model (a variant or custom size).")


def parse_model_is_checkpoint(model):
    """Does --model name a checkpoint (pretrained:, checkpoint:, npz:) rather than a new model?"""
    return model.startswith(CHECKPOINT_PREFIXES)


def _check_tpu(config):
    if config.strategy == "tpu" and not config.tpu:
        _fail("tpu", config.tpu, "--strategy=tpu needs --tpu (the TPU name or grpc:// address, "
              "'local' on a TPU VM).")


def validate(config, num_replicas=1):
    """Checks every setting of a run before any work starts.

    Args:
        config: the `TrainConfig` to check.
        num_replicas: replicas of the strategy the run will use (batches must split evenly).

    Returns:
        `config`, unchanged.

    Raises:
        ConfigError: the first bad or inconsistent setting, in the order of the checks below;
            the message starts with `--FLAG=VALUE:`.
    """
    _check_model(config)
    _check_counts(config)
    _check_choices(config, "pooling", "augment", "resize_kernel", "crop_sampler", "distillation")
    _check_augment_options(config)
    _check_choices(config, "optimizer", "decay", "loss", "mixed_precision", "strategy")
    _check_weight_decay_exclude(config)
    _check_float_ranges(config)
    _check_required_paths(config)
    _check_warmup(config)
    _check_batch_divisibility(config, num_replicas)
    _check_chunks(config)
    _check_randaugment_format(config)
    _check_fewshot(config)
    _check_ema_and_distillation(config)
    _check_tpu(config)
    return config
