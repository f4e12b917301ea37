"""Hugging Face transformers ViT folders (`config.json` + `model.safetensors`) in.

The key names and array layouts are those of transformers'
`src/transformers/models/vit/modeling_vit.py` (ViTEmbeddings, ViTSelfAttention, ViTSelfOutput,
ViTIntermediate, ViTOutput, ViTLayer, ViTModel, ViTPooler, ViTForImageClassification), as
written by `convert_vit_timm_to_pytorch.py` (`create_rename_keys`, `read_in_q_k_v`):

    [vit.]embeddings.cls_token                                   (1, 1, D)      cls
    [vit.]embeddings.position_embeddings                         (1, 1 + N, D)  covers the cls
    [vit.]embeddings.patch_embeddings.projection.{weight,bias}   (D, 3, P, P)   torch Conv2d
    [vit.]encoder.layer.{i}.layernorm_before.{weight,bias}                      LayerNorm_0
    [vit.]encoder.layer.{i}.attention.attention.{query,key,value}.{weight,bias} (D, D) torch Linear
    [vit.]encoder.layer.{i}.attention.output.dense.{weight,bias}                out
    [vit.]encoder.layer.{i}.layernorm_after.{weight,bias}                       LayerNorm_2
    [vit.]encoder.layer.{i}.intermediate.dense.{weight,bias}                    MlpBlock_3/Dense_0
    [vit.]encoder.layer.{i}.output.dense.{weight,bias}                          MlpBlock_3/Dense_1
    [vit.]layernorm.{weight,bias}                                               encoder_norm
    pooler.dense.{weight,bias}        ViTModel only: tanh(dense(token 0)), Google's pre_logits
    classifier.{weight,bias}          ViTForImageClassification only, on token 0: head

`vit.` prefixes the backbone of ViTForImageClassification; a bare ViTModel (base model) saves
its keys without it. The checkpoint's options come from `config.json` (`hidden_act`,
`layer_norm_eps`, `image_size`, `num_attention_heads`, `id2label`) and, where present, from
`preprocessor_config.json` (ViTImageProcessor's `image_mean`, `image_std`, `do_rescale`,
`rescale_factor`, `do_normalize`, `size`, and a centre crop where an image processor has one).
"""

import os
import re

import numpy as np

from keras_vit.checkpoints import POSITION_EMBEDDING_KEY as _POSEMB
from keras_vit.checkpoints import CheckpointError, CheckpointNotFoundError, as_float32
from keras_vit.formats import common

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
# What transformers' save_pretrained writes without safetensors: pickles (refused), and the
# TensorFlow / Flax weights, which this reader does not read.
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack")
MODEL_TYPE = "vit"

# transformers/activations.py ACT2FN: "gelu" is torch's exact erf GELU, "gelu_python" the same
# in Python; "gelu_new", "gelu_pytorch_tanh", "gelu_fast" and "gelu_accurate" are all
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (gelu_fast with sqrt(2/pi) to 10 digits).
_EXACT_GELU = ("gelu", "gelu_python")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")

# configuration_vit.py ViTConfig defaults, for keys a hand-written config.json leaves out.
_CONFIG_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                    "image_size": 224, "num_channels": 3, "qkv_bias": True, "pooler_act": "tanh"}
# image_utils.py IMAGENET_STANDARD_MEAN / _STD, ViTImageProcessor's defaults, and its
# rescale_factor default 1/255.
_PROCESSOR_DEFAULTS = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5),
                       "rescale_factor": 1 / 255}

_LAYER_PATTERN = re.compile(r"^encoder\.layer\.(\d+)\.")
# Keys present in some ViT folders that play no part in classification: ViTEmbeddings'
# mask_token (ViTModel(use_mask_token=True), for masked image modelling) is only read when
# `bool_masked_pos` is passed.
_IGNORED = ("embeddings.mask_token",)


def is_huggingface_folder(path):
    """Whether `path` is a folder whose config.json says `"model_type": "vit"`."""
    config_path = os.path.join(path, CONFIG)
    if not (os.path.isdir(path) and os.path.isfile(config_path)):
        return False
    try:
        return common.read_json(config_path).get("model_type") == MODEL_TYPE
    except CheckpointError:
        return False


def read_huggingface(path):
    """Reads a transformers ViT folder into the canonical layout.

    Args:
        path: the folder holding config.json and model.safetensors (or a sharded
            model.safetensors.index.json with its shards), preprocessor_config.json optional.

    Returns:
        A `ConvertedCheckpoint` (format "huggingface") with options approximate_gelu,
        layer_norm_epsilon, input_mean, input_std, eval_crop_fraction, image_size,
        position_embedding_prefix=True and pooling="token", and the class names of id2label
        unless they are transformers' generic LABEL_i.

    Raises:
        CheckpointNotFoundError: no config.json, or no weights file.
        CheckpointError: a pickle only, a config this model cannot express (qkv_bias false,
            num_channels other than 3, an activation other than a GELU), keys that are missing,
            unknown or mis-shaped, or a config that disagrees with the arrays.
    """
    config_path = os.path.join(path, CONFIG)
    config = common.read_json(config_path)
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{config_path} has model_type {config.get('model_type')!r}, expected 'vit' "
            "(transformers' ViTModel / ViTForImageClassification).")
    config = {**_CONFIG_DEFAULTS, **config}
    _check_config(config, config_path)
    approximate_gelu = _approximate_gelu(config["hidden_act"], config_path)
    state, weights_path = _read_state(path)
    arrays = _to_canonical(state, config, weights_path)
    if "pre_logits/kernel" in arrays and config["pooler_act"] != "tanh":
        raise CheckpointError(
            f"{config_path} has pooler_act {config['pooler_act']!r}; keras_vit's pre_logits "
            "layer (ViTPooler's place) is tanh.")
    _check_against_config(arrays, config, config_path)
    options = {
        "approximate_gelu": approximate_gelu,
        "layer_norm_epsilon": float(config["layer_norm_eps"]),
        **_preprocessing(os.path.join(path, PREPROCESSOR)),
        "image_size": _image_size(config["image_size"]),
        "position_embedding_prefix": True,
        "pooling": "token",
    }
    return common.ConvertedCheckpoint(
        arrays=arrays, options=options, source=str(path), format="huggingface",
        class_names=_class_names(config, arrays, config_path))


def _check_config(config, config_path):
    """Refuses configs whose model keras_vit cannot build exactly."""
    if not config["qkv_bias"]:
        raise CheckpointError(
            f"{config_path} has qkv_bias false (query, key and value without biases); "
            "expected true: keras_vit's attention always has these biases.")
    if config["num_channels"] != 3:
        raise CheckpointError(
            f"{config_path} has num_channels {config['num_channels']}, expected 3 (RGB): "
            "keras_vit's models take RGB images.")


def _approximate_gelu(hidden_act, config_path):
    """transformers' hidden_act -> keras_vit's approximate_gelu (True: the tanh form)."""
    if hidden_act in _EXACT_GELU:
        return False
    if hidden_act in _TANH_GELU:
        return True
    raise CheckpointError(
        f"{config_path} has hidden_act {hidden_act!r}; keras_vit's MLP has the exact GELU "
        f"({', '.join(_EXACT_GELU)}) or its tanh approximation ({', '.join(_TANH_GELU)}), "
        "nothing else.")


def _read_state(path):
    """{key: array} of model.safetensors, or of every shard a safetensors index lists."""
    weights_path = os.path.join(path, WEIGHTS)
    if os.path.isfile(weights_path):
        return common.read_safetensors(weights_path)[0], weights_path
    index_path = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index_path):
        return _read_shards(path, index_path), index_path
    for name in PICKLES:
        if os.path.isfile(os.path.join(path, name)):
            common.refuse_pickle(os.path.join(path, name))
    others = [name for name in OTHER_WEIGHTS if os.path.isfile(os.path.join(path, name))]
    raise CheckpointNotFoundError(
        f"{path} has no {WEIGHTS} (nor {WEIGHTS_INDEX})"
        + (f", only {', '.join(others)}, which keras_vit does not read" if others else "")
        + f". Download {WEIGHTS} from the model's Hub page into {path}.")


def _read_shards(path, index_path):
    """The tensors of a sharded checkpoint: every file of the index's weight_map, merged."""
    weight_map = common.read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no weight_map {{key: shard file}}.")
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(path, shard)
        for key, array in common.read_safetensors(shard_path)[0].items():
            if weight_map.get(key) == shard:
                state[key] = array
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(
            f"{index_path} lists keys its shards do not hold: {', '.join(missing)}.")
    return state


def _strip_prefix(state, weights_path):
    """Drops ViTForImageClassification's `vit.` prefix, so both layouts read alike."""
    stripped = {}
    for key, array in state.items():
        name = key[len("vit."):] if key.startswith("vit.") else key
        if name in stripped:
            raise CheckpointError(
                f"{weights_path} holds both {name} and vit.{name}; expected one of them.")
        stripped[name] = array
    return stripped


def _linear(weight):
    """A torch Linear weight (out, in) -> a Flax kernel (in, out)."""
    return weight.T


def _table(num_layers, num_heads):
    """[(HF key without `vit.`, canonical key, converter of the HF array)] of the backbone."""
    def per_head(weight):  # (H * D/H, D) -> (D, H, D/H); output index h * D/H + k
        return weight.T.reshape(weight.shape[1], num_heads, -1)

    def per_head_bias(bias):  # (H * D/H,) -> (H, D/H)
        return bias.reshape(num_heads, -1)

    def out(weight):  # (D, H * D/H) -> (H, D/H, D); input index h * D/H + k
        return weight.T.reshape(num_heads, -1, weight.shape[0])

    def keep(array):
        return array

    def conv(weight):  # torch Conv2d (D, 3, P, P) -> (P, P, 3, D)
        return weight.transpose(2, 3, 1, 0)

    rows = [("embeddings.cls_token", "cls", keep),
            ("embeddings.position_embeddings", _POSEMB, keep),
            ("embeddings.patch_embeddings.projection.weight", "embedding/kernel", conv),
            ("embeddings.patch_embeddings.projection.bias", "embedding/bias", keep),
            ("layernorm.weight", "Transformer/encoder_norm/scale", keep),
            ("layernorm.bias", "Transformer/encoder_norm/bias", keep)]
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}", f"Transformer/encoderblock_{i}"
        attention = f"{ours}/MultiHeadDotProductAttention_1"
        for name in ("query", "key", "value"):
            rows.append((f"{hf}.attention.attention.{name}.weight", f"{attention}/{name}/kernel",
                         per_head))
            rows.append((f"{hf}.attention.attention.{name}.bias", f"{attention}/{name}/bias",
                         per_head_bias))
        rows += [(f"{hf}.attention.output.dense.weight", f"{attention}/out/kernel", out),
                 (f"{hf}.attention.output.dense.bias", f"{attention}/out/bias", keep)]
        for hf_norm, our_norm in (("layernorm_before", "LayerNorm_0"),
                                  ("layernorm_after", "LayerNorm_2")):
            rows += [(f"{hf}.{hf_norm}.weight", f"{ours}/{our_norm}/scale", keep),
                     (f"{hf}.{hf_norm}.bias", f"{ours}/{our_norm}/bias", keep)]
        for hf_dense, dense in (("intermediate.dense", "Dense_0"), ("output.dense", "Dense_1")):
            rows += [(f"{hf}.{hf_dense}.weight", f"{ours}/MlpBlock_3/{dense}/kernel", _linear),
                     (f"{hf}.{hf_dense}.bias", f"{ours}/MlpBlock_3/{dense}/bias", keep)]
    return rows


def _heads(state):
    """Rows of the head: classifier -> head; without one, ViTModel's pooler -> pre_logits.

    ViTForImageClassification builds its ViTModel with add_pooling_layer=False and classifies
    sequence_output[:, 0] directly, so a pooler next to a classifier is never used (transformers
    drops it as an unexpected key), and is dropped here too. A ViTModel's pooler,
    tanh(dense(token 0)), is Google's pre_logits (convert_vit_timm_to_pytorch.py maps timm's
    pre_logits.fc to pooler.dense), and is read as such.
    """
    if "classifier.weight" in state:
        return [("classifier.weight", "head/kernel", _linear),
                ("classifier.bias", "head/bias", lambda bias: bias)], ["pooler.dense.weight",
                                                                      "pooler.dense.bias"]
    if "pooler.dense.weight" in state:
        return [("pooler.dense.weight", "pre_logits/kernel", _linear),
                ("pooler.dense.bias", "pre_logits/bias", lambda bias: bias)], []
    return [], []


def _to_canonical(state, config, weights_path):
    """HF keys -> canonical arrays (float32), reporting every missing and unknown key at once."""
    state = _strip_prefix(state, weights_path)
    layers = {int(m.group(1)) for m in map(_LAYER_PATTERN.match, state) if m}
    num_layers = max(layers) + 1 if layers else 0
    heads, dropped = _heads(state)
    rows = _table(num_layers, int(config["num_attention_heads"])) + heads
    missing = [hf for hf, _, _ in rows if hf not in state]
    known = {hf for hf, _, _ in rows} | set(_IGNORED) | set(dropped)
    unknown = sorted(key for key in state if key not in known)
    if missing or unknown or not num_layers:
        raise CheckpointError(
            f"{weights_path} is not a transformers ViT checkpoint keras_vit can read: "
            + "; ".join(part for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown keys {', '.join(unknown)}" if unknown else "",
                "no encoder.layer.{i} keys" if not num_layers else "") if part)
            + ". Expected the keys of ViTModel or ViTForImageClassification (modeling_vit.py).")
    arrays = {}
    for hf, ours, convert in rows:
        array = as_float32(state[hf], hf, weights_path)
        try:
            arrays[ours] = np.ascontiguousarray(convert(array))
        except ValueError as error:
            raise CheckpointError(
                f"{weights_path}: {hf} has shape {array.shape}, which does not split into "
                f"num_attention_heads={config['num_attention_heads']} heads ({error}).") from error
    return arrays


def _check_against_config(arrays, config, config_path):
    """The config's sizes agree with the arrays (transformers would refuse them otherwise)."""
    patch, _, channels, width = arrays["embedding/kernel"].shape
    found = {"hidden_size": width, "num_channels": channels,
             "num_hidden_layers": sum(k.endswith("/LayerNorm_0/scale") for k in arrays),
             "intermediate_size": arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias"].size,
             "patch_size": patch}
    wrong = [f"{key} {config[key]} (the weights say {value})"
             for key, value in found.items() if key in config and config[key] != value]
    height, width_px = _image_size(config["image_size"], pair=True)
    tokens = 1 + (height // patch) * (width_px // patch)
    if arrays[_POSEMB].shape[1] != tokens:
        wrong.append(f"image_size {config['image_size']} (the position embedding has "
                     f"{arrays[_POSEMB].shape[1]} tokens, expected 1 + patches = {tokens})")
    if wrong:
        raise CheckpointError(f"{config_path} disagrees with the weights: {'; '.join(wrong)}.")


def _image_size(value, pair=False):
    """config image_size (int or [h, w]) -> int, or (h, w) when not square (always with pair)."""
    height, width = (value, value) if isinstance(value, int) else tuple(value)
    if pair:
        return int(height), int(width)
    return int(height) if height == width else (int(height), int(width))


def _class_names(config, arrays, config_path):
    """id2label in index order, or None for transformers' generic names LABEL_0, LABEL_1, ..."""
    id2label = config.get("id2label")
    if not id2label or "head/bias" not in arrays:
        return None
    try:
        labels = {int(index): str(name) for index, name in id2label.items()}
    except (AttributeError, ValueError) as error:
        raise CheckpointError(
            f"{config_path}: id2label is not an object of {{index: name}} ({error}).") from error
    num_classes = arrays["head/bias"].shape[0]
    if sorted(labels) != list(range(num_classes)):
        raise CheckpointError(
            f"{config_path}: id2label has {len(labels)} labels, but the classifier has "
            f"{num_classes} classes; expected the indices 0..{num_classes - 1}.")
    names = [labels[i] for i in range(num_classes)]
    if names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return names


def _preprocessing(processor_path):
    """preprocessor_config.json -> input_mean, input_std (on [0, 1] pixels), eval_crop_fraction.

    ViTImageProcessor (image_processing_vit.py) resizes the whole image to size {height, width}
    (bilinear by default), multiplies by rescale_factor (1/255) and normalises with image_mean
    and image_std (0.5 each by default): nothing is cropped, so eval_crop_fraction is None. An
    image processor with do_center_crop (DeiTImageProcessor, BitImageProcessor) resizes to
    `size`, then crops `crop_size`: the fraction kept is crop / resize, as timm's crop_pct. The
    resampling filter is not carried over.
    """
    processor = common.read_json(processor_path) if os.path.exists(processor_path) else {}
    processor = {**_PROCESSOR_DEFAULTS, **processor}
    mean = np.broadcast_to(np.asarray(processor["image_mean"], np.float64), (3,))
    std = np.broadcast_to(np.asarray(processor["image_std"], np.float64), (3,))
    if not processor.get("do_normalize", True):
        mean, std = np.zeros(3), np.ones(3)
    # On [0, 1] pixels p: (p * 255 * rescale - mean) / std = (p - mean') / std'.
    rescale = float(processor["rescale_factor"]) if processor.get("do_rescale", True) else 1.0
    scale = 255.0 * rescale
    return {"input_mean": tuple(float(m) for m in mean / scale),
            "input_std": tuple(float(s) for s in std / scale),
            "eval_crop_fraction": _crop_fraction(processor, processor_path)}


def _crop_fraction(processor, processor_path):
    """crop / resize of an image processor that centre-crops, else None (ViT resizes only)."""
    if not processor.get("do_center_crop") or not processor.get("crop_size"):
        return None
    size, crop = processor.get("size"), processor["crop_size"]
    crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height"))
    if not isinstance(size, (int, float)) or not isinstance(crop, (int, float)) or size <= 0:
        raise CheckpointError(
            f"{processor_path} centre-crops, but its size {processor.get('size')!r} and "
            f"crop_size {processor['crop_size']!r} do not give a crop fraction; expected "
            "{'height': h} or {'shortest_edge': s} for both.")
    return float(crop) / float(size)
