"""Google's ViT checkpoints (.npz) in and out.

The only module that knows the key names of google-research/vision_transformer (the AugReg
checkpoints of "How to train your ViT" use the same ones):

    embedding/{kernel,bias}                       (P, P, 3, D), (D,)
    cls                                           (1, 1, D)            token pooling only
    Transformer/posembed_input/pos_embedding      (1, [1 +] N, D)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel  (D, H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/bias    (H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel               (H, D/H, D)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/bias                 (D,)
    Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel,bias}
    Transformer/encoder_norm/{scale,bias}
    pre_logits/{kernel,bias}                      optional, (D, R)
    head/{kernel,bias}                            (D or R, K)

extended, for the options other projects' ViTs use (keras_vit's canonical layout, which every
reader in `keras_vit.formats` converts to; the MAP head under big_vision's names):

    dist                                          (1, 1, D)     DeiT's distillation token
    reg                                           (1, R, D)     register tokens
    Transformer/posembed_input/pos_embedding      (1, N, D) when it covers the patches only
    Transformer/encoderblock_{i}/LayerScale_{0,1}/scale   (D,)  after the attention, the MLP
    fc_norm/{scale,bias}                          the final norm after pooling (then no
                                                  Transformer/encoder_norm)
    MAPHead_0/probe                               (1, 1, D)
    MAPHead_0/MultiHeadDotProductAttention_0/...  as the blocks' attention
    MAPHead_0/LayerNorm_0/{scale,bias}, MAPHead_0/MlpBlock_0/Dense_{0,1}/{kernel,bias}
    head_dist/{kernel,bias}                       DeiT's distillation head

The token order is [cls, dist, reg..., patches].
"""

import dataclasses
import json
import os
import re
import zipfile

import keras
import numpy as np

from keras_vit import layers as vit_layers
from keras_vit.files import write_atomically
from keras_vit.flexi import resample_patch_embedding
from keras_vit.model import ModelOptions, create_model, model_options
from keras_vit.posemb import resample
from keras_vit.variants import ViTConfig
from pipelines.errors import MissingFileError, UserError

BLOCK_PREFIX = "Transformer/encoderblock_{}"
_ATTENTION = BLOCK_PREFIX + "/MultiHeadDotProductAttention_1"
POSITION_EMBEDDING_KEY = "Transformer/posembed_input/pos_embedding"
_BLOCK_PATTERN = re.compile(r"^Transformer/encoderblock_(\d+)/")
_OVERRIDABLE = ("dropout_rate", "attention_dropout_rate", "stochastic_depth_rate", "include_top", "name",
                "remat", "dynamic_image_size")
# What the arrays cannot say but a user may: for a position embedding whose length fits a
# square grid with and without the prefix tokens.
_LAYOUT_OVERRIDES = ("position_embedding_prefix",)
# The npz key of the create_model options the arrays cannot say (exact GELU, epsilon, input
# normalisation, ...), as UTF-8 JSON bytes in a uint8 array: written only for a model that has
# some, so a Google-option model's file holds Google's keys alone. Google's and timm's loaders
# read the keys they know and leave this one alone.
OPTIONS_KEY = "keras_vit/options"
_STORED_OPTIONS = ("approximate_gelu", "layer_norm_epsilon", "input_mean", "input_std",
                   "eval_crop_fraction", "position_embedding_prefix", "pooling")


class CheckpointError(UserError):
    """A checkpoint file that cannot be read or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, MissingFileError):
    """The checkpoint file does not exist (also a `MissingFileError`, a `FileNotFoundError`)."""


@dataclasses.dataclass(frozen=True)
class _CheckpointArray:
    """One row of the two-way table: a checkpoint key and the Keras variable it fills.

    Three kinds of row, told apart by their fields:
      - the whole variable as is: `shape` is the variable's, `columns` all of them;
      - the whole variable reshaped: the attention output kernel, (D, D) here and (H, D/H, D)
        in the checkpoint;
      - one of query, key and value, a third of the fused qkv Dense's last-axis `columns`:
        split from the variable on save, joined into it on load.

    Attributes:
        key: the npz key.
        variable: the Keras variable.
        shape: the array's shape in the checkpoint.
        columns: the slice of the variable's last axis that this array holds (`_ALL_COLUMNS`
            for the whole variable).
    """

    key: str
    variable: keras.Variable
    shape: tuple
    columns: slice

    def to_checkpoint(self, value):
        """The variable's value (a NumPy array of its shape) -> this key's array."""
        return value[..., self.columns].reshape(self.shape)

    def from_checkpoint(self, array):
        """This key's array -> its columns of the variable, (..., columns held)."""
        *leading, width = self.variable.shape
        return array.reshape((*leading, len(range(width)[self.columns])))


_ALL_COLUMNS = slice(None)


def _plain(key, variable):
    return _CheckpointArray(key, variable, tuple(variable.shape), _ALL_COLUMNS)


def _dense(prefix, layer):
    return [_plain(f"{prefix}/kernel", layer.kernel), _plain(f"{prefix}/bias", layer.bias)]


def _norm(prefix, layer):
    return [_plain(f"{prefix}/scale", layer.gamma), _plain(f"{prefix}/bias", layer.beta)]


def _projection(prefix, name, dense, part, heads, head_dim):
    """Rows of one of query, key, value: the `part`-th D columns of a (D, k·D) Dense."""
    hidden_size = heads * head_dim
    columns = slice(part * hidden_size, (part + 1) * hidden_size)
    return [
        _CheckpointArray(f"{prefix}/{name}/kernel", dense.kernel,
                         (dense.kernel.shape[0], heads, head_dim), columns),
        _CheckpointArray(f"{prefix}/{name}/bias", dense.bias, (heads, head_dim), columns),
    ]


def _output_projection(prefix, dense, heads, head_dim):
    """Rows of the attention output Dense: kernel (H, D/H, D) in the checkpoint."""
    return [
        _CheckpointArray(f"{prefix}/out/kernel", dense.kernel,
                         (heads, head_dim, dense.kernel.shape[1]), _ALL_COLUMNS),
        _plain(f"{prefix}/out/bias", dense.bias),
    ]


def _attention(prefix, attention):
    """The rows of one `layers.MultiHeadSelfAttention` (the original's per-head layout)."""
    heads, head_dim = attention.num_heads, attention.head_dim
    rows = []
    for part, name in enumerate(("query", "key", "value")):
        rows += _projection(prefix, name, attention.qkv, part, heads, head_dim)
    return rows + _output_projection(prefix, attention.out, heads, head_dim)


def _block(index, block):
    """The rows of encoder block `index`, a `layers.TransformerBlock`."""
    prefix = BLOCK_PREFIX.format(index)
    rows = (
        _norm(f"{prefix}/LayerNorm_0", block.attention_norm)
        + _attention(_ATTENTION.format(index), block.attention)
        + _norm(f"{prefix}/LayerNorm_2", block.mlp_norm)
        + _dense(f"{prefix}/MlpBlock_3/Dense_0", block.mlp.dense_1)
        + _dense(f"{prefix}/MlpBlock_3/Dense_1", block.mlp.dense_2)
    )
    for number, scale in enumerate((block.attention_scale, block.mlp_scale)):
        if scale is not None:
            rows.append(_plain(f"{prefix}/LayerScale_{number}/scale", scale.scale))
    return rows


def _map_head(pooling):
    """The rows of a `layers.AttentionPooling`, under big_vision's MAPHead_0 names."""
    heads, head_dim = pooling.num_heads, pooling.head_dim
    attention = "MAPHead_0/MultiHeadDotProductAttention_0"
    return (
        [_plain("MAPHead_0/probe", pooling.probe)]
        + _projection(attention, "query", pooling.query, 0, heads, head_dim)
        + _projection(attention, "key", pooling.key_value, 0, heads, head_dim)
        + _projection(attention, "value", pooling.key_value, 1, heads, head_dim)
        + _output_projection(attention, pooling.out, heads, head_dim)
        + _norm("MAPHead_0/LayerNorm_0", pooling.norm)
        + _dense("MAPHead_0/MlpBlock_0/Dense_0", pooling.mlp.dense_1)
        + _dense("MAPHead_0/MlpBlock_0/Dense_1", pooling.mlp.dense_2)
    )


_PREFIX_TOKENS = (("class_token", "cls"), ("distillation_token", "dist"), ("register_tokens", "reg"))


def _weight_table(model):
    """Every weight of `model` as `_CheckpointArray` rows, in checkpoint order."""
    projection = model.get_layer("patch_embedding").projection
    table = [_plain("embedding/kernel", projection.kernel), _plain("embedding/bias", projection.bias)]
    for layer_name, key in _PREFIX_TOKENS:
        if _has_layer(model, layer_name):
            table.append(_plain(key, model.get_layer(layer_name).token))
    table.append(_plain(POSITION_EMBEDDING_KEY, model.get_layer("position_embedding").embedding))
    encoder = model.get_layer("encoder")
    for index, block in enumerate(encoder.blocks):
        table += _block(index, block)
    if encoder.norm is not None:
        table += _norm("Transformer/encoder_norm", encoder.norm)
    if isinstance(model.get_layer("pooling"), vit_layers.AttentionPooling):
        table += _map_head(model.get_layer("pooling"))
    if _has_layer(model, "fc_norm"):
        table += _norm("fc_norm", model.get_layer("fc_norm"))
    if _has_layer(model, "pre_logits"):
        table += _dense("pre_logits", model.get_layer("pre_logits"))
    if _has_layer(model, "head"):
        head = model.get_layer("head")
        if isinstance(head, vit_layers.DistilledHead):
            table += _dense("head", head.class_head) + _dense("head_dist", head.distillation_head)
        else:
            table += _dense("head", head)
    return table


def model_arrays(model):
    """`model`'s weights in the canonical layout: {key: float32 NumPy array}, as save_npz
    writes them."""
    return {
        row.key: row.to_checkpoint(np.asarray(row.variable.numpy(), dtype=np.float32))
        for row in _weight_table(model)
    }


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)


def save_npz(model, path):
    """Writes `model`'s weights to `path` in the layout of Google's checkpoints.

    The file loads with `from_npz`, with the original JAX code and with timm. It is written
    under a temporary name and then renamed, so an interrupted save leaves no partial `path`.

    Args:
        model: a model as `create_model` or `from_npz` builds it.
        path: the .npz file to write; its directory is created if needed.

    Returns:
        `path`.
    """
    arrays = model_arrays(model)
    options = _options_beyond_arrays(model, arrays)
    if options:
        arrays[OPTIONS_KEY] = np.frombuffer(json.dumps(options).encode(), np.uint8)
    return write_atomically(path, lambda temporary: np.savez(temporary, **arrays), ".npz")


def _options_beyond_arrays(model, arrays):
    """The model's options that differ from what its arrays imply: Google's defaults, and the
    pooling the arrays' class token or MAP head suggests."""
    options = model_options(model)
    implied = dict(dataclasses.asdict(ModelOptions()), position_embedding_prefix=True,
                   pooling="map" if "MAPHead_0/probe" in arrays
                   else "token" if "cls" in arrays else "gap")
    return {key: options[key] for key in _STORED_OPTIONS
            if _jsonable(options[key]) != _jsonable(implied[key])}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def canonical_arrays(arrays, path):
    """An .npz's arrays (`load_npz`) -> (float32 arrays, the options stored beside them)."""
    arrays = dict(arrays)
    stored = arrays.pop(OPTIONS_KEY, None)
    options = {}
    if stored is not None:
        try:
            options = json.loads(np.asarray(stored, np.uint8).tobytes().decode())
        except (ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: {OPTIONS_KEY} is not the JSON save_npz writes "
                                  f"({error}).") from error
        unknown = sorted(set(options) - set(_STORED_OPTIONS))
        if not isinstance(options, dict) or unknown:
            raise CheckpointError(f"{path}: {OPTIONS_KEY} holds unknown options {unknown}.")
    return {key: as_float32(value, key, path) for key, value in arrays.items()}, options


def load_npz(path):
    """Reads every array of an .npz checkpoint, with errors that name the file.

    Args:
        path: an .npz file.

    Returns:
        {key: NumPy array}, each array in the dtype stored in the file (`from_npz` casts them
        to float32).

    Raises:
        CheckpointNotFoundError: `path` does not exist.
        CheckpointError: `path` is not a readable .npz archive of named arrays.
    """
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"Checkpoint file {path} does not exist.")
    try:
        data = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable .npz checkpoint ({error}). Expected a checkpoint of "
            "google-research/vision_transformer or one written by keras_vit.save_npz; check "
            "that the download is complete."
        ) from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(
            f"{path} holds a single array, not a checkpoint: expected an .npz archive of "
            "named arrays (as np.savez writes)."
        )
    with data:
        try:
            return {key: np.asarray(data[key]) for key in data.files}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise CheckpointError(
                f"{path} has an unreadable array ({error}); check that the download is "
                "complete."
            ) from error


def _require(arrays, keys, path):
    missing = [key for key in keys if key not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)[:12]) + (" ..." if len(arrays) > 12 else "")
        raise CheckpointError(
            f"{path} is not a ViT checkpoint in Google's layout (or keras_vit's, which extends "
            f"it): missing {missing}. "
            f"Found keys: {found or 'none'}."
        )


def describe_checkpoint(arrays, path="checkpoint", options=None):
    """Reads the architecture from the array shapes (canonical layout).

    Args:
        arrays: {key: array} of a checkpoint, as `load_npz` returns it.
        path: the file's name, for the error messages.
        options: `create_model` options a reader already knows (`formats.common`); those the
            arrays also say are checked against them.

    Returns:
        A dict with "config" (ViTConfig), "pooling", "grid_size" (rows, columns) of patches,
        "representation_size" (None without pre-logits), "num_classes" (None when the
        checkpoint has no head) and "options" (the `create_model` options: tokens, LayerScale,
        norm placement, position-embedding coverage, and those given).

    Raises:
        CheckpointError: the keys or shapes are not those of a ViT checkpoint.
    """
    options = dict(options or {})
    config = _encoder_config(arrays, path)
    found = {
        "class_token": "cls" in arrays,
        "distillation_token": "dist" in arrays,
        "num_registers": int(arrays["reg"].shape[1]) if "reg" in arrays else 0,
        "layer_scale": _LAYER_SCALE_INIT if BLOCK_PREFIX.format(0) + "/LayerScale_0/scale" in arrays else None,
        "norm_after_pooling": "fc_norm/scale" in arrays,
    }
    pooling = options.pop("pooling", None) or (
        "map" if "MAPHead_0/probe" in arrays else "token" if found["class_token"] else "gap")
    options.pop("image_size", None)
    num_prefix = found["class_token"] + found["distillation_token"] + found["num_registers"]
    covers_prefix, grid_side = _position_grid(arrays, num_prefix, options, path)
    found["position_embedding_prefix"] = covers_prefix
    representation_size = None
    if "pre_logits/kernel" in arrays:
        representation_size = int(arrays["pre_logits/kernel"].shape[1])
    num_classes = int(arrays["head/kernel"].shape[1]) if "head/kernel" in arrays else None
    return {
        "config": config,
        "pooling": pooling,
        "grid_size": (grid_side, grid_side),
        "representation_size": representation_size,
        "num_classes": num_classes,
        "options": {**options, **found},
    }


# A placeholder: a loaded LayerScale's init value only matters to a model trained anew.
_LAYER_SCALE_INIT = 1e-5


def _encoder_config(arrays, path):
    """The ViTConfig (patch, width, depth, heads, MLP) that the arrays' shapes say."""
    _require(arrays, ["embedding/kernel", POSITION_EMBEDDING_KEY], path)
    kernel = arrays["embedding/kernel"]
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
        raise CheckpointError(
            f"{path}: embedding/kernel has shape {kernel.shape}, expected (P, P, 3, D)."
        )
    patch_size, hidden_size = int(kernel.shape[0]), int(kernel.shape[3])
    block_indices = sorted({int(m.group(1)) for k in arrays if (m := _BLOCK_PATTERN.match(k))})
    if not block_indices or block_indices != list(range(len(block_indices))):
        raise CheckpointError(
            f"{path}: expected encoder blocks Transformer/encoderblock_0..L-1, found indices "
            f"{block_indices}."
        )
    query_key = _ATTENTION.format(0) + "/query/kernel"
    mlp_key = BLOCK_PREFIX.format(0) + "/MlpBlock_3/Dense_0/kernel"
    _require(arrays, [query_key, mlp_key], path)
    num_heads = int(arrays[query_key].shape[1])
    mlp_dim = int(arrays[mlp_key].shape[1])
    try:
        return ViTConfig(patch_size, hidden_size, len(block_indices), num_heads, mlp_dim)
    except ValueError as error:
        raise CheckpointError(f"{path}: inconsistent shapes: {error}") from error


def _position_grid(arrays, num_prefix, options, path):
    """(whether the position embedding covers the prefix tokens, side of the patch grid).

    Where the checkpoint does not say whether its position embedding covers the prefix
    tokens, its length does, unless both readings give a square grid.
    """
    num_positions = int(arrays[POSITION_EMBEDDING_KEY].shape[1])
    known = options.pop("position_embedding_prefix", None)
    readings = [True, False] if known is None else [known]
    if num_prefix == 0:
        readings = [True if known is None else known]
    fits = [(covers, num_positions - num_prefix * covers) for covers in readings]
    fits = [(covers, n) for covers, n in fits if n > 0 and round(n ** 0.5) ** 2 == n]
    if len(fits) == 1:
        return fits[0][0], int(round(fits[0][1] ** 0.5))
    if not fits:
        raise CheckpointError(
            f"{path}: {POSITION_EMBEDDING_KEY} has {num_positions} positions, which with {num_prefix} prefix "
            "token(s) is not a square patch grid."
        )
    raise CheckpointError(
        f"{path}: {POSITION_EMBEDDING_KEY} has {num_positions} positions: a square grid both with and without "
        f"its {num_prefix} prefix token(s). Pass position_embedding_prefix=True (it covers them) "
        "or False (patches only)."
    )


def non_finite_arrays(named_arrays):
    """Which arrays hold NaN or infinite values.

    Args:
        named_arrays: (name, array) pairs; the arrays are NumPy arrays or anything
            `np.asarray` takes.

    Returns:
        One "name (3 NaN, 1 Inf)" string per array that holds any, in the given order.
    """
    found = []
    for name, array in named_arrays:
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.inexact) or np.isfinite(array).all():
            continue
        counts = [(int(np.isnan(array).sum()), "NaN"), (int(np.isinf(array).sum()), "Inf")]
        found.append(f"{name} (" + ", ".join(f"{n} {kind}" for n, kind in counts if n) + ")")
    return found


def check_finite(named_arrays, source, *, allow_non_finite=False):
    """Raises a CheckpointError naming every array of `source` that holds NaN or Inf.

    A model with such weights predicts NaN for every image, so loading refuses it;
    `allow_non_finite=True` (for research on diverged runs) lets it through.

    Args:
        named_arrays: (name, array) pairs, e.g. npz keys or Keras variable paths.
        source: the file the arrays come from, for the message.
        allow_non_finite: skip the check.
    """
    if allow_non_finite:
        return
    found = non_finite_arrays(named_arrays)
    if found:
        listed = ", ".join(found[:20]) + (f", ... ({len(found) - 20} more)" if len(found) > 20 else "")
        raise CheckpointError(
            f"{source}: non-finite values in {len(found)} "
            f"{'array' if len(found) == 1 else 'arrays'}: {listed}. The run that wrote it "
            "probably diverged; pass allow_non_finite=True (a tool's --allow_non_finite_weights) "
            "to load it anyway."
        )


def from_npz(path, *, image_size=None, num_classes=None, allow_non_finite=False, patch_size=None,
             **overrides):
    """Builds a ViT from a Google checkpoint and loads its weights.

    Args:
        path: an .npz in the layout of google-research/vision_transformer (or save_npz's).
        image_size: input side in pixels (or (height, width)). None keeps the checkpoint's;
            another size resamples the position-embedding grid bilinearly (class token kept).
        num_classes: None keeps the checkpoint's head. A different number drops the pre-logits
            layer and attaches a new zero-initialized head (the paper's fine-tuning recipe).
        **overrides: dropout_rate, attention_dropout_rate, stochastic_depth_rate,
            include_top, name, remat, dynamic_image_size, passed to `create_model`.
        allow_non_finite: load arrays holding NaN or Inf instead of refusing them.
        patch_size: None keeps the checkpoint's; another P' resizes its patch embedding by
            FlexiViT's pseudo-inverse (`keras_vit.resample_patch_embedding`) and resamples
            the position grid to image_size / P' (image_size defaults to the checkpoint's).

    Returns:
        A `keras.Model` as `create_model` builds it, with the checkpoint's weights.

    Raises:
        CheckpointError: the file is missing (`CheckpointNotFoundError`) or unreadable, it
            does not fit the model (every missing, unexpected and mis-shaped key is listed),
            or an array it loads holds NaN or Inf (every such key is listed).
    """
    _check_overrides("from_npz", overrides)
    arrays, options = canonical_arrays(load_npz(path), path)
    return build_model(arrays, path, options=options, image_size=image_size,
                       num_classes=num_classes, allow_non_finite=allow_non_finite,
                       patch_size=patch_size, **overrides)


def _check_overrides(function, overrides):
    unknown = sorted(set(overrides) - set(_OVERRIDABLE + _LAYOUT_OVERRIDES))
    if unknown:
        raise TypeError(
            f"{function} got unexpected arguments {unknown}; the architecture is read from the "
            f"checkpoint. Allowed: image_size, num_classes, patch_size, "
            f"{', '.join(_OVERRIDABLE + _LAYOUT_OVERRIDES)}."
        )


def as_float32(array, key, source):
    """A checkpoint array as float32, bfloat16 included (an .npz stores it as a raw 2-byte
    type, the upper half of a float32, so shifting it back up is exact)."""
    array = np.asarray(array)
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if array.dtype.kind not in "fiu" and str(array.dtype) != "bfloat16":
        raise CheckpointError(f"{source}: {key} has dtype {array.dtype}, expected a float array.")
    # A float64 value beyond float32's range becomes Inf here, which check_finite reports.
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


def build_model(arrays, source, *, options=None, image_size=None, num_classes=None,
                allow_non_finite=False, patch_size=None, **overrides):
    """Builds the ViT that canonical-layout arrays describe and loads them into it.

    Args:
        arrays: {canonical key: float32 array} (`keras_vit.formats` readers give them).
        source: the file or folder they come from, for messages.
        options: `create_model` options the arrays cannot say (GELU form, LayerNorm epsilon,
            input normalisation, eval crop, pooling, position-embedding coverage).
        image_size, num_classes, allow_non_finite, patch_size, **overrides: as `from_npz`.

    Returns:
        The `keras.Model`, with the arrays' weights.
    """
    options = dict(options or {}, **{k: overrides.pop(k) for k in _LAYOUT_OVERRIDES
                                      if k in overrides})
    spec = describe_checkpoint(arrays, source, options)
    config = spec["config"]
    new_head = num_classes is not None and num_classes != spec["num_classes"]
    if spec["num_classes"] is None and num_classes is None and overrides.get("include_top", True):
        raise CheckpointError(
            f"{source} has no classifier head (a backbone, or a head its publisher removed); "
            "pass num_classes=K to attach a new zero-initialised head, or include_top=False "
            "for the pooled features."
        )
    if image_size is None:
        image_size = tuple(side * config.patch_size for side in spec["grid_size"])
    arrays = dict(arrays)
    if patch_size is not None and patch_size != config.patch_size:
        arrays["embedding/kernel"], config = _resized_patches(arrays, config, patch_size,
                                                              image_size, source)
    model = create_model(
        config,
        image_size=image_size,
        num_classes=num_classes if new_head else (spec["num_classes"] or 1),
        pooling=spec["pooling"],
        representation_size=None if new_head else spec["representation_size"],
        **spec["options"],
        **overrides,
    )
    position_layer = model.get_layer("position_embedding")
    if position_layer.grid_size != spec["grid_size"]:
        arrays[POSITION_EMBEDDING_KEY] = resample(
            arrays[POSITION_EMBEDDING_KEY], spec["grid_size"], position_layer.grid_size,
            position_layer.num_prefix_tokens,
        )
    heads = ("head/", "head_dist/")
    if new_head:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(heads + ("pre_logits/",))}
    # A model built with include_top=False takes no head from the checkpoint.
    ignored = () if _has_layer(model, "head") else heads
    _assign(model, arrays, source, ignore_extra_prefixes=ignored,
            keep_initial_prefixes=heads if new_head else (),
            allow_non_finite=allow_non_finite)
    return model


def _resized_patches(arrays, config, patch_size, image_size, source):
    """(`embedding/kernel` resized to patch_size by FlexiViT's PI-resize, the ViTConfig of
    that patch size): `build_model(patch_size=...)`."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) \
            or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}.")
    sides = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
    if any(side % patch_size for side in sides):
        raise ValueError(
            f"{source}: image_size {sides[0]}x{sides[1]} is no multiple of patch_size "
            f"{patch_size}; pass an image_size divisible by it (the checkpoint's grid at the "
            f"new patch size would be {sides[0] // patch_size}x{sides[1] // patch_size}).")
    kernel = resample_patch_embedding(arrays["embedding/kernel"], int(patch_size))
    return kernel, dataclasses.replace(config, patch_size=int(patch_size))


def _assign(model, arrays, path, ignore_extra_prefixes=(), keep_initial_prefixes=(),
            allow_non_finite=False):
    """Copies checkpoint arrays into the model, checking every key, shape and value first.

    Checkpoint keys under `ignore_extra_prefixes` are not used; model weights under
    `keep_initial_prefixes` (a new head) keep their initial values.
    """
    table = [
        row for row in _weight_table(model) if not row.key.startswith(tuple(keep_initial_prefixes))
    ]
    _check_fit(table, arrays, f"Checkpoint {path} does not fit the model {model.name}:",
               tuple(ignore_extra_prefixes))
    check_finite(((row.key, arrays[row.key]) for row in table), path,
                 allow_non_finite=allow_non_finite)
    # Each row fills its columns of its variable's value; each variable is assigned once.
    values = {}
    for row in table:
        _, value = values.setdefault(
            id(row.variable), (row.variable, np.empty(row.variable.shape, np.float32)))
        value[..., row.columns] = row.from_checkpoint(arrays[row.key])
    for variable, value in values.values():
        variable.assign(value)


def _check_fit(table, arrays, heading, ignore_extra_prefixes):
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped key."""
    expected_keys = {row.key for row in table}
    missing = sorted(expected_keys - set(arrays))
    unexpected = sorted(
        key for key in set(arrays) - expected_keys if not key.startswith(ignore_extra_prefixes)
    )
    mismatched = [
        f"{row.key}: expected {row.shape}, found {tuple(arrays[row.key].shape)}"
        for row in table
        if row.key in arrays and tuple(arrays[row.key].shape) != row.shape
    ]
    if missing or unexpected or mismatched:
        lines = [heading]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise CheckpointError("\n".join(lines))
