"""timm checkpoints in and out: Hub folders (config.json + model.safetensors), bare .safetensors.

The one module that knows the key names of huggingface/pytorch-image-models' plain
`VisionTransformer` (timm/models/vision_transformer.py) and DeiT's `VisionTransformerDistilled`
(timm/models/deit.py). One two-way table (`_table`) reads them into keras_vit's canonical layout
and writes them back; torch Linear weights are (out, in), so every kernel is transposed:

    patch_embed.proj.{weight (D, 3, P, P), bias}    embedding/{kernel (P, P, 3, D), bias}
    cls_token, dist_token, reg_token (1, R, D)      cls, dist, reg
    pos_embed                                       Transformer/posembed_input/pos_embedding
    blocks.{i}.norm1                                Transformer/encoderblock_{i}/LayerNorm_0
    blocks.{i}.attn.qkv (3D, D): q, k, v stacked,   .../MultiHeadDotProductAttention_1/
        each head-major (H * D/H rows)                  {query,key,value} (D, H, D/H)
    blocks.{i}.attn.proj (D, D)                     .../MultiHeadDotProductAttention_1/out
    blocks.{i}.ls1.gamma, ls2.gamma                 .../LayerScale_0/scale, LayerScale_1/scale
    blocks.{i}.norm2, mlp.fc1, mlp.fc2              .../LayerNorm_2, MlpBlock_3/Dense_{0,1}
    norm | fc_norm (timm has one or the other)      Transformer/encoder_norm | fc_norm
    attn_pool.{latent, q, kv (k, v stacked), proj,  MAPHead_0/{probe, query, key and value, out,
        norm, mlp.fc1, mlp.fc2}                         LayerNorm_0, MlpBlock_0/Dense_{0,1}}
    head, head_dist                                 head, head_dist

The qkv and proj layouts are those of timm's `_load_weights` (Google .npz -> timm), the
AttentionPoolLatent ones those of its MAP branch. The architecture a Hub folder's config.json
names (`architecture`, overridden by `model_args`, as timm's `create_model` does) says what the
arrays cannot: the number of heads, the activation, whether the position embedding covers the
prefix tokens (`no_embed_class`), the pooling (`global_pool`); `timm_architectures` holds the
registered names' arguments.
"""

import dataclasses
import json
import math
import os

import numpy as np

from keras_vit.checkpoints import BLOCK_PREFIX as _BLOCK
from keras_vit.checkpoints import POSITION_EMBEDDING_KEY as _POSEMB
from keras_vit.checkpoints import CheckpointError, CheckpointNotFoundError, as_float32
from keras_vit.files import write_atomically
from keras_vit.formats import common
from keras_vit.formats.timm_architectures import (
    ANY,
    ARCHITECTURES,
    FIXED_ARGS,
    FREE_ARGS,
    IGNORED_ARGS,
    POOLINGS,
    PRETRAINED_DEFAULTS,
    VIT_DEFAULTS,
    architecture_args,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_PICKLE_NAMES = ("pytorch_model.bin", "model.pth", "model.pt")
_MAP = "MAPHead_0/MultiHeadDotProductAttention_0"

# ----------------------------------------------------------------------------------------
# The two-way key table.


@dataclasses.dataclass(frozen=True)
class _Row:
    """Some timm arrays and the canonical arrays they hold, with both conversions.

    Attributes:
        timm: timm state-dict keys.
        canonical: canonical keys.
        to_canonical: (*timm arrays) -> tuple of canonical arrays, in `canonical`'s order.
        to_timm: (*canonical arrays) -> tuple of timm arrays, in `timm`'s order.
    """

    timm: tuple
    canonical: tuple
    to_canonical: object
    to_timm: object


def _same(timm_key, canonical_key):
    return _Row((timm_key,), (canonical_key,), lambda a: (a,), lambda a: (a,))


def _linear(timm_prefix, canonical_prefix):
    return [
        _Row((f"{timm_prefix}.weight",), (f"{canonical_prefix}/kernel",),
             lambda w: (w.T,), lambda k: (k.T,)),
        _same(f"{timm_prefix}.bias", f"{canonical_prefix}/bias"),
    ]


def _norm(timm_prefix, canonical_prefix):
    return [_same(f"{timm_prefix}.weight", f"{canonical_prefix}/scale"),
            _same(f"{timm_prefix}.bias", f"{canonical_prefix}/bias")]


def _stacked(timm_prefix, canonical_prefix, names, heads):
    """A Linear whose output rows stack len(names) projections (timm's qkv, kv, q).

    Each projection's rows are head-major (row h * D/H + j), as `_load_weights` builds them with
    `kernel.flatten(1).T` from Google's (D, H, D/H) kernels and `bias.reshape(-1)`.
    """
    kernels = tuple(f"{canonical_prefix}/{name}/kernel" for name in names)
    biases = tuple(f"{canonical_prefix}/{name}/bias" for name in names)

    def split_weight(weight):
        return tuple(part.T.reshape(part.shape[1], heads, -1)
                     for part in np.split(weight, len(names)))

    def join_weight(*parts):
        return (np.concatenate([k.reshape(k.shape[0], -1).T for k in parts]),)

    def split_bias(bias):
        return tuple(part.reshape(heads, -1) for part in np.split(bias, len(names)))

    def join_bias(*parts):
        return (np.concatenate([b.reshape(-1) for b in parts]),)

    return [_Row((f"{timm_prefix}.weight",), kernels, split_weight, join_weight),
            _Row((f"{timm_prefix}.bias",), biases, split_bias, join_bias)]


def _output(timm_prefix, canonical_prefix, heads):
    """The attention output Linear (D, H * D/H) <-> Google's (H, D/H, D) `out/kernel`."""
    return [
        _Row((f"{timm_prefix}.weight",), (f"{canonical_prefix}/out/kernel",),
             lambda w: (w.T.reshape(heads, -1, w.shape[0]),),
             lambda k: (k.reshape(-1, k.shape[-1]).T,)),
        _same(f"{timm_prefix}.bias", f"{canonical_prefix}/out/bias"),
    ]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which parts a checkpoint has: enough to list its keys on either side."""

    depth: int
    heads: int
    tokens: tuple  # of "cls", "dist", "reg", in the sequence's order
    layer_scale: bool
    fc_norm: bool  # fc_norm after pooling instead of norm before it
    map_head: bool
    heads_out: tuple  # of "head", "head_dist"


_TOKENS = (("cls_token", "cls"), ("dist_token", "dist"), ("reg_token", "reg"))
_HEADS_OUT = ("head", "head_dist")


def _table(layout):
    """Every row of a checkpoint with `layout`, timm's key order."""
    rows = [
        _Row(("patch_embed.proj.weight",), ("embedding/kernel",),
             lambda w: (w.transpose(2, 3, 1, 0),), lambda k: (k.transpose(3, 2, 0, 1),)),
        _same("patch_embed.proj.bias", "embedding/bias"),
    ]
    rows += [_same(timm_key, key) for timm_key, key in _TOKENS if key in layout.tokens]
    rows.append(_same("pos_embed", _POSEMB))
    for i in range(layout.depth):
        rows += _block_rows(i, layout)
    rows += _norm("fc_norm", "fc_norm") if layout.fc_norm else _norm(
        "norm", "Transformer/encoder_norm")
    if layout.map_head:
        rows += [_same("attn_pool.latent", "MAPHead_0/probe")]
        rows += _stacked("attn_pool.q", _MAP, ("query",), layout.heads)
        rows += _stacked("attn_pool.kv", _MAP, ("key", "value"), layout.heads)
        rows += _output("attn_pool.proj", _MAP, layout.heads)
        rows += _norm("attn_pool.norm", "MAPHead_0/LayerNorm_0")
        rows += _linear("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0")
        rows += _linear("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1")
    for name in layout.heads_out:
        rows += _linear(name, name)
    return rows


def _block_rows(i, layout):
    timm, canonical = f"blocks.{i}", _BLOCK.format(i)
    attention = f"{canonical}/MultiHeadDotProductAttention_1"
    rows = _norm(f"{timm}.norm1", f"{canonical}/LayerNorm_0")
    rows += _stacked(f"{timm}.attn.qkv", attention, ("query", "key", "value"), layout.heads)
    rows += _output(f"{timm}.attn.proj", attention, layout.heads)
    if layout.layer_scale:
        rows.append(_same(f"{timm}.ls1.gamma", f"{canonical}/LayerScale_0/scale"))
    rows += _norm(f"{timm}.norm2", f"{canonical}/LayerNorm_2")
    rows += _linear(f"{timm}.mlp.fc1", f"{canonical}/MlpBlock_3/Dense_0")
    rows += _linear(f"{timm}.mlp.fc2", f"{canonical}/MlpBlock_3/Dense_1")
    if layout.layer_scale:
        rows.append(_same(f"{timm}.ls2.gamma", f"{canonical}/LayerScale_1/scale"))
    return rows


# Keys of timm features keras_vit has no counterpart for, and the argument that makes them.
_FEATURE_HINTS = (
    ("norm_pre.", "pre_norm=True (a LayerNorm before the blocks, as in CLIP)"),
    (".q_norm.", "qk_norm=True"), (".k_norm.", "qk_norm=True"),
    ("attn.norm.", "scale_attn_norm=True"), ("mlp.norm.", "scale_mlp_norm=True"),
    ("attn.gate.", "a gated attention"), ("patch_embed.norm.", "embed_norm_layer"),
    ("mlp.fc1_g", "a SwiGLU MLP (mlp_layer)"), ("mlp.fc1_x", "a SwiGLU MLP (mlp_layer)"),
    ("attn_pool.pos_embed", "an attention-pool position embedding"),
    ("patch_embed.backbone", "a hybrid (CNN) patch embedding"),
)


def _check_keys(expected, found, source, what):
    """Raises one CheckpointError naming every missing and every unexpected key."""
    missing = [key for key in expected if key not in found]
    unexpected = sorted(set(found) - set(expected))
    if not missing and not unexpected:
        return
    hints = sorted({hint for key in unexpected for part, hint in _FEATURE_HINTS if part in key})
    if any(key.endswith("attn.qkv.bias") for key in missing):
        hints.append("qkv_bias=False (no query/key/value bias)")
    if any(key.endswith("proj.bias") for key in missing):
        hints.append("bias-free projections (proj_bias=False or pre_norm=True)")
    raise CheckpointError(
        f"{source}: the arrays do not fit {what}: "
        + (f"missing {_listed(missing)}" if missing else "")
        + ("; " if missing and unexpected else "")
        + (f"unexpected {_listed(unexpected)}" if unexpected else "")
        + (f". They come from timm features keras_vit cannot express: {'; '.join(hints)}"
           if hints else "")
        + "."
    )


def _convert(rows, arrays, source, to_timm):
    """Applies each row's conversion (timm -> canonical, or the reverse with `to_timm`)."""
    converted = {}
    for row in rows:
        keys, targets = (row.canonical, row.timm) if to_timm else (row.timm, row.canonical)
        try:
            values = (row.to_timm if to_timm else row.to_canonical)(*(arrays[k] for k in keys))
        except ValueError as error:
            shapes = ", ".join(f"{key} {arrays[key].shape}" for key in keys)
            raise CheckpointError(f"{source}: {shapes} do not have the shapes the rest of the "
                                  f"model implies ({error}).") from error
        converted.update((key, np.ascontiguousarray(value, dtype=np.float32))
                         for key, value in zip(targets, values))
    return converted


def _listed(keys, limit=12):
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------
# Reading.


def is_timm_arrays(arrays):
    """Whether {name: array} has timm's ViT keys (a patch-embedding conv and fused qkv)."""
    return "patch_embed.proj.weight" in arrays and "blocks.0.attn.qkv.weight" in arrays


def is_timm_folder(path):
    """Whether `path` is a folder whose config.json is timm's (an `architecture` string).

    Hugging Face transformers' config.json names a `model_type` and a list of `architectures`
    instead.
    """
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path) or not os.path.isfile(config_path):
        return False
    try:
        config = common.read_json(config_path)
    except CheckpointError:
        return False
    return isinstance(config.get("architecture"), str) and "model_type" not in config


def read_timm(path, *, num_heads=None):
    """Reads a timm checkpoint into the canonical layout.

    Args:
        path: a Hub folder (config.json + model.safetensors, as timm's `push_to_hf_hub` and
            `save_for_hf` write it) or a bare .safetensors file of timm's keys.
        num_heads: the number of attention heads, needed only where the config cannot say it
            (a bare file, or an architecture name this module does not know).

    Returns:
        A `common.ConvertedCheckpoint`, format "timm". Its options: approximate_gelu (timm's
        act_layer), layer_norm_epsilon 1e-6, position_embedding_prefix (not no_embed_class),
        pooling (global_pool), image_size (from the position embedding's grid) and, for a
        folder, input_mean, input_std and eval_crop_fraction from its pretrained_cfg.

    Raises:
        CheckpointNotFoundError: no such file, or a folder without config.json or weights.
        CheckpointError: a PyTorch pickle; a config or arrays keras_vit cannot express (the
            message names the keys or model_args); heads unknown (pass num_heads=).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = _weights_file(path)
        config = _read_config(path)
        arrays = _read_arrays(weights)
        args = _args_from_config(config, num_heads, path)
    else:
        config = None
        arrays = _read_arrays(path)
        args = _args_from_arrays(arrays, num_heads, path)
    layout = _check_args_against_arrays(args, arrays, path)
    rows = _table(layout)
    _check_keys([key for row in rows for key in row.timm], arrays, path,
                "the timm VisionTransformer its config describes")
    canonical = _convert(rows, arrays, path, to_timm=False)
    options = _options(args, config, arrays, path)
    class_names = _class_names(config, canonical, path)
    return common.ConvertedCheckpoint(canonical, options, path, "timm", class_names)


def _read_config(folder):
    """The folder's config.json in timm's current layout (legacy one-dict configs split)."""
    config = common.read_json(os.path.join(folder, CONFIG_NAME))
    if "pretrained_cfg" not in config:
        # timm's _hub._parse_model_cfg: an old config is the pretrained_cfg itself.
        pretrained = dict(config)
        config = {"architecture": pretrained.pop("architecture", None),
                  "num_classes": pretrained.get("num_classes"), "pretrained_cfg": pretrained}
        if "labels" in pretrained:
            config["label_names"] = pretrained.pop("labels")
    if not isinstance(config.get("architecture"), str):
        raise CheckpointError(
            f"{os.path.join(folder, CONFIG_NAME)} has no `architecture` string: expected timm's "
            "config.json (architecture, num_classes, model_args, pretrained_cfg).")
    return config


def _weights_file(folder):
    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(path):
        return path
    for name in sorted(os.listdir(folder)):
        if name in _PICKLE_NAMES or name.endswith((".bin", ".pth", ".pt")):
            common.refuse_pickle(os.path.join(folder, name))
    raise CheckpointNotFoundError(
        f"{folder} has a timm config.json but no {WEIGHTS_NAME}: download the model.safetensors "
        "the Hub publishes beside it.")


def _read_arrays(path):
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist.")
    if common.is_pickle(path):
        common.refuse_pickle(path)
    arrays, _ = common.read_safetensors(path)
    if not is_timm_arrays(arrays):
        raise CheckpointError(
            f"{path} is not a timm ViT checkpoint: expected the keys patch_embed.proj.weight and "
            f"blocks.0.attn.qkv.weight, found {_listed(sorted(arrays))}. A Hugging Face "
            "model.safetensors loads with its folder (the config.json beside it says the heads).")
    return {key: as_float32(value, key, path) for key, value in arrays.items()}


def _args_from_config(config, num_heads, source):
    """timm's constructor arguments for a Hub folder, resolved as timm's `create_model` does.

    The architecture's registered model_args, overridden by the config's `model_args`
    (timm/models/_factory.py: `kwargs.setdefault` of each, then `dict(model_args, **kwargs)`
    in the architecture's function); `num_classes` from the config's top level.
    """
    name = config["architecture"]
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise CheckpointError(f"{source}: config.json model_args is {model_args!r}, expected "
                              "an object of timm constructor arguments.")
    _check_supported(model_args, source, every_key=True)
    args = architecture_args(name)
    if args is None:
        if num_heads is None:
            raise CheckpointError(
                f"{source}: timm architecture {name!r} is not one keras_vit knows (the "
                f"{len(ARCHITECTURES)} plain ViT and DeiT names of "
                "keras_vit.formats.timm.ARCHITECTURES), so its registered arguments, the "
                "number of heads among them, are unknown. If it is a plain timm "
                "VisionTransformer, pass num_heads= to read it with VisionTransformer's "
                "defaults and the config's model_args.")
        args = dict(VIT_DEFAULTS, distilled=None, num_heads=num_heads)
    args.update(model_args)
    if num_heads is not None and num_heads != args["num_heads"]:
        raise CheckpointError(
            f"{source}: num_heads={num_heads} was passed, but the config's architecture "
            f"{name!r} and model_args say num_heads={args['num_heads']}; drop the argument.")
    pretrained = config.get("pretrained_cfg") or {}
    args["num_classes"] = config.get("num_classes", pretrained.get("num_classes"))
    if "img_size" not in model_args and pretrained.get("fixed_input_size") \
            and pretrained.get("input_size"):
        # timm's _builder._update_default_model_kwargs: a fixed input_size sets img_size.
        args["img_size"] = tuple(pretrained["input_size"][-2:])
    saved_pool = config.get("global_pool")
    if isinstance(saved_pool, str) and saved_pool and saved_pool != args["global_pool"]:
        # timm records global_pool for information only and builds the model from model_args.
        raise CheckpointError(
            f"{source}: config.json says the model was saved with global_pool={saved_pool!r}, "
            f"but timm would build {name!r} with global_pool={args['global_pool']!r} (no "
            "model_args global_pool): the folder is inconsistent. Add "
            f'"global_pool": "{saved_pool}" to its model_args if that is how it was trained.')
    _check_supported(args, source, every_key=False)
    return args


def _check_supported(args, source, *, every_key):
    """Raises a CheckpointError naming each timm argument keras_vit cannot honour."""
    problems = []
    for key, value in args.items():
        if key == "global_pool" and value == "":
            continue  # said below, with why
        if key in FIXED_ARGS:
            if value not in FIXED_ARGS[key]:
                allowed = " or ".join(repr(v) for v in FIXED_ARGS[key])
                problems.append(f"{key}={value!r} (keras_vit needs {allowed})")
        elif every_key and key not in FREE_ARGS and key not in IGNORED_ARGS:
            problems.append(f"{key}={value!r} (not an argument keras_vit knows)")
    if args.get("global_pool") == "":
        problems.append("global_pool='' outputs every token, no pooled features: keras_vit's "
                        "classifier needs 'token', 'avg' or 'map'")
    if problems:
        raise CheckpointError(f"{source}: timm model_args keras_vit's ViT cannot express: "
                              + "; ".join(problems) + ".")


def _args_from_arrays(arrays, num_heads, source):
    """timm's arguments for a bare file: read from the keys, timm's defaults for the rest."""
    if num_heads is None:
        raise CheckpointError(
            f"{source} is a bare timm .safetensors file: the number of attention heads is not "
            "in its arrays. Pass num_heads= (timm's ViT-Ti 3, S 6, B 12, L 16, H 16), or read "
            "the Hub folder with its config.json.")
    shapes = _shape_args(arrays, source)
    class_token = "cls_token" in arrays
    fc_norm = "fc_norm.weight" in arrays
    # timm's VisionTransformer: fc_norm=None means an fc_norm exactly for global_pool='avg'.
    pool = "map" if "attn_pool.latent" in arrays else "token" if class_token and not fc_norm \
        else "avg"
    num_prefix = class_token + ("dist_token" in arrays) + shapes["reg_tokens"]
    return dict(
        VIT_DEFAULTS, **shapes, num_heads=num_heads, class_token=class_token, global_pool=pool,
        fc_norm=fc_norm, init_values=1e-5 if "blocks.0.ls1.gamma" in arrays else None,
        no_embed_class=_no_embed_class_from_shapes(arrays["pos_embed"].shape[1], num_prefix,
                                                   source),
        distilled="dist_token" in arrays,
        num_classes=arrays["head.weight"].shape[0] if "head.weight" in arrays else 0,
    )


def _shape_args(arrays, source):
    """patch_size, embed_dim, depth, mlp_ratio, reg_tokens as the arrays' shapes say them."""
    conv = arrays["patch_embed.proj.weight"]
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {conv.shape}, "
                              "expected (D, 3, P, P): square patches of RGB images.")
    depth = 0
    while f"blocks.{depth}.norm1.weight" in arrays:
        depth += 1
    fc1 = arrays.get("blocks.0.mlp.fc1.weight")
    embed_dim = conv.shape[0]
    return dict(patch_size=conv.shape[2], embed_dim=embed_dim, depth=depth,
                mlp_ratio=(fc1.shape[0] / embed_dim) if fc1 is not None else 4.0,
                reg_tokens=arrays["reg_token"].shape[1] if "reg_token" in arrays else 0)


def _no_embed_class_from_shapes(length, num_prefix, source):
    """Whether a position embedding of `length` rows covers the patches only."""
    if num_prefix == 0:
        return False  # The same model either way.
    covers_prefix, patches_only = _is_square(length - num_prefix), _is_square(length)
    if covers_prefix != patches_only:
        return patches_only
    raise CheckpointError(
        f"{source}: pos_embed has {length} rows and there are {num_prefix} prefix tokens, so "
        "whether it covers them (timm's no_embed_class) is ambiguous from the shapes; read the "
        "Hub folder, whose config.json says it.")


def _is_square(n):
    return n > 0 and math.isqrt(n) ** 2 == n


def _check_args_against_arrays(args, arrays, source):
    """The `_Layout` the arguments give, after checking them against the arrays' shapes."""
    shapes = _shape_args(arrays, source)
    problems = []
    patch = args["patch_size"]
    if isinstance(patch, (list, tuple)):
        patch = patch[0] if len(set(patch)) == 1 else patch
    expected_mlp = int(args["embed_dim"] * args["mlp_ratio"])  # timm's Block: int(dim * ratio)
    for name, wanted, found in (
            ("patch_size", patch, shapes["patch_size"]),
            ("embed_dim", args["embed_dim"], shapes["embed_dim"]),
            ("depth", args["depth"], shapes["depth"]),
            ("MLP width int(embed_dim * mlp_ratio)", expected_mlp,
             round(shapes["mlp_ratio"] * shapes["embed_dim"])),
            ("reg_tokens", args["reg_tokens"], shapes["reg_tokens"]),
            ("class_token", bool(args["class_token"]), "cls_token" in arrays)):
        if wanted != found:
            problems.append(f"{name} is {wanted} in the config, {found} in the arrays")
    distilled = "dist_token" in arrays if args["distilled"] is None else args["distilled"]
    if distilled != ("dist_token" in arrays):
        problems.append(f"the architecture {'is' if distilled else 'is not'} DeiT's distilled "
                        "model, but the arrays " + ("lack" if distilled else "have")
                        + " a dist_token")
    if shapes["embed_dim"] % args["num_heads"]:
        problems.append(f"embed_dim {shapes['embed_dim']} is not a multiple of num_heads "
                        f"{args['num_heads']}")
    num_classes = args.get("num_classes")
    head_rows = arrays["head.weight"].shape[0] if "head.weight" in arrays else 0
    if num_classes is not None and num_classes >= 0 and num_classes != head_rows:
        problems.append(f"num_classes is {num_classes} in the config, the head has {head_rows}")
    problems += _unsupported_pooling(args, distilled)
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems) + ".")
    pool = args["global_pool"]
    use_fc_norm = pool == "avg" if args["fc_norm"] is None else bool(args["fc_norm"])
    tokens = tuple(key for timm_key, key in _TOKENS if timm_key in arrays)
    return _Layout(
        depth=shapes["depth"], heads=args["num_heads"], tokens=tokens,
        layer_scale=bool(args["init_values"]), fc_norm=use_fc_norm, map_head=pool == "map",
        heads_out=tuple(name for name in _HEADS_OUT if f"{name}.weight" in arrays))


def _unsupported_pooling(args, distilled):
    """What timm does with these pooling arguments that keras_vit's model does not."""
    pool, prefix = args["global_pool"], args["class_token"] + args["reg_tokens"] + distilled
    problems = []
    if pool == "token" and not args["class_token"]:
        problems.append("global_pool='token' without a class token")
    if distilled and (pool != "token" or args["reg_tokens"]):
        problems.append("DeiT's distilled model with global_pool != 'token' or registers "
                        "(timm's VisionTransformerDistilled supports neither)")
    if pool == "map" and prefix and not args["pool_include_prefix"]:
        # timm's VisionTransformer.pool drops the prefix tokens before attn_pool.
        problems.append("global_pool='map' over the patch tokens only, without the class or "
                        "register tokens (pool_include_prefix=False): keras_vit's MAP head "
                        "attends to every token")
    if pool == "avg" and args["pool_include_prefix"]:
        problems.append("global_pool='avg' over the prefix tokens too (pool_include_prefix): "
                        "keras_vit averages the patch tokens only")
    return problems


def _options(args, config, arrays, source):
    """The create_model options the arrays cannot say (see `read_timm`)."""
    options = dict(
        approximate_gelu=args["act_layer"] == "gelu_tanh",  # None and "gelu": nn.GELU, exact
        layer_norm_epsilon=1e-6,  # timm.layers.LayerNorm's default eps
        position_embedding_prefix=not args["no_embed_class"],
        pooling=POOLINGS[args["global_pool"]],
    )
    options["image_size"] = _image_size(args, arrays, source)
    if config is not None:
        pretrained = dict(PRETRAINED_DEFAULTS, **{
            key: value for key, value in (config.get("pretrained_cfg") or {}).items()
            if value is not None})
        options["input_mean"] = _channels(pretrained["mean"], "mean", source)
        options["input_std"] = _channels(pretrained["std"], "std", source)
        options["eval_crop_fraction"] = _crop_fraction(pretrained, source)
    return options


def _channels(values, name, source):
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values *= 3  # timm's resolve_data_config repeats a single value per channel
    if len(values) != 3:
        raise CheckpointError(f"{source}: pretrained_cfg {name} is {values}, expected 3 values "
                              "(RGB).")
    return tuple(values)


def _crop_fraction(pretrained, source):
    """timm's crop_pct as keras_vit's eval_crop_fraction (None: the whole image, squashed).

    keras_vit's evaluation keeps the central fraction of each side and resizes to a square
    without keeping the aspect ratio, which is timm's crop_mode="squash"; timm's default
    "center" resizes the short side first, so the two differ for non-square images only.
    """
    crop = float(pretrained["crop_pct"])
    if not 0.0 < crop <= 1.0:
        raise CheckpointError(f"{source}: pretrained_cfg crop_pct is {crop}, expected (0, 1].")
    return None if crop == 1.0 and pretrained.get("crop_mode") == "squash" else crop


def _image_size(args, arrays, source):
    """The training resolution: the position embedding's grid times the patch size.

    A non-square grid takes its sides from timm's img_size (model_args, else a fixed
    pretrained_cfg input_size) when they fit it.
    """
    patch = _shape_args(arrays, source)["patch_size"]
    prefix = 0 if args["no_embed_class"] else sum(
        arrays[key].shape[1] for key in ("cls_token", "dist_token", "reg_token") if key in arrays)
    patches = arrays["pos_embed"].shape[1] - prefix
    size = args["img_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if (height // patch) * (width // patch) == patches:
        return height if height == width else (height, width)
    if _is_square(patches):
        return math.isqrt(patches) * patch
    raise CheckpointError(
        f"{source}: pos_embed has {patches} patch rows (after {prefix} prefix tokens): neither "
        f"a square grid nor the config's image size {size}.")


def _class_names(config, canonical, source):
    """The config's label_names (a list, or {index: name}) as a list, or None."""
    if config is None:
        return None
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if not names:
        return None
    if isinstance(names, dict):
        try:
            indexed = {int(index): str(name) for index, name in names.items()}
        except ValueError as error:
            raise CheckpointError(f"{source}: label_names keys must be class indices "
                                  f"({error}).") from error
        if sorted(indexed) != list(range(len(indexed))):
            raise CheckpointError(f"{source}: label_names has gaps in its indices; keras_vit "
                                  "needs a name for every class 0..K-1.")
        names = [indexed[i] for i in range(len(indexed))]
    names = [str(name) for name in names]
    if "head/bias" in canonical and len(names) != canonical["head/bias"].shape[0]:
        raise CheckpointError(f"{source}: label_names has {len(names)} names, the head "
                              f"{canonical['head/bias'].shape[0]} classes.")
    return names


# ----------------------------------------------------------------------------------------
# Writing.


def timm_arrays_and_config(canonical_arrays, options, *, class_names=None):
    """The canonical layout as timm's state dict and Hub config.json.

    Args:
        canonical_arrays: {canonical key: array}, e.g. `keras_vit.checkpoints.model_arrays`.
        options: the model's create_model options (pooling, approximate_gelu,
            layer_norm_epsilon, input_mean, input_std, eval_crop_fraction,
            position_embedding_prefix, layer_scale, image_size); absent ones take
            create_model's defaults.
        class_names: optional list of K names, written as timm's label_names.

    Returns:
        ({timm key: float32 array}, config dict): the config names the registered timm
        architecture closest to the model and, in model_args, every argument that differs from
        it, so that timm's `create_model("local-dir:FOLDER", pretrained=True)` (or the Hub's
        `hf-hub:` loader) builds this model and loads the arrays strictly.

    Raises:
        CheckpointError: a model timm's VisionTransformer cannot express (a pre_logits layer,
            a LayerNorm epsilon other than 1e-6, DeiT's distillation token with registers,
            fc_norm or non-token pooling).
    """
    arrays = {key: np.asarray(value, np.float32) for key, value in canonical_arrays.items()}
    layout = _layout_from_canonical(arrays, options)
    rows = _table(layout)
    _check_keys([key for row in rows for key in row.canonical], arrays, "save_timm",
                "a model timm's VisionTransformer holds")
    state = _convert(rows, arrays, "save_timm", to_timm=True)
    wanted = _wanted_args(arrays, options, layout)
    image_size = options.get("image_size") or _grid_size(arrays, options, layout)
    architecture, model_args = _choose_architecture(wanted, "dist" in layout.tokens, image_size)
    config = _hub_config(architecture, model_args, wanted, options, arrays, image_size)
    if class_names:
        if len(class_names) != config["num_classes"]:
            raise CheckpointError(f"save_timm: {len(class_names)} class names for a head of "
                                  f"{config['num_classes']} classes.")
        # timm's save_config_for_hf places label_names before model_args.
        config = _insert_after(config, "global_pool", "label_names", list(map(str, class_names)))
    return state, config


def _layout_from_canonical(arrays, options):
    """The `_Layout` of canonical arrays, refusing what timm's ViT cannot express."""
    problems = []
    if "pre_logits/kernel" in arrays:
        problems.append("a pre_logits (representation) layer, which timm's VisionTransformer "
                        "does not have (its checkpoint_filter_fn drops it)")
    epsilon = options.get("layer_norm_epsilon", 1e-6)
    if not math.isclose(epsilon, 1e-6, rel_tol=1e-6):
        problems.append(f"layer_norm_epsilon={epsilon}: timm's LayerNorm uses 1e-6 and "
                        "config.json cannot name another")
    tokens = tuple(key for key in ("cls", "dist", "reg") if key in arrays)
    pooling = _pooling(arrays, options)
    if "dist" in tokens and ("reg" in tokens or pooling != "token" or "fc_norm/scale" in arrays):
        problems.append("DeiT's distillation token with registers, fc_norm or pooling other "
                        "than 'token' (timm's VisionTransformerDistilled has none of these)")
    if problems:
        raise CheckpointError("save_timm: the model has " + "; ".join(problems) + ".")
    depth = 0
    while f"{_BLOCK.format(depth)}/LayerNorm_0/scale" in arrays:
        depth += 1
    query = arrays.get(f"{_BLOCK.format(0)}/MultiHeadDotProductAttention_1/query/kernel")
    return _Layout(
        depth=depth, heads=query.shape[1] if query is not None else 1, tokens=tokens,
        layer_scale=f"{_BLOCK.format(0)}/LayerScale_0/scale" in arrays,
        fc_norm="fc_norm/scale" in arrays, map_head="MAPHead_0/probe" in arrays,
        heads_out=tuple(name for name in _HEADS_OUT if f"{name}/kernel" in arrays))


def _pooling(arrays, options):
    """create_model's pooling, defaulting as the canonical arrays imply it."""
    if options.get("pooling"):
        return options["pooling"]
    return "map" if "MAPHead_0/probe" in arrays else "token" if "cls" in arrays else "gap"


def _wanted_args(arrays, options, layout):
    """timm's constructor arguments for the model; `ANY` where any value builds the same."""
    kernel = arrays["embedding/kernel"]
    embed_dim = kernel.shape[3]
    mlp_dim = arrays[f"{_BLOCK.format(0)}/MlpBlock_3/Dense_0/kernel"].shape[1]
    pool = {"token": "token", "gap": "avg", "map": "map"}[_pooling(arrays, options)]
    has_prefix = bool(layout.tokens)
    return dict(
        patch_size=kernel.shape[0], embed_dim=embed_dim, depth=layout.depth,
        num_heads=layout.heads, mlp_ratio=_mlp_ratio(mlp_dim, embed_dim),
        class_token="cls" in layout.tokens, global_pool=pool, fc_norm=layout.fc_norm,
        init_values=(options.get("layer_scale") or 1e-5) if layout.layer_scale else None,
        no_embed_class=(not options.get("position_embedding_prefix", True)) if has_prefix
        else ANY,
        reg_tokens=arrays["reg"].shape[1] if "reg" in arrays else 0,
        act_layer="gelu_tanh" if options.get("approximate_gelu", True) else "gelu",
        # timm's MAP pool drops the prefix tokens unless told; keras_vit's attends to all.
        pool_include_prefix=True if pool == "map" and has_prefix else ANY if pool == "map"
        else False,
    )


def _mlp_ratio(mlp_dim, embed_dim):
    """The mlp_ratio for which timm's int(embed_dim * mlp_ratio) is exactly mlp_dim."""
    ratio = mlp_dim / embed_dim
    while int(embed_dim * ratio) < mlp_dim:
        ratio = float(np.nextafter(ratio, np.inf))
    return float(ratio)


def _differences(wanted, defaults):
    """The model_args that turn an architecture's arguments `defaults` into `wanted`."""
    differences = {}
    for key, value in wanted.items():
        default = defaults.get(key)
        if value is ANY:
            continue
        if key == "mlp_ratio":
            same = int(wanted["embed_dim"] * default) == int(wanted["embed_dim"] * value)
        elif key == "fc_norm":
            # VisionTransformer: fc_norm=None means an fc_norm exactly for global_pool='avg'.
            same = (wanted["global_pool"] == "avg" if default is None else bool(default)) == value
        elif key == "init_values":
            # Whether there is a LayerScale; its init value only matters untrained.
            same = bool(default) == bool(value)
        elif key == "act_layer":
            same = (default or "gelu") == value
        else:
            same = default == value
        if not same:
            differences[key] = value
    return differences


def _choose_architecture(wanted, distilled, image_size):
    """(registered timm name, model_args): the architecture needing the fewest model_args.

    Ties go to a name ending in the model's resolution, then to the table's order.
    """
    side = f"_{image_size if isinstance(image_size, int) else image_size[0]}"
    best = None
    for index, name in enumerate(ARCHITECTURES):
        defaults = architecture_args(name)
        if defaults["distilled"] != distilled:
            continue
        differences = _differences(wanted, defaults)
        score = (len(differences), not name.endswith(side), index)
        if best is None or score < best[0]:
            best = (score, name, differences)
    return best[1], best[2]


def _grid_size(arrays, options, layout):
    """The image side of a square position-embedding grid."""
    rows = arrays[_POSEMB].shape[1]
    if options.get("position_embedding_prefix", True):
        rows -= sum(arrays[key].shape[1] for key in layout.tokens)
    if not _is_square(rows):
        raise CheckpointError(f"save_timm: the position embedding has {rows} patch rows, not a "
                              "square grid; pass the model's image_size in its options.")
    return math.isqrt(rows) * arrays["embedding/kernel"].shape[0]


def _hub_config(architecture, model_args, wanted, options, arrays, image_size):
    """config.json as timm's `save_config_for_hf` writes it (timm/models/_hub.py)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    num_classes = int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else 0
    crop = options.get("eval_crop_fraction")
    pretrained_cfg = dict(
        custom_load=False, input_size=[3, int(height), int(width)], fixed_input_size=True,
        # keras_vit's evaluation: the central crop_pct of each side, resized bilinearly to a
        # square without keeping the aspect ratio (pipelines.preprocess_for_eval).
        interpolation="bilinear", crop_pct=1.0 if crop is None else float(crop),
        crop_mode="squash",
        mean=[float(v) for v in options.get("input_mean", (0.5, 0.5, 0.5))],
        std=[float(v) for v in options.get("input_std", (0.5, 0.5, 0.5))],
        num_classes=num_classes, pool_size=None, first_conv="patch_embed.proj",
        classifier=["head", "head_dist"] if "head_dist/kernel" in arrays else "head",
    )
    config = {"architecture": architecture, "num_classes": num_classes,
              "num_features": int(wanted["embed_dim"]), "global_pool": wanted["global_pool"]}
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    return config


def _insert_after(mapping, after, key, value):
    items = list(mapping.items())
    position = [k for k, _ in items].index(after) + 1
    return dict(items[:position] + [(key, value)] + items[position:])


def save_timm(model, directory, *, class_names=None):
    """Writes `model` as a timm Hub folder: config.json + model.safetensors.

    The folder loads in timm unchanged (`timm.create_model("local-dir:" + directory,
    pretrained=True)`, or pushed to the Hub, `"hf-hub:user/name"`) and back in keras_vit
    (`keras_vit.from_checkpoint(directory)`). Both files are written under temporary names and
    then renamed.

    Args:
        model: a model as `create_model` or `from_checkpoint` builds it.
        directory: the folder to write; created if needed. Existing config.json and
            model.safetensors in it are replaced.
        class_names: optional list of the head's class names (timm's label_names).

    Returns:
        `directory`.

    Raises:
        CheckpointError: the model has a part timm's VisionTransformer cannot express
            (`timm_arrays_and_config`).
    """
    from keras_vit.checkpoints import model_arrays  # Here: checkpoints imports Keras.
    from keras_vit.model import model_options

    state, config = timm_arrays_and_config(model_arrays(model), model_options(model),
                                           class_names=class_names)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # safetensors.torch.save_file marks files {"format": "pt"}; Hugging Face loaders check it.
    common.write_safetensors(state, os.path.join(directory, WEIGHTS_NAME),
                             metadata={"format": "pt"})
    _write_json(config, os.path.join(directory, CONFIG_NAME))
    return directory


def _write_json(value, path):
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=2)
            file.write("\n")

    write_atomically(path, write)
