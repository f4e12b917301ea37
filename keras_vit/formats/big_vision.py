"""google-research/big_vision ViT checkpoints (.npz) into keras_vit's canonical layout.

Read from big_vision's own code (google-research/big_vision):
  - `big_vision/models/vit.py`: the module names (`_Model`, `Encoder`, `Encoder1DBlock`,
    `MlpBlock`, `MAPHead`); `pos_embedding`, a parameter of the model that covers the patches
    only (added before the class token `cls`, which exists for pool_type "tok" only); scanned
    encoders (`Transformer/encoderblock` with one leading depth axis, `scan_to_pyloop`);
    `fix_old_checkpoints` (older positions of the position embedding, a position embedding that
    also covered the class token, an inlined MAP head); `posemb_sincos_2d`; `nn.gelu` (tanh
    form, jax.nn.gelu's default) and `nn.LayerNorm` (epsilon 1e-6).
  - `big_vision/utils.py`: `save_checkpoint`/`tree_flatten_with_names` ("/"-joined names,
    np.savez), `load_params` (the params under `params/` for optax checkpoints, `opt/target/`
    for Flax-optimizer ones, `params/img/` for a two-tower model's image tower) and
    `recover_dtype` (np.savez stores bfloat16 as a 2-byte void type).
A second reading of the same layout: huggingface/pytorch-image-models
`timm/models/vision_transformer.py`, `_load_weights` (prefixes, scanned blocks, MAP head).

    embedding/{kernel,bias}                        (P, P, 3, D), (D,)
    pos_embedding                                  (1, N, D), patches only; absent: sincos2d
    cls                                            (1, 1, D)  pool_type "tok" only
    Transformer/encoderblock_{i}/LayerNorm_{0,1}, MultiHeadDotProductAttention_0, MlpBlock_0
    Transformer/encoderblock/...                   the same with a leading (L,) axis (scan)
    Transformer/encoder_norm, MAPHead_0/..., pre_logits, head
"""

import math
import re

import numpy as np

from keras_vit.checkpoints import POSITION_EMBEDDING_KEY as _POSEMB
from keras_vit.checkpoints import CheckpointError, as_float32, load_npz
from keras_vit.formats.common import ConvertedCheckpoint

FORMAT = "big_vision"
_MAP = "MAPHead_0/"
# Where a checkpoint keeps the ViT's params (utils.load_params), most specific first.
_PREFIXES = ("params/img/", "params/", "opt/target/")
_SCANNED = "Transformer/encoderblock/"
_BLOCK_INDEX = re.compile(r"^Transformer/encoderblock_(\d+)/")
_LINEN_BLOCK = re.compile(
    r"^Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_0|LayerNorm_1|MlpBlock_0)/")
# big_vision's names -> canonical ones, as name prefixes; "{}" is a block index. The first
# entry for a canonical name is what big_vision writes today; later ones are what
# vit.fix_old_checkpoints reads. Inside a block, Flax linen numbers submodules per class
# (LayerNorm_1), Google's pre-linen code over all of them (LayerNorm_2): the renaming that
# flax.training.checkpoints.convert_pre_linen undoes. Names not listed are the same in both.
_RENAMES = (
    (_MAP, _MAP),  # today's MAP head: before the inlined names below, which it shares
    ("pos_embedding", _POSEMB),
    ("Transformer/pos_embedding", _POSEMB),  # "Widely used version before 2022"
    ("Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/",
     "Transformer/encoderblock_{}/MultiHeadDotProductAttention_1/"),
    ("Transformer/encoderblock_{}/LayerNorm_1/", "Transformer/encoderblock_{}/LayerNorm_2/"),
    ("Transformer/encoderblock_{}/MlpBlock_0/", "Transformer/encoderblock_{}/MlpBlock_3/"),
    # "MAP-head variants during ViT-G development had it inlined"
    ("probe", _MAP + "probe"),
    ("MultiHeadDotProductAttention_0/", _MAP + "MultiHeadDotProductAttention_0/"),
    ("LayerNorm_0/", _MAP + "LayerNorm_0/"),
    ("MlpBlock_0/", _MAP + "MlpBlock_0/"),
)
# big_vision's pool_type -> keras_vit's pooling. "0" (the first patch token, no class token)
# and "none" (no pooling) have no counterpart in keras_vit.
_POOLINGS = {"tok": "token", "gap": "gap", "map": "map"}
_OPTIONS = dict(
    approximate_gelu=True,  # flax nn.gelu = jax.nn.gelu(approximate=True), the tanh form
    layer_norm_epsilon=1e-6,  # flax nn.LayerNorm's default
    input_mean=(0.5, 0.5, 0.5),  # big_vision's pp "value_range(-1, 1)"
    input_std=(0.5, 0.5, 0.5),
    position_embedding_prefix=False,  # posemb is added before cls is concatenated
)
# The arrays of one Flax LayerNorm, MultiHeadDotProductAttention and MlpBlock, symbolically
# (see _expected_shapes).
_NORM = {"scale": ("D",), "bias": ("D",)}
_ATTENTION = {
    **{f"{part}/kernel": ("D", "H", "Dh") for part in ("query", "key", "value")},
    **{f"{part}/bias": ("H", "Dh") for part in ("query", "key", "value")},
    "out/kernel": ("H", "Dh", "D"),
    "out/bias": ("D",),
}
_MLP = {"Dense_0/kernel": ("D", "M"), "Dense_0/bias": ("M",),
        "Dense_1/kernel": ("M", "D"), "Dense_1/bias": ("D",)}


def is_big_vision(arrays):
    """Whether the keys of an .npz are big_vision's layout, not Google's (unprefixed).

    Claimed: a `params/` or `opt/target/` prefix; encoder blocks with Flax linen names
    (MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0) or scanned; a top-level
    `pos_embedding` beside blocks that are not Google's (MultiHeadDotProductAttention_1).
    """
    keys = list(arrays)
    if any(key.startswith(("params/", "opt/target/")) for key in keys):
        return True
    if any(_LINEN_BLOCK.match(key) or key.startswith(_SCANNED) for key in keys):
        return True
    google = any(_BLOCK_INDEX.match(key) and "/MultiHeadDotProductAttention_1/" in key
                 for key in keys)
    return "pos_embedding" in arrays and not google


def read_big_vision(path, *, image_size=None, pool_type=None):
    """Reads a big_vision .npz file; see `convert_big_vision`."""
    return convert_big_vision(load_npz(path), str(path), image_size=image_size,
                              pool_type=pool_type)


def convert_big_vision(arrays, source, *, image_size=None, pool_type=None):
    """A big_vision ViT checkpoint's arrays -> the canonical layout, float32.

    Args:
        arrays: {key: array} of the .npz, as `keras_vit.load_npz` reads it.
        source: the file, for messages.
        image_size: int or (height, width): the resolution the model will run at. Needed only
            without a stored position embedding (posemb "sincos2d"), whose fixed values are
            computed for that patch grid, as big_vision does.
        pool_type: big_vision's pool_type, when known: checked against the arrays (the file
            cannot tell "gap" from "0"). None: read from the arrays ("map" with MAPHead_0,
            "tok" with cls, else "gap").

    Returns:
        ConvertedCheckpoint(format="big_vision"); the position embedding covers the patches
        only (option position_embedding_prefix=False).

    Raises:
        CheckpointError: missing, unexpected or mis-shaped arrays (all listed at once), no
            position embedding and no image_size, or a pool_type keras_vit cannot express.
    """
    prefix = _prefix(arrays)
    params = {key[len(prefix):]: as_float32(value, key, source)
              for key, value in arrays.items() if key.startswith(prefix)}
    origin = {key: prefix + key for key in params}
    params, origin = _unscan(params, origin, source)
    params, origin = _rename(params, origin, source)
    _fold_class_position(params)
    options = dict(_OPTIONS)
    if _POSEMB not in params and "embedding/kernel" in params:
        params[_POSEMB] = _sincos_position_embedding(params, image_size, source)
        origin[_POSEMB] = f"(posemb_sincos_2d for image_size={image_size})"
        options["image_size"] = image_size
    _check_layout(params, origin, prefix, source)
    options["pooling"] = _pooling(params, pool_type, source)
    grid = _square_grid(params[_POSEMB].shape[1])
    if "image_size" not in options and grid:
        options["image_size"] = grid * int(params["embedding/kernel"].shape[0])
    return ConvertedCheckpoint(params, options, source, FORMAT)


def _prefix(arrays):
    """The subtree holding the ViT: the first prefix with a patch embedding, else any used."""
    for prefix in _PREFIXES:
        if prefix + "embedding/kernel" in arrays:
            return prefix
    for prefix in _PREFIXES:
        if any(key.startswith(prefix) for key in arrays):
            return prefix
    return ""


def _unscan(params, origin, source):
    """Scanned blocks `Transformer/encoderblock/X` (L, ...) -> `encoderblock_{i}/X` (vit.py
    `scan_to_pyloop`)."""
    scanned = {key: value for key, value in params.items() if key.startswith(_SCANNED)}
    if not scanned:
        return params, origin
    depths = {key: value.shape[0] if value.ndim else None for key, value in scanned.items()}
    looped = sorted(key for key in params if _BLOCK_INDEX.match(key))
    if len(set(depths.values())) != 1 or None in depths.values() or looped:
        found = ", ".join(f"{origin[k]} {params[k].shape}" for k in sorted(scanned)[:6])
        raise CheckpointError(
            f"{source}: scanned encoder blocks ({_SCANNED}...) must all have the same leading "
            f"depth axis and no encoderblock_{{i}} beside them; found {found}"
            + (f" and {looped[:3]}" if looped else "") + ". The file looks damaged.")
    params, origin = dict(params), dict(origin)
    for key, value in scanned.items():
        rest = key[len(_SCANNED):]
        for layer in range(value.shape[0]):
            params[f"Transformer/encoderblock_{layer}/{rest}"] = value[layer]
            origin[f"Transformer/encoderblock_{layer}/{rest}"] = f"{origin[key]}[{layer}]"
        del params[key], origin[key]
    return params, origin


def _translate(key, table):
    """`key` renamed by the first matching (from, to) name prefix of `table`, else as is."""
    match = _BLOCK_INDEX.match(key)
    template = key.replace(match.group(0), "Transformer/encoderblock_{}/", 1) if match else key
    for old, new in table:
        if template == old or (old.endswith("/") and template.startswith(old)):
            renamed = new + template[len(old):]
            return renamed.format(match.group(1)) if match else renamed
    return key


def _rename(params, origin, source):
    """big_vision names -> canonical names; two arrays for one name is an error."""
    renamed, renamed_origin = {}, {}
    for key, value in params.items():
        new = _translate(key, _RENAMES)
        if new in renamed:
            raise CheckpointError(
                f"{source}: both {renamed_origin[new]} and {origin[key]} would be {new}; a "
                "big_vision checkpoint holds one of them. The file mixes two layouts.")
        renamed[new], renamed_origin[new] = value, origin[key]
    return renamed, renamed_origin


def _fold_class_position(params):
    """A position embedding of 1 + s*s positions with a class token: fold the first into cls.

    vit.fix_old_checkpoints: "Old vit.py used to first concat [cls] token, then add posemb"
    (Google's layout too). cls + its position is what the encoder saw, so this is exact.
    """
    position = params.get(_POSEMB)
    if position is None or "cls" not in params or position.ndim != 3:
        return
    count = position.shape[1]
    if math.isqrt(count) ** 2 + 1 == count and params["cls"].shape == position[:, :1].shape:
        params["cls"] = params["cls"] + position[:, :1]
        params[_POSEMB] = position[:, 1:]


def _sincos_position_embedding(params, image_size, source):
    """vit.py posemb_sincos_2d for the patch grid of `image_size`: (1, h*w, D) float32."""
    if image_size is None:
        raise CheckpointError(
            f"{source} has no pos_embedding: a big_vision model with posemb='sincos2d', whose "
            "fixed position embedding depends on the resolution. Pass image_size= (e.g. 224) "
            "to from_checkpoint.")
    patch, width = params["embedding/kernel"].shape[0], params["embedding/kernel"].shape[3]
    height, side = (image_size, image_size) if np.isscalar(image_size) else image_size
    if height % patch or side % patch or width % 4 or width < 8:
        raise CheckpointError(
            f"{source}: image_size={image_size} must be a multiple of the patch size {patch}, "
            f"and the width {width} a multiple of 4 (at least 8), for posemb_sincos_2d.")
    y, x = np.mgrid[:height // patch, :side // patch]
    omega = 1.0 / 10_000.0 ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.outer(y.flatten(), omega), np.outer(x.flatten(), omega)
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return table.astype(np.float32)[None]


def _pooling(params, pool_type, source):
    """keras_vit's pooling for the arrays, checked against big_vision's pool_type if given."""
    found = "map" if _MAP + "probe" in params else "token" if "cls" in params else "gap"
    if pool_type is None:
        return found
    if pool_type not in _POOLINGS:
        raise CheckpointError(
            f"{source}: big_vision pool_type={pool_type!r} has no keras_vit counterpart; "
            f"keras_vit loads {sorted(_POOLINGS)} (\"0\" reads the first patch token without a "
            "class token, \"none\" has no pooled output).")
    if _POOLINGS[pool_type] != found:
        raise CheckpointError(
            f"{source}: pool_type={pool_type!r} was given, but the arrays are those of "
            f"pooling {found!r} (MAPHead_0 means 'map', cls means 'tok', neither 'gap').")
    return found


def _square_grid(count):
    side = math.isqrt(count)
    return side if side * side == count else None


def _expected_shapes(params):
    """[(canonical key, symbolic shape, group)] of the ViT these arrays describe.

    A group is required when any of its keys is present ("model" always is). Symbols: P
    patch, D width, N positions, H heads, Dh head width, M MLP width, R pre-logits, C classes.
    """
    layers = 1 + max((int(m.group(1)) for k in params if (m := _BLOCK_INDEX.match(k))),
                     default=0)
    rows = _rows("embedding", {"kernel": ("P", "P", 3, "D"), "bias": ("D",)}, "model")
    rows += [(_POSEMB, (1, "N", "D"), "model"), ("cls", (1, 1, "D"), "cls")]
    for layer in range(layers):
        block = f"Transformer/encoderblock_{layer}"
        rows += _rows(f"{block}/LayerNorm_0", _NORM, "model")
        rows += _rows(f"{block}/MultiHeadDotProductAttention_1", _ATTENTION, "model")
        rows += _rows(f"{block}/LayerNorm_2", _NORM, "model")
        rows += _rows(f"{block}/MlpBlock_3", _MLP, "model")
    rows += _rows("Transformer/encoder_norm", _NORM, "model")
    rows += [(_MAP + "probe", (1, 1, "D"), "map")]
    rows += _rows(_MAP + "MultiHeadDotProductAttention_0", _ATTENTION, "map")
    rows += _rows(_MAP + "LayerNorm_0", _NORM, "map") + _rows(_MAP + "MlpBlock_0", _MLP, "map")
    rows += _rows("pre_logits", {"kernel": ("D", "R"), "bias": ("R",)}, "pre_logits")
    width = "R" if "pre_logits/kernel" in params else "D"
    return rows + _rows("head", {"kernel": (width, "C"), "bias": ("C",)}, "head")


def _rows(module, leaves, group):
    return [(f"{module}/{leaf}", shape, group) for leaf, shape in leaves.items()]


def _check_layout(params, origin, prefix, source):
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped array."""
    rows = _expected_shapes(params)
    groups = {group for key, _, group in rows if key in params} | {"model"}
    scanned = any(_SCANNED in name for name in origin.values())
    sizes, missing, misshaped = {}, {}, []
    for key, shape, group in rows:
        if key not in params:
            if group in groups:
                missing[_big_vision_name(key, prefix, scanned)] = None
            continue
        found = params[key].shape
        if len(found) != len(shape):
            misshaped.append(f"{origin[key]}: expected {len(shape)} axes {shape}, found {found}")
            continue
        expected = tuple(sizes.setdefault(s, f) if isinstance(s, str) else s
                         for s, f in zip(shape, found))
        if found != expected:
            misshaped.append(f"{origin[key]}: expected {expected}, found {found}")
    unexpected = sorted(origin[key] for key in set(params) - {key for key, _, _ in rows})
    if missing or misshaped or unexpected:
        lines = [f"{source} is not a complete big_vision ViT checkpoint (prefix "
                 f"{prefix or 'none'!r}):"]
        lines += [f"  missing: {', '.join(missing)}"] if missing else []
        lines += [f"  unexpected: {', '.join(unexpected)}"] if unexpected else []
        lines += [f"  mis-shaped: {line}" for line in misshaped]
        lines.append("keras_vit reads big_vision's plain ViT (big_vision/models/vit.py); check "
                     "that the file is one, and that the download is complete.")
        raise CheckpointError("\n".join(lines))


def _big_vision_name(key, prefix, scanned):
    """A canonical key as big_vision names it (for messages): the first entry of _RENAMES."""
    inverse = {}
    for old, new in _RENAMES:
        inverse.setdefault(new, old)
    name = _translate(key, tuple(inverse.items()))
    return prefix + (_BLOCK_INDEX.sub(_SCANNED, name) if scanned else name)
