"""Writes canonical arrays as a Hugging Face transformers ViT folder, the way transformers does.

The truth this follows, ported to NumPy (no torch), in two steps composed as transformers'
own conversion composes them:

1. canonical (Google's .npz layout) -> timm's state_dict: timm's `_load_weights`
   (huggingface/pytorch-image-models, timm/models/vision_transformer.py, commit 0041cb7b),
   the non-big_vision branch: `_n2p` transposes 4-D kernels [3, 2, 0, 1], 3-D [2, 0, 1] and
   2-D [1, 0]; `attn.qkv` is the concatenation of `query/key/value` kernels `.flatten(1).T`
   and biases `.reshape(-1)`; `attn.proj` is `_n2p(out/kernel).flatten(1)`; the
   representation layer is `pre_logits.fc` (the timm of the time; now removed, see the NOTE
   there).
2. timm's state_dict -> transformers': `create_rename_keys`, `read_in_q_k_v` and
   `remove_classification_head_` of huggingface/transformers,
   src/transformers/models/vit/convert_vit_timm_to_pytorch.py (commit 0a8c149f): base models
   (ViTModel) lose the `vit.` prefix and keep `pre_logits.fc` as `pooler.dense`; the
   classification model (ViTForImageClassification) keeps `vit.` and turns `head` into
   `classifier`. Where timm has no pre_logits, the pooler rename is skipped (that version's
   rename_key would fail on it; later versions build ViTModel(add_pooling_layer=False)).

`hf_config` writes what `ViTConfig(...).to_dict()` saves (configuration_vit.py).
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

import timm_layout


def to_timm(w):
    """canonical arrays -> timm's VisionTransformer state_dict, as `_load_weights` fills it
    (tests/timm_layout.py's port), with the `pre_logits.fc` of the timm versions transformers'
    conversion script was written for."""
    sd = timm_layout.to_timm(w, num_classes=None if "head/kernel" in w else 0)
    if "pre_logits/kernel" in w:
        sd["pre_logits.fc.weight"] = timm_layout.n2p(w["pre_logits/kernel"])
        sd["pre_logits.fc.bias"] = timm_layout.n2p(w["pre_logits/bias"])
    return sd


def create_rename_keys(num_hidden_layers, base_model=False, use_pooler=False):
    """convert_vit_timm_to_pytorch.create_rename_keys (config -> its two fields used)."""
    rename_keys = []
    for i in range(num_hidden_layers):
        rename_keys.append((f"blocks.{i}.norm1.weight", f"vit.encoder.layer.{i}.layernorm_before.weight"))
        rename_keys.append((f"blocks.{i}.norm1.bias", f"vit.encoder.layer.{i}.layernorm_before.bias"))
        rename_keys.append((f"blocks.{i}.attn.proj.weight", f"vit.encoder.layer.{i}.attention.output.dense.weight"))
        rename_keys.append((f"blocks.{i}.attn.proj.bias", f"vit.encoder.layer.{i}.attention.output.dense.bias"))
        rename_keys.append((f"blocks.{i}.norm2.weight", f"vit.encoder.layer.{i}.layernorm_after.weight"))
        rename_keys.append((f"blocks.{i}.norm2.bias", f"vit.encoder.layer.{i}.layernorm_after.bias"))
        rename_keys.append((f"blocks.{i}.mlp.fc1.weight", f"vit.encoder.layer.{i}.intermediate.dense.weight"))
        rename_keys.append((f"blocks.{i}.mlp.fc1.bias", f"vit.encoder.layer.{i}.intermediate.dense.bias"))
        rename_keys.append((f"blocks.{i}.mlp.fc2.weight", f"vit.encoder.layer.{i}.output.dense.weight"))
        rename_keys.append((f"blocks.{i}.mlp.fc2.bias", f"vit.encoder.layer.{i}.output.dense.bias"))
    rename_keys.extend([
        ("cls_token", "vit.embeddings.cls_token"),
        ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
        ("pos_embed", "vit.embeddings.position_embeddings"),
    ])
    if base_model:
        rename_keys.extend([("norm.weight", "layernorm.weight"), ("norm.bias", "layernorm.bias")])
        if use_pooler:
            rename_keys.extend([("pre_logits.fc.weight", "pooler.dense.weight"),
                                ("pre_logits.fc.bias", "pooler.dense.bias")])
        rename_keys = [(pair[0], pair[1][4:]) if pair[1].startswith("vit") else pair
                       for pair in rename_keys]
    else:
        rename_keys.extend([
            ("norm.weight", "vit.layernorm.weight"),
            ("norm.bias", "vit.layernorm.bias"),
            ("head.weight", "classifier.weight"),
            ("head.bias", "classifier.bias"),
        ])
    return rename_keys


def read_in_q_k_v(state_dict, num_hidden_layers, hidden_size, base_model=False):
    """convert_vit_timm_to_pytorch.read_in_q_k_v: timm's fused qkv -> query, key, value."""
    prefix = "" if base_model else "vit."
    for i in range(num_hidden_layers):
        in_proj_weight = state_dict.pop(f"blocks.{i}.attn.qkv.weight")
        in_proj_bias = state_dict.pop(f"blocks.{i}.attn.qkv.bias")
        layer = f"{prefix}encoder.layer.{i}.attention.attention"
        state_dict[f"{layer}.query.weight"] = in_proj_weight[:hidden_size, :]
        state_dict[f"{layer}.query.bias"] = in_proj_bias[:hidden_size]
        state_dict[f"{layer}.key.weight"] = in_proj_weight[hidden_size:hidden_size * 2, :]
        state_dict[f"{layer}.key.bias"] = in_proj_bias[hidden_size:hidden_size * 2]
        state_dict[f"{layer}.value.weight"] = in_proj_weight[-hidden_size:, :]
        state_dict[f"{layer}.value.bias"] = in_proj_bias[-hidden_size:]


def to_huggingface(canonical_arrays, *, base_model=False):
    """canonical arrays -> transformers' ViT state_dict, as convert_vit_checkpoint builds it.

    base_model False: ViTForImageClassification (`vit.` keys + `classifier`; needs a head).
    base_model True: ViTModel (keys without `vit.`; the head removed; pre_logits -> pooler).
    """
    state_dict = to_timm(canonical_arrays)
    num_layers = sum(k.endswith("norm1.weight") for k in state_dict)
    hidden_size = state_dict["cls_token"].shape[-1]
    if base_model:
        for k in ("head.weight", "head.bias"):  # remove_classification_head_
            state_dict.pop(k, None)
    rename_keys = create_rename_keys(num_layers, base_model,
                                     use_pooler="pre_logits.fc.weight" in state_dict)
    for src, dest in rename_keys:
        state_dict[dest] = state_dict.pop(src)
    read_in_q_k_v(state_dict, num_layers, hidden_size, base_model)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}


def hf_config(canonical_arrays, *, num_heads, base_model=False, id2label=None, image_size=None,
              **overrides):
    """config.json of the model, as ViTConfig(...).to_dict() saves it (configuration_vit.py)."""
    patch, _, _, hidden = canonical_arrays["embedding/kernel"].shape
    posemb = canonical_arrays["Transformer/posembed_input/pos_embedding"]
    grid = int(round((posemb.shape[1] - 1) ** 0.5))
    mlp_dim = canonical_arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias"].size
    num_layers = sum(k.endswith("/LayerNorm_0/scale") for k in canonical_arrays)
    config = {
        "architectures": ["ViTModel" if base_model else "ViTForImageClassification"],
        "attention_probs_dropout_prob": 0.0, "encoder_stride": 16, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": int(hidden),
        "image_size": image_size or grid * patch,
        "initializer_range": 0.02,
        "intermediate_size": int(mlp_dim),
        "layer_norm_eps": 1e-12, "model_type": "vit", "num_attention_heads": num_heads,
        "num_channels": 3, "num_hidden_layers": num_layers, "patch_size": int(patch),
        "pooler_act": "tanh", "qkv_bias": True, "torch_dtype": "float32",
        "transformers_version": "4.46.0",
    }
    if "pre_logits/kernel" in canonical_arrays:
        config["pooler_output_size"] = int(canonical_arrays["pre_logits/kernel"].shape[1])
    if not base_model:
        num_classes = canonical_arrays["head/bias"].shape[0]
        # PretrainedConfig's default labels are LABEL_{i}; JSON turns the int keys into strings.
        labels = id2label or [f"LABEL_{i}" for i in range(num_classes)]
        config["id2label"] = {str(i): name for i, name in enumerate(labels)}
        config["label2id"] = {name: i for i, name in enumerate(labels)}
    config.update(overrides)
    return config


def write_folder(directory, canonical_arrays, *, num_heads, base_model=False, preprocessor=None,
                 dtype=np.float32, shards=1, **config):
    """Writes config.json, model.safetensors (or `shards` shards + index), preprocessor_config.json.

    save_pretrained's safetensors carry metadata {"format": "pt"}; shards are named
    model-0000i-of-0000n.safetensors with a model.safetensors.index.json weight_map.
    """
    os.makedirs(directory, exist_ok=True)
    state = to_huggingface(canonical_arrays, base_model=base_model)
    state = {k: v.astype(dtype) for k, v in state.items()}
    with open(os.path.join(directory, "config.json"), "w") as file:
        json.dump(hf_config(canonical_arrays, num_heads=num_heads, base_model=base_model, **config),
                  file, indent=2)
    if shards == 1:
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(state)
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[s::shards]}
            save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as file:
            json.dump({"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                       "weight_map": weight_map}, file)
    if preprocessor is not None:
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as file:
            json.dump(preprocessor, file, indent=2)
    return directory


def _layer_norm(x, state, name, eps):
    """torch.nn.LayerNorm(D, eps) with `name`.weight / .bias."""
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def _linear(x, state, name):
    """torch.nn.Linear: x @ weight.T + bias."""
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def hf_forward(state, config, pixel_values):
    """transformers' ViT forward (modeling_vit.py), in float64 NumPy, on its own state_dict.

    pixel_values: (B, 3, H, W), already normalised as the image processor does. Returns
    ViTForImageClassification's logits (classifier on sequence_output[:, 0]) when the state has
    a classifier, else ViTModel's pooler_output (tanh(pooler.dense(token 0))).
    """
    import scipy.special

    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    p = "vit." if "classifier.weight" in s else ""
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    act = {"gelu": lambda x: 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2))),
           "gelu_new": lambda x: 0.5 * x * (
               1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))}[config["hidden_act"]]
    # ViTPatchEmbeddings: Conv2d(kernel=stride=P), then .flatten(2).transpose(1, 2).
    weight = s[f"{p}embeddings.patch_embeddings.projection.weight"]
    d, _, patch, _ = weight.shape
    b, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, c, h // patch, patch, w // patch, patch)
    x = np.einsum("bciujv,dcuv->bijd", x, weight).reshape(b, -1, d)
    x = x + s[f"{p}embeddings.patch_embeddings.projection.bias"]
    cls = np.broadcast_to(s[f"{p}embeddings.cls_token"], (b, 1, d))
    x = np.concatenate([cls, x], axis=1) + s[f"{p}embeddings.position_embeddings"]
    for i in range(config["num_hidden_layers"]):
        layer = f"{p}encoder.layer.{i}"
        y = _layer_norm(x, s, f"{layer}.layernorm_before", eps)

        def transpose_for_scores(t):  # ViTSelfAttention: view (B, T, H, D/H), permute(0, 2, 1, 3)
            return t.reshape(b, t.shape[1], heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (transpose_for_scores(_linear(y, s, f"{layer}.attention.attention.{n}"))
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        x = _linear(context, s, f"{layer}.attention.output.dense") + x
        y = act(_linear(_layer_norm(x, s, f"{layer}.layernorm_after", eps), s,
                        f"{layer}.intermediate.dense"))
        x = _linear(y, s, f"{layer}.output.dense") + x
    x = _layer_norm(x, s, f"{p}layernorm", eps)
    if "classifier.weight" in s:
        return _linear(x[:, 0], s, "classifier")
    return np.tanh(_linear(x[:, 0], s, "pooler.dense"))
