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

import os
import re
import zipfile

import numpy as np

from keras_vit.model import create_model
from keras_vit.posemb import resample
from keras_vit.variants import ViTConfig

_BLOCK = "Transformer/encoderblock_{}"
_ATTENTION = _BLOCK + "/MultiHeadDotProductAttention_1"
_POSEMB = "Transformer/posembed_input/pos_embedding"
_BLOCK_PATTERN = re.compile(r"^Transformer/encoderblock_(\d+)/")
_OVERRIDABLE = ("dropout_rate", "attention_dropout_rate", "stochastic_depth_rate", "include_top", "name")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def _same(array):
    return array


def _weight_table(model):
    """Lists (npz key, Keras variable, to_npz, from_npz) for every weight of `model`.

    to_npz maps the variable's value to the checkpoint's layout, from_npz the other way.
    """
    table = []

    def add(key, variable, to_npz=_same, from_npz=_same):
        table.append((key, variable, to_npz, from_npz))

    def add_dense(prefix, layer):
        add(f"{prefix}/kernel", layer.kernel)
        add(f"{prefix}/bias", layer.bias)

    def add_norm(prefix, layer):
        add(f"{prefix}/scale", layer.gamma)
        add(f"{prefix}/bias", layer.beta)

    projection = model.get_layer("patch_embedding").projection
    add("embedding/kernel", projection.kernel)
    add("embedding/bias", projection.bias)
    if _has_layer(model, "class_token"):
        add("cls", model.get_layer("class_token").token)
    add(_POSEMB, model.get_layer("position_embedding").embedding)

    encoder = model.get_layer("encoder")
    for index, block in enumerate(encoder.blocks):
        attention = block.attention
        hidden_size = attention.qkv.kernel.shape[0]
        heads, head_dim = attention.num_heads, attention.head_dim
        prefix = _ATTENTION.format(index)
        add_norm(_BLOCK.format(index) + "/LayerNorm_0", block.attention_norm)
        for part, name in enumerate(("query", "key", "value")):
            columns = slice(part * hidden_size, (part + 1) * hidden_size)
            add(
                f"{prefix}/{name}/kernel",
                attention.qkv.kernel,
                lambda kernel, c=columns: kernel[:, c].reshape(hidden_size, heads, head_dim),
                ("qkv_kernel", part),
            )
            add(
                f"{prefix}/{name}/bias",
                attention.qkv.bias,
                lambda bias, c=columns: bias[c].reshape(heads, head_dim),
                ("qkv_bias", part),
            )
        add(
            f"{prefix}/out/kernel",
            attention.out.kernel,
            lambda kernel: kernel.reshape(heads, head_dim, hidden_size),
            lambda kernel: kernel.reshape(heads * head_dim, hidden_size),
        )
        add(f"{prefix}/out/bias", attention.out.bias)
        add_norm(_BLOCK.format(index) + "/LayerNorm_2", block.mlp_norm)
        add_dense(_BLOCK.format(index) + "/MlpBlock_3/Dense_0", block.mlp_dense_1)
        add_dense(_BLOCK.format(index) + "/MlpBlock_3/Dense_1", block.mlp_dense_2)
    add_norm("Transformer/encoder_norm", encoder.norm)
    if _has_layer(model, "pre_logits"):
        add_dense("pre_logits", model.get_layer("pre_logits"))
    if _has_layer(model, "head"):
        add_dense("head", model.get_layer("head"))
    return table


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)


def save_npz(model, path):
    """Writes `model`'s weights to `path` in the layout of Google's checkpoints.

    The file loads with `from_npz`, with the original JAX code and with timm. Returns `path`.
    """
    arrays = {}
    for key, variable, to_npz, _ in _weight_table(model):
        arrays[key] = np.asarray(to_npz(np.asarray(variable.numpy(), dtype=np.float32)))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.partial.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)
    return path


def load_npz(path):
    """Reads a checkpoint into {key: float32 array}, with errors that name the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise CheckpointError(
                    f"{path} holds a single array, not a checkpoint: expected an .npz archive of "
                    "named arrays (as np.savez writes)."
                )
            return {key: np.asarray(data[key]) for key in data.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{path} is not a readable .npz checkpoint ({error}). Expected a checkpoint of "
            "google-research/vision_transformer or one written by keras_vit.save_npz; check "
            "that the download is complete."
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

    Returns a dict with config (ViTConfig), pooling, grid_size, representation_size and
    num_classes (None when the checkpoint has no head).
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


def from_npz(path, *, image_size=None, num_classes=None, **overrides):
    """Builds a ViT from a Google checkpoint and loads its weights.

    Args:
        path: an .npz in the layout of google-research/vision_transformer (or save_npz's).
        image_size: input side in pixels (or (height, width)). None keeps the checkpoint's;
            another size resamples the position-embedding grid bilinearly (class token kept).
        num_classes: None keeps the checkpoint's head. A different number drops the pre-logits
            layer and attaches a new zero-initialized head (the paper's fine-tuning recipe).
        **overrides: dropout_rate, attention_dropout_rate, stochastic_depth_rate,
            include_top, name, passed to `create_model`.

    Returns:
        A `keras.Model` as `create_model` builds it, with the checkpoint's weights.
    """
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise TypeError(
            f"from_npz got unexpected arguments {unknown}; the architecture is read from the "
            f"checkpoint. Allowed: image_size, num_classes, {', '.join(_OVERRIDABLE)}."
        )
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
            keep_initial_prefixes=("head/",) if new_head else ())
    return model


def _assign(model, arrays, path, ignore_extra_prefixes=(), keep_initial_prefixes=()):
    """Copies checkpoint arrays into the model, checking every key and shape first.

    Checkpoint keys under `ignore_extra_prefixes` are not used; model weights under
    `keep_initial_prefixes` (a new head) keep their initial values.
    """
    table = [
        row for row in _weight_table(model) if not row[0].startswith(tuple(keep_initial_prefixes))
    ]
    expected_keys = {key for key, *_ in table}
    missing = sorted(expected_keys - set(arrays))
    unexpected = sorted(
        key for key in set(arrays) - expected_keys if not key.startswith(tuple(ignore_extra_prefixes))
    )
    mismatched = []
    for key, variable, to_npz, _ in table:
        if key in arrays:
            expected_shape = to_npz(np.zeros(variable.shape, np.float32)).shape
            if tuple(arrays[key].shape) != tuple(expected_shape):
                mismatched.append(f"{key}: expected {tuple(expected_shape)}, found {tuple(arrays[key].shape)}")
    if missing or unexpected or mismatched:
        lines = [f"Checkpoint {path} does not fit the model {model.name}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise CheckpointError("\n".join(lines))

    values = {}
    for key, variable, _, from_npz_fn in table:
        if isinstance(from_npz_fn, tuple):
            # One of the three parts of the fused qkv kernel or bias: gather, assign once.
            kind, part = from_npz_fn
            parts = values.setdefault(id(variable), (variable, kind, [None, None, None]))[2]
            parts[part] = arrays[key]
        else:
            variable.assign(from_npz_fn(arrays[key]))
    for variable, kind, parts in values.values():
        flat = [p.reshape(p.shape[0], -1) if kind == "qkv_kernel" else p.reshape(-1) for p in parts]
        variable.assign(np.concatenate(flat, axis=-1))
