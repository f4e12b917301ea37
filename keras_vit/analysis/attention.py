"""Attention rollout and mean attention distance (paper Figures 6 and 7, right).

Shapes: B = images, L = layers (encoder blocks), H = heads, T = tokens = P + N with P prefix
tokens (1 class token, or 0 for "gap" pooling) followed by the N = gh · gw patches in row-major
order, as `keras_vit.attention_model` returns them.
"""

import numpy as np

from pipelines.errors import UserError


def model_geometry(model):
    """(grid_size (gh, gw), patch_size in pixels, num_prefix_tokens) of a keras_vit model."""
    try:
        position = model.get_layer("position_embedding")
        patches = model.get_layer("patch_embedding")
    except ValueError as error:
        raise UserError(
            f"Model {model.name!r} has no 'position_embedding' / 'patch_embedding' layer: expected "
            "a Vision Transformer built by keras_vit.create_model or loaded by load_classifier."
        ) from error
    return tuple(position.grid_size), int(patches.patch_size), int(position.num_prefix_tokens)


def attention_maps(model, images, batch_size=8):
    """Attention probabilities of every block for images (B, H_img, W_img, 3) in [0, 255].

    Uses `keras_vit.attention_model` (the same blocks, called with return_attention_scores).

    Returns:
        float32 (B, L, H, T, T); rows (queries) sum to 1.
    """
    from keras_vit.model import attention_model

    with_attention = attention_model(model)
    outputs = with_attention.predict(np.asarray(images, np.float32), batch_size=batch_size, verbose=0)
    return np.asarray(outputs["attention"], np.float32)


def _check_attention(attention):
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim < 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(
            f"Expected attention of shape (..., layers, heads, tokens, tokens), got {attention.shape}."
        )
    return attention


def attention_rollout(attention, residual_weight=0.5):
    """Attention rollout (Abnar & Zuidema 2020, Eq. in Sec. 3): how much each input token
    contributes to each output token through all layers.

    Per layer the heads are averaged (as the ViT paper, Appendix D.8), the residual connection
    is modelled as Ã_l = (1 - w) · A_l + w · I with rows renormalized, and the layers are
    chained: R = Ã_L · … · Ã_1 (row i of R: output token i as a mix of input tokens).

    Args:
        attention: (..., L, H, T, T) attention probabilities, first layer first.
        residual_weight: w, 0.5 in the paper; 0 gives the raw product of attention maps.

    Returns:
        float64 (..., T, T), rows sum to 1.
    """
    attention = _check_attention(attention)
    if not 0.0 <= residual_weight <= 1.0:
        raise ValueError(f"residual_weight must be in [0, 1], got {residual_weight}.")
    mixed = attention.mean(axis=-3)  # (..., L, T, T)
    identity = np.eye(mixed.shape[-1])
    mixed = (1.0 - residual_weight) * mixed + residual_weight * identity
    mixed = mixed / mixed.sum(axis=-1, keepdims=True)
    rollout = np.broadcast_to(identity, mixed.shape[:-3] + identity.shape).copy()
    for layer in range(mixed.shape[-3]):
        rollout = mixed[..., layer, :, :] @ rollout
    return rollout


def rollout_map(rollout, grid_size, num_prefix_tokens=1):
    """The rollout as a map over the patch grid, scaled so each image's maximum is 1.

    With a class token the map is the class token's row (what the classifier's input is made
    of); without one ("gap" pooling) it is the mean of the patch tokens' rows, as the
    classifier averages them.

    Args:
        rollout: (B, T, T) from `attention_rollout`.
        grid_size: (gh, gw) with gh · gw = T - num_prefix_tokens.
        num_prefix_tokens: 1 with a class token, 0 without.

    Returns:
        float64 (B, gh, gw) in [0, 1].
    """
    rollout = np.asarray(rollout, dtype=np.float64)
    gh, gw = grid_size
    if rollout.ndim != 3 or rollout.shape[-1] != num_prefix_tokens + gh * gw:
        raise ValueError(
            f"Rollout of shape {rollout.shape} does not fit a {gh}x{gw} grid with "
            f"{num_prefix_tokens} prefix token(s): expected (B, {num_prefix_tokens + gh * gw}, "
            f"{num_prefix_tokens + gh * gw})."
        )
    if num_prefix_tokens:
        relevance = rollout[:, 0, num_prefix_tokens:]
    else:
        relevance = rollout.mean(axis=1)
    relevance = relevance.reshape(-1, gh, gw)
    peak = relevance.max(axis=(1, 2), keepdims=True)
    return relevance / np.where(peak > 0, peak, 1.0)


def patch_distances(grid_size, patch_size):
    """Euclidean distances in pixels between the centres of all pairs of patches.

    Args:
        grid_size: (gh, gw) patches.
        patch_size: side of a patch in pixels.

    Returns:
        float64 (N, N), N = gh · gw, patches in row-major order.
    """
    gh, gw = grid_size
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    centres = np.stack([rows, cols], axis=1).astype(np.float64) * patch_size
    return np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)


def mean_attention_distance(attention, grid_size, patch_size, num_prefix_tokens=1):
    """Mean attention distance per layer and head (paper Figure 7, right), in pixels.

    For a query patch, the distance it attends over is the attention-weighted mean of the
    distances from its centre to the centres of the key patches. The class token has no place
    in the image, so its row and column are dropped and each query's weights over the patches
    are renormalized to sum to 1. (keras.io's "investigating ViT" example does not
    renormalize, which counts attention to the class token as distance 0.) The result is
    averaged over query patches and images: the "attention distance" analogous to a CNN's
    receptive field size.

    Args:
        attention: (B, L, H, T, T) or (L, H, T, T) attention probabilities.
        grid_size: (gh, gw).
        patch_size: pixels per patch side.
        num_prefix_tokens: tokens before the patches (1 = class token).

    Returns:
        float64 (L, H) mean distances in pixels.
    """
    attention = _check_attention(attention)
    if attention.ndim == 4:
        attention = attention[None]
    if attention.ndim != 5:
        raise ValueError(f"Expected attention (B, L, H, T, T) or (L, H, T, T), got {attention.shape}.")
    gh, gw = grid_size
    if attention.shape[-1] != num_prefix_tokens + gh * gw:
        raise ValueError(
            f"Attention over {attention.shape[-1]} tokens does not fit a {gh}x{gw} grid with "
            f"{num_prefix_tokens} prefix token(s)."
        )
    patches = attention[..., num_prefix_tokens:, num_prefix_tokens:]  # (B, L, H, N, N)
    total = patches.sum(axis=-1, keepdims=True)
    weights = patches / np.where(total > 0, total, 1.0)
    per_query = (weights * patch_distances(grid_size, patch_size)).sum(axis=-1)  # (B, L, H, N)
    return per_query.mean(axis=(0, 3))
