"""An independent NumPy Vision Transformer, written from the paper's equations (Eq. 1-4).

It reads Google's checkpoint layout directly (no keras_vit code), in float64, so the Keras
model can be checked against it. Also makes random checkpoints in that layout.
"""

import math

import numpy as np


def random_checkpoint(patch_size, hidden_size, num_layers, num_heads, mlp_dim, *, grid=4,
                      num_classes=7, pooling="token", representation_size=None, seed=0):
    """A checkpoint dict in google-research/vision_transformer's layout with random values."""
    rng = np.random.default_rng(seed)
    head_dim = hidden_size // num_heads

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    arrays = {
        "embedding/kernel": normal(patch_size, patch_size, 3, hidden_size, scale=0.1),
        "embedding/bias": normal(hidden_size),
        "Transformer/posembed_input/pos_embedding": normal(
            1, grid * grid + (pooling == "token"), hidden_size),
        "Transformer/encoder_norm/scale": 1 + normal(hidden_size),
        "Transformer/encoder_norm/bias": normal(hidden_size),
    }
    if pooling == "token":
        arrays["cls"] = normal(1, 1, hidden_size)
    for i in range(num_layers):
        block = f"Transformer/encoderblock_{i}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}/{norm}/scale"] = 1 + normal(hidden_size)
            arrays[f"{block}/{norm}/bias"] = normal(hidden_size)
        for name in ("query", "key", "value"):
            arrays[f"{attention}/{name}/kernel"] = normal(hidden_size, num_heads, head_dim)
            arrays[f"{attention}/{name}/bias"] = normal(num_heads, head_dim)
        arrays[f"{attention}/out/kernel"] = normal(num_heads, head_dim, hidden_size)
        arrays[f"{attention}/out/bias"] = normal(hidden_size)
        arrays[f"{block}/MlpBlock_3/Dense_0/kernel"] = normal(hidden_size, mlp_dim)
        arrays[f"{block}/MlpBlock_3/Dense_0/bias"] = normal(mlp_dim)
        arrays[f"{block}/MlpBlock_3/Dense_1/kernel"] = normal(mlp_dim, hidden_size)
        arrays[f"{block}/MlpBlock_3/Dense_1/bias"] = normal(hidden_size)
    width = hidden_size
    if representation_size:
        arrays["pre_logits/kernel"] = normal(hidden_size, representation_size)
        arrays["pre_logits/bias"] = normal(representation_size)
        width = representation_size
    arrays["head/kernel"] = normal(width, num_classes)
    arrays["head/bias"] = normal(num_classes)
    return arrays


def _layer_norm(x, scale, bias, epsilon=1e-6):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def forward(arrays, images, return_attention=False):
    """Logits (B, K) of the ViT in `arrays` for images (B, H, W, 3) in [0, 255], float64."""
    w = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    x = np.asarray(images, np.float64) / 127.5 - 1.0
    kernel = w["embedding/kernel"]
    p, d = kernel.shape[0], kernel.shape[3]
    b, h, wd, c = x.shape
    # Eq. 1: x_p^i E, with the patches flattened in (row, column, channel) order.
    patches = x.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (wd // p), p * p * c)
    z = patches @ kernel.reshape(p * p * c, d) + w["embedding/bias"]
    if "cls" in w:
        z = np.concatenate([np.broadcast_to(w["cls"], (b, 1, d)), z], axis=1)
    z = z + w["Transformer/posembed_input/pos_embedding"]
    attention_maps = []
    layer = 0
    while f"Transformer/encoderblock_{layer}/LayerNorm_0/scale" in w:
        block = f"Transformer/encoderblock_{layer}"
        att = f"{block}/MultiHeadDotProductAttention_1"
        # Eq. 2: z' = MSA(LN(z)) + z
        y = _layer_norm(z, w[f"{block}/LayerNorm_0/scale"], w[f"{block}/LayerNorm_0/bias"])
        q, k, v = (np.einsum("btd,dhk->bthk", y, w[f"{att}/{n}/kernel"]) + w[f"{att}/{n}/bias"]
                   for n in ("query", "key", "value"))
        head_dim = q.shape[-1]
        probabilities = _softmax(np.einsum("bqhk,bphk->bhqp", q, k) / math.sqrt(head_dim))
        attention_maps.append(probabilities)
        heads = np.einsum("bhqp,bphk->bqhk", probabilities, v)
        z = z + np.einsum("bqhk,hkd->bqd", heads, w[f"{att}/out/kernel"]) + w[f"{att}/out/bias"]
        # Eq. 3: z = MLP(LN(z')) + z'
        y = _layer_norm(z, w[f"{block}/LayerNorm_2/scale"], w[f"{block}/LayerNorm_2/bias"])
        y = _gelu_tanh(y @ w[f"{block}/MlpBlock_3/Dense_0/kernel"] + w[f"{block}/MlpBlock_3/Dense_0/bias"])
        z = z + y @ w[f"{block}/MlpBlock_3/Dense_1/kernel"] + w[f"{block}/MlpBlock_3/Dense_1/bias"]
        layer += 1
    # Eq. 4: y = LN(z_L^0) (or the mean of the patch tokens for "gap").
    z = _layer_norm(z, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"])
    y = z[:, 0] if "cls" in w else z.mean(axis=1)
    if "pre_logits/kernel" in w:
        y = np.tanh(y @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    logits = y @ w["head/kernel"] + w["head/bias"]
    if return_attention:
        return logits, np.stack(attention_maps, axis=1)
    return logits


def relative_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))
