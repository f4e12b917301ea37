"""Writes checkpoints in timm's exact layout, for the timm reader's tests; no torch, no keras_vit.

`to_timm` is a NumPy port of huggingface/pytorch-image-models' own Google -> timm conversion,
`_load_weights` in timm/models/vision_transformer.py (it reads Google/big_vision .npz names,
which keras_vit's canonical layout extends, and fills timm's modules), with the modules it
does not cover named as timm's constructors name them:
  - `blocks.{i}.ls1.gamma`, `ls2.gamma`: vision_transformer.py `Block.__init__`
    (`self.ls1 = LayerScale(dim, init_values)`, timm/layers/layer_scale.py: `self.gamma`);
  - `reg_token` (1, R, D) and `fc_norm`: `VisionTransformer.__init__`;
  - `dist_token`, `head_dist`: timm/models/deit.py `VisionTransformerDistilled.__init__`.
Which modules exist follows `VisionTransformer.__init__` (e.g. `norm` only when not
`use_fc_norm`, `fc_norm` only when it is, `use_fc_norm = global_pool == 'avg'` for
fc_norm=None). `timm_config` is the dict timm/models/_hub.py `save_config_for_hf` writes.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file


def n2p(w, t=True):
    """`_load_weights.n2p`: a Flax array as the torch parameter it fills."""
    w = np.asarray(w, np.float32)
    if w.ndim == 4 and w.shape[0] == w.shape[1] == w.shape[2] == 1:
        w = w.flatten()
    if t:
        if w.ndim == 4:
            w = w.transpose([3, 2, 0, 1])
        elif w.ndim == 3:
            w = w.transpose([2, 0, 1])
        elif w.ndim == 2:
            w = w.transpose([1, 0])
    return w


def _flatten1(x):
    """torch's `x.flatten(1)`."""
    return x.reshape(x.shape[0], -1)


def to_timm(w, *, class_token=True, reg_tokens=0, distilled=False, global_pool="token",
            fc_norm=None, init_values=None, num_classes=None):
    """timm's state dict of a VisionTransformer(-Distilled) built with these arguments, filled
    from `w` (canonical/Google names) as `_load_weights` fills it.

    Returns:
        {timm key: float32 array}, torch layouts ((out, in) Linear weights, (D, 3, P, P) conv).
    """
    sd = {}
    use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
    sd["patch_embed.proj.weight"] = n2p(w["embedding/kernel"])
    sd["patch_embed.proj.bias"] = n2p(w["embedding/bias"])
    if class_token:
        sd["cls_token"] = n2p(w["cls"], t=False)
    if distilled:
        sd["dist_token"] = n2p(w["dist"], t=False)
    if reg_tokens:
        sd["reg_token"] = n2p(w["reg"], t=False)
    sd["pos_embed"] = n2p(w["Transformer/posembed_input/pos_embedding"], t=False)
    # `model.norm.weight.copy_(w['Transformer/encoder_norm/scale'])`; a use_fc_norm model has
    # fc_norm in its place (keras_vit's canonical `fc_norm`).
    norm, source = ("fc_norm", "fc_norm") if use_fc_norm else ("norm", "Transformer/encoder_norm")
    sd[f"{norm}.weight"] = n2p(w[f"{source}/scale"])
    sd[f"{norm}.bias"] = n2p(w[f"{source}/bias"])
    if num_classes is None or num_classes > 0:
        sd["head.weight"] = n2p(w["head/kernel"])
        sd["head.bias"] = n2p(w["head/bias"])
        if distilled:
            sd["head_dist.weight"] = n2p(w["head_dist/kernel"])
            sd["head_dist.bias"] = n2p(w["head_dist/bias"])
    if global_pool == "map":
        _attn_pool(sd, w)
    depth = 0
    while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
        depth += 1
    for i in range(depth):
        _block(sd, w, i, init_values)
    return sd


def _attn_pool(sd, w):
    """`_load_weights`' `isinstance(model.attn_pool, AttentionPoolLatent)` branch."""
    block_prefix = "MAPHead_0/"
    mha_prefix = block_prefix + "MultiHeadDotProductAttention_0/"
    sd["attn_pool.latent"] = n2p(w[f"{block_prefix}probe"], t=False)
    sd["attn_pool.kv.weight"] = np.concatenate([
        _flatten1(n2p(w[f"{mha_prefix}{n}/kernel"], t=False)).T for n in ("key", "value")])
    sd["attn_pool.kv.bias"] = np.concatenate([
        n2p(w[f"{mha_prefix}{n}/bias"], t=False).reshape(-1) for n in ("key", "value")])
    sd["attn_pool.q.weight"] = _flatten1(n2p(w[f"{mha_prefix}query/kernel"], t=False)).T
    sd["attn_pool.q.bias"] = n2p(w[f"{mha_prefix}query/bias"], t=False).reshape(-1)
    sd["attn_pool.proj.weight"] = _flatten1(n2p(w[f"{mha_prefix}out/kernel"]))
    sd["attn_pool.proj.bias"] = n2p(w[f"{mha_prefix}out/bias"])
    sd["attn_pool.norm.weight"] = n2p(w[f"{block_prefix}LayerNorm_0/scale"])
    sd["attn_pool.norm.bias"] = n2p(w[f"{block_prefix}LayerNorm_0/bias"])
    for r in range(2):
        dense = f"{block_prefix}MlpBlock_0/Dense_{r}/"
        sd[f"attn_pool.mlp.fc{r + 1}.weight"] = n2p(w[dense + "kernel"])
        sd[f"attn_pool.mlp.fc{r + 1}.bias"] = n2p(w[dense + "bias"])


def _block(sd, w, i, init_values):
    """`_load_weights`' block loop, Google's names (mha_sub, b_sub, ln1_sub = 1, 3, 2)."""
    mha_sub, b_sub, ln1_sub = (1, 3, 2)
    block_prefix = f"Transformer/encoderblock_{i}/"
    mha_prefix = block_prefix + f"MultiHeadDotProductAttention_{mha_sub}/"
    b = f"blocks.{i}."
    sd[b + "norm1.weight"] = n2p(w[f"{block_prefix}LayerNorm_0/scale"])
    sd[b + "norm1.bias"] = n2p(w[f"{block_prefix}LayerNorm_0/bias"])
    qkv = ("query", "key", "value")
    sd[b + "attn.qkv.weight"] = np.concatenate([
        _flatten1(n2p(w[f"{mha_prefix}{n}/kernel"], t=False)).T for n in qkv])
    sd[b + "attn.qkv.bias"] = np.concatenate([
        n2p(w[f"{mha_prefix}{n}/bias"], t=False).reshape(-1) for n in qkv])
    sd[b + "attn.proj.weight"] = _flatten1(n2p(w[f"{mha_prefix}out/kernel"]))
    sd[b + "attn.proj.bias"] = n2p(w[f"{mha_prefix}out/bias"])
    sd[b + "norm2.weight"] = n2p(w[f"{block_prefix}LayerNorm_{ln1_sub}/scale"])
    sd[b + "norm2.bias"] = n2p(w[f"{block_prefix}LayerNorm_{ln1_sub}/bias"])
    for r in range(2):
        dense = f"{block_prefix}MlpBlock_{b_sub}/Dense_{r}/"
        sd[b + f"mlp.fc{r + 1}.weight"] = n2p(w[dense + "kernel"])
        sd[b + f"mlp.fc{r + 1}.bias"] = n2p(w[dense + "bias"])
    if init_values:
        # Block: self.ls1 / self.ls2 = LayerScale(dim, init_values), parameter `gamma`.
        sd[b + "ls1.gamma"] = n2p(w[f"{block_prefix}LayerScale_0/scale"])
        sd[b + "ls2.gamma"] = n2p(w[f"{block_prefix}LayerScale_1/scale"])


def timm_config(architecture, *, num_classes, num_features, global_pool, model_args=None,
                pretrained_cfg=None, label_names=None):
    """config.json as `save_config_for_hf` writes it (key order included)."""
    hf_config = {"architecture": architecture, "num_classes": num_classes,
                 "num_features": num_features}
    if isinstance(global_pool, str) and global_pool:
        hf_config["global_pool"] = global_pool
    if label_names:
        hf_config["label_names"] = label_names
    if model_args:
        hf_config["model_args"] = model_args
    hf_config["pretrained_cfg"] = pretrained_cfg or {}
    return hf_config


def pretrained_cfg(*, input_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9,
                   num_classes=7, crop_mode="center", classifier="head"):
    """A pretrained_cfg as the Hub's timm folders carry it (filter_pretrained_cfg's output)."""
    return {"tag": "test", "custom_load": False, "input_size": [3, input_size, input_size],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": crop_pct,
            "crop_mode": crop_mode, "mean": list(mean), "std": list(std),
            "num_classes": num_classes, "pool_size": None, "first_conv": "patch_embed.proj",
            "classifier": classifier}


def write_safetensors(path, state_dict):
    """A bare .safetensors file, as safetensors.torch.save_file writes a state dict."""
    # safetensors.numpy stores each array's buffer as is: a transposed view must be copied.
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
              metadata={"format": "pt"})
    return path


def write_folder(directory, state_dict, config):
    """A Hub folder: config.json + model.safetensors, as `save_for_hf` writes them."""
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), state_dict)
    with open(os.path.join(directory, "config.json"), "w") as file:
        json.dump(config, file, indent=2)
    return directory
