"""An independent NumPy Vision Transformer, written from the paper's equations (Eq. 1-4).

It reads Google's checkpoint layout directly (no keras_vit code), in float64, so the Keras
model can be checked against it, with the options other projects' ViTs use (exact GELU, other
LayerNorm epsilons and input normalisations, register and distillation tokens, LayerScale,
fc_norm, the MAP head). Also makes random checkpoints in that layout.
"""

import math

import numpy as np
import scipy.special


def random_checkpoint(patch_size, hidden_size, num_layers, num_heads, mlp_dim, *, grid=4,
                      num_classes=7, pooling="token", representation_size=None, seed=0,
                      class_token=None, num_registers=0, distillation_token=False,
                      position_embedding_prefix=True, layer_scale=False,
                      norm_after_pooling=False):
    """A checkpoint dict in keras_vit's canonical layout (Google's, extended) with random values.

    The extensions: `dist` (distillation token), `reg` (1, R, D) register tokens, LayerScale
    `LayerScale_{0,1}/scale` per block, `fc_norm` instead of `Transformer/encoder_norm`, the
    MAP head (`MAPHead_0/...`, big_vision's names) and `head_dist`.
    """
    rng = np.random.default_rng(seed)
    head_dim = hidden_size // num_heads
    class_token = pooling == "token" if class_token is None else class_token

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def attention(prefix):
        for name in ("query", "key", "value"):
            arrays[f"{prefix}/{name}/kernel"] = normal(hidden_size, num_heads, head_dim)
            arrays[f"{prefix}/{name}/bias"] = normal(num_heads, head_dim)
        arrays[f"{prefix}/out/kernel"] = normal(num_heads, head_dim, hidden_size)
        arrays[f"{prefix}/out/bias"] = normal(hidden_size)

    def norm(prefix):
        arrays[f"{prefix}/scale"] = 1 + normal(hidden_size)
        arrays[f"{prefix}/bias"] = normal(hidden_size)

    def mlp(prefix):
        arrays[f"{prefix}/Dense_0/kernel"] = normal(hidden_size, mlp_dim)
        arrays[f"{prefix}/Dense_0/bias"] = normal(mlp_dim)
        arrays[f"{prefix}/Dense_1/kernel"] = normal(mlp_dim, hidden_size)
        arrays[f"{prefix}/Dense_1/bias"] = normal(hidden_size)

    num_prefix = class_token + distillation_token + num_registers
    arrays = {
        "embedding/kernel": normal(patch_size, patch_size, 3, hidden_size, scale=0.1),
        "embedding/bias": normal(hidden_size),
        "Transformer/posembed_input/pos_embedding": normal(
            1, grid * grid + num_prefix * position_embedding_prefix, hidden_size),
    }
    if class_token:
        arrays["cls"] = normal(1, 1, hidden_size)
    if distillation_token:
        arrays["dist"] = normal(1, 1, hidden_size)
    if num_registers:
        arrays["reg"] = normal(1, num_registers, hidden_size)
    for i in range(num_layers):
        block = f"Transformer/encoderblock_{i}"
        norm(f"{block}/LayerNorm_0")
        attention(f"{block}/MultiHeadDotProductAttention_1")
        norm(f"{block}/LayerNorm_2")
        mlp(f"{block}/MlpBlock_3")
        if layer_scale:
            arrays[f"{block}/LayerScale_0/scale"] = normal(hidden_size, scale=0.5)
            arrays[f"{block}/LayerScale_1/scale"] = normal(hidden_size, scale=0.5)
    norm("fc_norm" if norm_after_pooling else "Transformer/encoder_norm")
    if pooling == "map":
        arrays["MAPHead_0/probe"] = normal(1, 1, hidden_size)
        attention("MAPHead_0/MultiHeadDotProductAttention_0")
        norm("MAPHead_0/LayerNorm_0")
        mlp("MAPHead_0/MlpBlock_0")
    width = hidden_size
    if representation_size:
        arrays["pre_logits/kernel"] = normal(hidden_size, representation_size)
        arrays["pre_logits/bias"] = normal(representation_size)
        width = representation_size
    arrays["head/kernel"] = normal(width, num_classes)
    arrays["head/bias"] = normal(num_classes)
    if distillation_token:
        arrays["head_dist/kernel"] = normal(width, num_classes)
        arrays["head_dist/bias"] = normal(num_classes)
    return arrays


def _layer_norm(x, scale, bias, epsilon=1e-6):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_exact(x):
    return 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2)))


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _attention(w, prefix, queries, tokens):
    """Multi-head attention of `queries` (B, Q, D) over `tokens` (B, T, D); probabilities too."""
    q = np.einsum("btd,dhk->bthk", queries, w[f"{prefix}/query/kernel"]) + w[f"{prefix}/query/bias"]
    k, v = (np.einsum("btd,dhk->bthk", tokens, w[f"{prefix}/{n}/kernel"]) + w[f"{prefix}/{n}/bias"]
            for n in ("key", "value"))
    probabilities = _softmax(np.einsum("bqhk,bphk->bhqp", q, k) / math.sqrt(q.shape[-1]))
    heads = np.einsum("bhqp,bphk->bqhk", probabilities, v)
    out = np.einsum("bqhk,hkd->bqd", heads, w[f"{prefix}/out/kernel"]) + w[f"{prefix}/out/bias"]
    return out, probabilities


def _mlp(w, prefix, x, gelu):
    x = gelu(x @ w[f"{prefix}/Dense_0/kernel"] + w[f"{prefix}/Dense_0/bias"])
    return x @ w[f"{prefix}/Dense_1/kernel"] + w[f"{prefix}/Dense_1/bias"]


def _embed(w, x, position_embedding_prefix):
    """Eq. 1: pixels (B, H, W, 3), already normalised -> tokens (B, T, D)."""
    kernel = w["embedding/kernel"]
    p, d = kernel.shape[0], kernel.shape[3]
    b, h, wd, c = x.shape
    # x_p^i E, with the patches flattened in (row, column, channel) order.
    patches = x.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (wd // p), p * p * c)
    z = patches @ kernel.reshape(p * p * c, d) + w["embedding/bias"]
    prefix = [np.broadcast_to(w[key], (b,) + w[key].shape[1:])
              for key in ("cls", "dist", "reg") if key in w]
    position = w["Transformer/posembed_input/pos_embedding"]
    if position_embedding_prefix:
        return np.concatenate(prefix + [z], axis=1) + position
    return np.concatenate(prefix + [z + position], axis=1)


def forward(arrays, images, return_attention=False, *, approximate_gelu=True,
            layer_norm_epsilon=1e-6, input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5),
            pooling=None, position_embedding_prefix=True):
    """Logits (B, K) of the ViT in `arrays` for images (B, H, W, 3) in [0, 255], float64.

    `arrays` is in the canonical layout (`random_checkpoint`); the options are those of
    `keras_vit.create_model`. pooling None: "map" with a MAP head, else "token" with a class
    token, else "gap" (the mean of the patch tokens, prefix tokens excluded, as timm's "avg").
    A distillation token's model outputs the mean of both heads (DeiT at inference).
    """
    run = _Run(arrays, approximate_gelu, layer_norm_epsilon)
    blocks, attention_maps = run.encode(images, input_mean, input_std, position_embedding_prefix)
    heads = run.head_features(run.final_norm(blocks[-1]), pooling)
    logits = sum(features @ run.w[f"{name}/kernel"] + run.w[f"{name}/bias"]
                 for name, features in heads) / len(heads)
    if return_attention:
        return logits, np.stack(attention_maps, axis=1)
    return logits


def representations(arrays, images, *, approximate_gelu=True, layer_norm_epsilon=1e-6,
                    input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5), pooling=None,
                    position_embedding_prefix=True):
    """What a ViT computes before its head, float64, for the same arguments as `forward`.

    Returns a dict:
        "blocks": every encoder block's output, first block first, each (B, T, D) with every
            token (prefix tokens first), before any final norm.
        "normed_blocks": the same through the final norm: the encoder's LayerNorm, or
            `fc_norm` applied to every token where the model normalises after pooling.
        "num_prefix_tokens": tokens before the patches.
        "pre_logits": the features the head reads (B, D) or (B, representation_size); with
            a distillation token the mean of the class and distillation features (timm's
            `VisionTransformerDistilled.forward_head(pre_logits=True)`).
    """
    run = _Run(arrays, approximate_gelu, layer_norm_epsilon)
    blocks, _ = run.encode(images, input_mean, input_std, position_embedding_prefix)
    final = "Transformer/encoder_norm" if "Transformer/encoder_norm/scale" in run.w else "fc_norm"
    heads = run.head_features(run.final_norm(blocks[-1]), pooling)
    return {
        "blocks": blocks,
        "normed_blocks": [run.norm(final, z) for z in blocks],
        "num_prefix_tokens": run.num_prefix,
        "pre_logits": sum(features for _, features in heads) / len(heads),
    }


class _Run:
    """One checkpoint's weights in float64 and the options that shape its computation."""

    def __init__(self, arrays, approximate_gelu, layer_norm_epsilon):
        self.w = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
        self.gelu = _gelu_tanh if approximate_gelu else _gelu_exact
        self.epsilon = layer_norm_epsilon
        self.num_prefix = sum(self.w[key].shape[1] for key in ("cls", "dist", "reg")
                              if key in self.w)

    def norm(self, prefix, x):
        return _layer_norm(x, self.w[f"{prefix}/scale"], self.w[f"{prefix}/bias"], self.epsilon)

    def encode(self, images, input_mean, input_std, position_embedding_prefix):
        """Pixels (B, H, W, 3) -> every block's output (B, T, D) and attention (B, H, T, T)."""
        w = self.w
        x = (np.asarray(images, np.float64) / 255.0 - np.asarray(input_mean)) / np.asarray(input_std)
        z = _embed(w, x, position_embedding_prefix)
        outputs, attention_maps = [], []
        layer = 0
        while f"Transformer/encoderblock_{layer}/LayerNorm_0/scale" in w:
            block = f"Transformer/encoderblock_{layer}"
            scales = [w.get(f"{block}/LayerScale_{i}/scale", 1.0) for i in (0, 1)]
            # Eq. 2: z' = MSA(LN(z)) + z
            y = self.norm(f"{block}/LayerNorm_0", z)
            attended, probabilities = _attention(w, f"{block}/MultiHeadDotProductAttention_1", y, y)
            attention_maps.append(probabilities)
            z = z + scales[0] * attended
            # Eq. 3: z = MLP(LN(z')) + z'
            z = z + scales[1] * _mlp(w, f"{block}/MlpBlock_3",
                                     self.norm(f"{block}/LayerNorm_2", z), self.gelu)
            outputs.append(z)
            layer += 1
        return outputs, attention_maps

    def final_norm(self, z):
        """Eq. 4's LayerNorm of the encoder output, unless the model normalises after pooling."""
        if "Transformer/encoder_norm/scale" in self.w:
            return self.norm("Transformer/encoder_norm", z)
        return z

    def head_features(self, z, pooling):
        """The encoder output (B, T, D) -> [(head name, the features it reads)]."""
        w = self.w
        if pooling is None:
            pooling = "map" if "MAPHead_0/probe" in w else "token" if "cls" in w else "gap"
        if pooling == "map":
            probe = np.broadcast_to(w["MAPHead_0/probe"], (z.shape[0], 1, z.shape[2]))
            y, _ = _attention(w, "MAPHead_0/MultiHeadDotProductAttention_0", probe, z)
            y = (y + _mlp(w, "MAPHead_0/MlpBlock_0", self.norm("MAPHead_0/LayerNorm_0", y),
                          self.gelu))[:, 0]
        elif pooling == "token":
            y = z[:, 0]
        else:
            y = z[:, self.num_prefix:].mean(axis=1)
        heads = [("head", y)]
        if "dist" in w:
            heads.append(("head_dist", z[:, 1]))
        pooled = []
        for name, features in heads:
            if "fc_norm/scale" in w:
                features = self.norm("fc_norm", features)
            if "pre_logits/kernel" in w:
                features = np.tanh(features @ w["pre_logits/kernel"] + w["pre_logits/bias"])
            pooled.append((name, features))
        return pooled


def relative_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def random_images(batch=2, size=16, seed=1):
    """float32 (batch, size, size, 3) pixels, uniform in [0, 255]: the tests' input images."""
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def assert_same_arrays(actual, expected):
    """Both dicts hold the same keys, and each array is float32 and equal to the expected."""
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == np.float32, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)
