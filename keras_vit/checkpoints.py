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
"""

import dataclasses
import os
import re
import zipfile

import keras
import numpy as np

from keras_vit.model import create_model
from keras_vit.posemb import resample
from keras_vit.variants import ViTConfig
from pipelines.errors import MissingFileError, UserError

_BLOCK = "Transformer/encoderblock_{}"
_ATTENTION = _BLOCK + "/MultiHeadDotProductAttention_1"
_POSEMB = "Transformer/posembed_input/pos_embedding"
_BLOCK_PATTERN = re.compile(r"^Transformer/encoderblock_(\d+)/")
_OVERRIDABLE = ("dropout_rate", "attention_dropout_rate", "stochastic_depth_rate", "include_top", "name")


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


def _attention(prefix, attention):
    """The rows of one `layers.MultiHeadSelfAttention` (the original's per-head layout)."""
    hidden_size = attention.qkv.kernel.shape[0]
    heads, head_dim = attention.num_heads, attention.head_dim
    rows = []
    for part, name in enumerate(("query", "key", "value")):
        columns = slice(part * hidden_size, (part + 1) * hidden_size)
        rows += [
            _CheckpointArray(f"{prefix}/{name}/kernel", attention.qkv.kernel,
                             (hidden_size, heads, head_dim), columns),
            _CheckpointArray(f"{prefix}/{name}/bias", attention.qkv.bias, (heads, head_dim), columns),
        ]
    return rows + [
        _CheckpointArray(f"{prefix}/out/kernel", attention.out.kernel,
                         (heads, head_dim, hidden_size), _ALL_COLUMNS),
        _plain(f"{prefix}/out/bias", attention.out.bias),
    ]


def _block(index, block):
    """The rows of encoder block `index`, a `layers.TransformerBlock`."""
    prefix = _BLOCK.format(index)
    return (
        _norm(f"{prefix}/LayerNorm_0", block.attention_norm)
        + _attention(_ATTENTION.format(index), block.attention)
        + _norm(f"{prefix}/LayerNorm_2", block.mlp_norm)
        + _dense(f"{prefix}/MlpBlock_3/Dense_0", block.mlp.dense_1)
        + _dense(f"{prefix}/MlpBlock_3/Dense_1", block.mlp.dense_2)
    )


def _weight_table(model):
    """Every weight of `model` as `_CheckpointArray` rows, in checkpoint order."""
    projection = model.get_layer("patch_embedding").projection
    table = [_plain("embedding/kernel", projection.kernel), _plain("embedding/bias", projection.bias)]
    if _has_layer(model, "class_token"):
        table.append(_plain("cls", model.get_layer("class_token").token))
    table.append(_plain(_POSEMB, model.get_layer("position_embedding").embedding))
    encoder = model.get_layer("encoder")
    for index, block in enumerate(encoder.blocks):
        table += _block(index, block)
    table += _norm("Transformer/encoder_norm", encoder.norm)
    for name in ("pre_logits", "head"):
        if _has_layer(model, name):
            table += _dense(name, model.get_layer(name))
    return table


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
    arrays = {
        row.key: row.to_checkpoint(np.asarray(row.variable.numpy(), dtype=np.float32))
        for row in _weight_table(model)
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # One temporary per process: two saves to the same path must not write into one file.
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.partial.npz")
    try:
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


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
            f"{path} is not a ViT checkpoint in Google's layout: missing {missing}. "
            f"Found keys: {found or 'none'}."
        )


def describe_checkpoint(arrays, path="checkpoint"):
    """Reads the architecture from the array shapes.

    Args:
        arrays: {key: array} of a checkpoint, as `load_npz` returns it.
        path: the file's name, for the error messages.

    Returns:
        A dict with "config" (ViTConfig), "pooling" ("token" or "gap"), "grid_size" (rows,
        columns) of patches, "representation_size" (None without pre-logits) and "num_classes"
        (None when the checkpoint has no head).

    Raises:
        CheckpointError: the keys or shapes are not those of a ViT checkpoint.
    """
    _require(arrays, ["embedding/kernel", _POSEMB, "Transformer/encoder_norm/scale"], path)
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
    mlp_key = _BLOCK.format(0) + "/MlpBlock_3/Dense_0/kernel"
    _require(arrays, [query_key, mlp_key], path)
    num_heads = int(arrays[query_key].shape[1])
    mlp_dim = int(arrays[mlp_key].shape[1])
    pooling = "token" if "cls" in arrays else "gap"
    num_prefix = 1 if pooling == "token" else 0
    num_patches = arrays[_POSEMB].shape[1] - num_prefix
    grid_side = int(round(num_patches ** 0.5))
    if grid_side * grid_side != num_patches:
        raise CheckpointError(
            f"{path}: {_POSEMB} has {num_patches} patch positions, not a square grid."
        )
    representation_size = None
    if "pre_logits/kernel" in arrays:
        representation_size = int(arrays["pre_logits/kernel"].shape[1])
    num_classes = int(arrays["head/kernel"].shape[1]) if "head/kernel" in arrays else None
    try:
        config = ViTConfig(patch_size, hidden_size, len(block_indices), num_heads, mlp_dim)
    except ValueError as error:
        raise CheckpointError(f"{path}: inconsistent shapes: {error}") from error
    return {
        "config": config,
        "pooling": pooling,
        "grid_size": (grid_side, grid_side),
        "representation_size": representation_size,
        "num_classes": num_classes,
    }


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


def from_npz(path, *, image_size=None, num_classes=None, allow_non_finite=False, **overrides):
    """Builds a ViT from a Google checkpoint and loads its weights.

    Args:
        path: an .npz in the layout of google-research/vision_transformer (or save_npz's).
        image_size: input side in pixels (or (height, width)). None keeps the checkpoint's;
            another size resamples the position-embedding grid bilinearly (class token kept).
        num_classes: None keeps the checkpoint's head. A different number drops the pre-logits
            layer and attaches a new zero-initialized head (the paper's fine-tuning recipe).
        **overrides: dropout_rate, attention_dropout_rate, stochastic_depth_rate,
            include_top, name, passed to `create_model`.
        allow_non_finite: load arrays holding NaN or Inf instead of refusing them.

    Returns:
        A `keras.Model` as `create_model` builds it, with the checkpoint's weights.

    Raises:
        CheckpointError: the file is missing (`CheckpointNotFoundError`) or unreadable, it
            does not fit the model (every missing, unexpected and mis-shaped key is listed),
            or an array it loads holds NaN or Inf (every such key is listed).
    """
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(
            f"from_npz got unexpected arguments {unknown}; the architecture is read from the "
            f"checkpoint. Allowed: image_size, num_classes, {', '.join(_OVERRIDABLE)}."
        )
    # A float64 value beyond float32's range becomes Inf here, which check_finite reports.
    with np.errstate(over="ignore"):
        arrays = {key: value.astype(np.float32) for key, value in load_npz(path).items()}
    spec = describe_checkpoint(arrays, path)
    config = spec["config"]
    new_head = num_classes is not None and num_classes != spec["num_classes"]
    if spec["num_classes"] is None and num_classes is None and overrides.get("include_top", True):
        raise CheckpointError(
            f"{path} has no head/kernel; pass num_classes to attach a new head, or "
            "include_top=False."
        )
    if image_size is None:
        image_size = tuple(side * config.patch_size for side in spec["grid_size"])
    model = create_model(
        config,
        image_size=image_size,
        num_classes=num_classes if new_head else (spec["num_classes"] or 1),
        pooling=spec["pooling"],
        representation_size=None if new_head else spec["representation_size"],
        **overrides,
    )
    position_layer = model.get_layer("position_embedding")
    if position_layer.grid_size != spec["grid_size"]:
        arrays[_POSEMB] = resample(
            arrays[_POSEMB], spec["grid_size"], position_layer.grid_size,
            position_layer.num_prefix_tokens,
        )
    if new_head:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("head/", "pre_logits/"))}
    # A model built with include_top=False takes no head from the checkpoint.
    ignored = () if _has_layer(model, "head") else ("head/",)
    _assign(model, arrays, path, ignore_extra_prefixes=ignored,
            keep_initial_prefixes=("head/",) if new_head else (),
            allow_non_finite=allow_non_finite)
    return model


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
