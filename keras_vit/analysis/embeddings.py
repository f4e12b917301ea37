"""Position-embedding similarity (paper Figure 7, centre)."""

import numpy as np


def position_embedding_similarity(embedding, grid_size, num_prefix_tokens=1):
    """Cosine similarity of each patch's position embedding with every other patch's.

    Args:
        embedding: (1, P + gh · gw, D) or (P + gh · gw, D), the learned E_pos with P prefix
            (class-token) positions first, then the patches in row-major order.
        grid_size: (gh, gw).
        num_prefix_tokens: P.

    Returns:
        float64 (gh, gw, gh, gw): [r, c] is the map of similarities between patch (r, c)'s
        embedding and all others; [r, c, r, c] = 1.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim == 3 and embedding.shape[0] == 1:
        embedding = embedding[0]
    gh, gw = grid_size
    if embedding.ndim != 2 or embedding.shape[0] != num_prefix_tokens + gh * gw:
        raise ValueError(
            f"Position embedding of shape {embedding.shape} does not fit a {gh}x{gw} grid with "
            f"{num_prefix_tokens} prefix token(s): expected ({num_prefix_tokens + gh * gw}, D)."
        )
    patches = embedding[num_prefix_tokens:]
    norms = np.linalg.norm(patches, axis=-1, keepdims=True)
    unit = patches / np.where(norms > 0, norms, 1.0)
    return (unit @ unit.T).reshape(gh, gw, gh, gw)
