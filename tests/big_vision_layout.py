"""Writes a ViT as google-research/big_vision saves it: the fixture of the big_vision tests.

A port of big_vision's own code, not the inverse of keras_vit's reader
(keras_vit/formats/big_vision.py):
  - the parameter tree: google-research/big_vision `big_vision/models/vit.py`. `_Model` names
    `embedding`, `Transformer` (the `Encoder`, whose blocks are `encoderblock_{i}` and norm
    `encoder_norm`), `pre_logits` and `head`, and holds the `pos_embedding` (`get_posemb`,
    "learn": (1, h*w, width), added before `cls` is concatenated) and `cls` (pool_type "tok")
    parameters itself; `MAPHead` (unnamed: `MAPHead_0`) holds `probe`. Unnamed submodules are
    numbered by Flax linen per class, in creation order, within their parent (`_linen_names`).
  - scan: vit.py `pyloop_to_scan`, which stacks every block's tree under `encoderblock`.
  - saving: `big_vision/utils.py` `save_checkpoint` (`tree_flatten_with_names`, whose
    `_traverse_with_names` joins names with "/" over sorted keys; `np.savez`) of the trainer's
    {"params": ..., "opt": ...}; `load_params` reads params from `params/`, Flax-optimizer
    checkpoints from `opt/target/`, a two-tower (SigLIP) image tower from `params/img/`.
  - bfloat16: jax's bfloat16 (ml_dtypes), which np.savez stores as a 2-byte void type
    (utils.recover_dtype).

The input is keras_vit's canonical layout (tests/vit_reference.py `random_checkpoint`), whose
block names are those of Google's pre-linen code: a submodule numbered over all submodules of
its parent in creation order (`_pre_linen_names`, what flax's `convert_pre_linen` undoes).
"""

import collections

import ml_dtypes
import numpy as np

# Encoder1DBlock.__call__ creates, in this order, the submodules that hold parameters.
_BLOCK_CHILDREN = ("LayerNorm", "MultiHeadDotProductAttention", "LayerNorm", "MlpBlock")
_CANONICAL_POSEMB = "Transformer/posembed_input/pos_embedding"
_PREFIX_TREES = {"": (), "params/": ("params",), "params/img/": ("params", "img"),
                 "opt/target/": ("opt", "target")}


def _linen_names(children):
    """Flax linen: `{Class}_{n}`, n counting that class only."""
    counts, names = collections.Counter(), []
    for child in children:
        names.append(f"{child}_{counts[child]}")
        counts[child] += 1
    return names


def _pre_linen_names(children):
    """Pre-linen Flax (Google's vision_transformer): n counts every submodule of the parent."""
    return [f"{child}_{position}" for position, child in enumerate(children)]


def _subtree(arrays, prefix):
    """The arrays under `prefix/` as a nested dict (utils.recover_tree)."""
    tree = {}
    for key, value in arrays.items():
        if key.startswith(prefix + "/"):
            *parents, leaf = key[len(prefix) + 1:].split("/")
            node = tree
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return tree


def model_tree(arrays, *, posemb="learn"):
    """vit.py `_Model`'s params for canonical `arrays`; posemb "sincos2d" stores none."""
    num_layers = len({k.split("/")[1] for k in arrays if k.startswith("Transformer/encoderblock_")})
    tree = {"embedding": _subtree(arrays, "embedding")}
    if posemb == "learn":
        tree["pos_embedding"] = arrays[_CANONICAL_POSEMB]
    if "cls" in arrays:
        tree["cls"] = arrays["cls"]
    encoder = {"encoder_norm": _subtree(arrays, "Transformer/encoder_norm")}
    for layer in range(num_layers):
        block = f"Transformer/encoderblock_{layer}"
        encoder[f"encoderblock_{layer}"] = {
            linen: _subtree(arrays, f"{block}/{google}")
            for google, linen in zip(_pre_linen_names(_BLOCK_CHILDREN),
                                     _linen_names(_BLOCK_CHILDREN))}
    tree["Transformer"] = encoder
    for module in ("MAPHead_0", "pre_logits", "head"):
        if any(key.startswith(module + "/") for key in arrays):
            tree[module] = _subtree(arrays, module)
    return tree


def _map_leaves(function, tree):
    if isinstance(tree, dict):
        return {key: _map_leaves(function, value) for key, value in tree.items()}
    return function(tree)


def pyloop_to_scan(tree):
    """vit.py `pyloop_to_scan`: the blocks' trees stacked into one `encoderblock` tree."""
    encoder = dict(tree["Transformer"])
    blocks = sorted((k for k in encoder if k.startswith("encoderblock_")),
                    key=lambda name: int(name.split("_")[-1]))
    stacked = [encoder.pop(name) for name in blocks]

    def stack(path_tree, *others):
        if isinstance(path_tree, dict):
            return {key: stack(path_tree[key], *(o[key] for o in others)) for key in path_tree}
        return np.stack([path_tree, *others])

    encoder["encoderblock"] = stack(*stacked)
    return {**tree, "Transformer": encoder}


def flatten_with_names(tree, prefix=""):
    """utils.tree_flatten_with_names: {"a/b/c": leaf}, keys visited in sorted order."""
    flat = {}
    for key in sorted(tree):
        name = f"{prefix}{key}"
        if isinstance(tree[key], dict):
            flat.update(flatten_with_names(tree[key], name + "/"))
        else:
            flat[name] = tree[key]
    return flat


def to_big_vision(arrays, *, prefix="params/", scan=False, bfloat16=False, posemb="learn"):
    """Canonical arrays -> {npz key: array} as big_vision's save_checkpoint writes them."""
    tree = model_tree(arrays, posemb=posemb)
    if scan:
        tree = pyloop_to_scan(tree)
    if bfloat16:
        tree = _map_leaves(lambda leaf: np.asarray(leaf).astype(ml_dtypes.bfloat16), tree)
    for parent in reversed(_PREFIX_TREES[prefix]):
        tree = {parent: tree}
    return flatten_with_names(tree)


def write_big_vision(path, arrays, **layout):
    """Saves `to_big_vision(arrays, **layout)` with np.savez (save_checkpoint); returns path."""
    np.savez(path, **to_big_vision(arrays, **layout))
    return str(path)


def bfloat16_rounded(arrays):
    """The float32 values the arrays have once stored as bfloat16 (round to nearest even)."""
    return {key: np.asarray(value).astype(ml_dtypes.bfloat16).astype(np.float32)
            for key, value in arrays.items()}


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    """vit.py `posemb_sincos_2d` ("Follows the MoCo v3 logic") in NumPy: (1, h*w, width)."""
    y, x = np.mgrid[:h, :w]
    assert width % 4 == 0, "Width must be mult of 4 for sincos posemb"
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature ** omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return np.asarray(pe, np.float32)[None, :, :]
