"""Resampling of learned position embeddings to a new patch grid (paper, Section 3.2).

Fine-tuning at a higher resolution keeps the patch size, so the patch grid grows; the
pre-trained embeddings are interpolated in 2-D according to their location in the image.
"""

import numpy as np
import scipy.ndimage


def resample(embedding, old_grid_size, new_grid_size, num_prefix_tokens=1):
    """Resamples position embeddings from one patch grid to another.

    Bilinear, with `scipy.ndimage.zoom(order=1)` as google-research/vision_transformer's
    `checkpoint.py` does, so a checkpoint loads here exactly as it loads there. The first
    `num_prefix_tokens` positions (the class token) are kept as they are.

    Args:
        embedding: array (1, num_prefix_tokens + old_h · old_w, D).
        old_grid_size: (old_h, old_w), the grid the embedding was trained for.
        new_grid_size: (new_h, new_w).
        num_prefix_tokens: positions before the patch grid (1 with a class token, else 0).

    Returns:
        float32 array (1, num_prefix_tokens + new_h · new_w, D). The same values when the
        grids are equal.
    """
    embedding = np.asarray(embedding, dtype=np.float32)
    old_h, old_w = (int(side) for side in old_grid_size)
    new_h, new_w = (int(side) for side in new_grid_size)
    expected = num_prefix_tokens + old_h * old_w
    if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[1] != expected:
        raise ValueError(
            f"Position embedding of shape {embedding.shape} does not fit a {old_h}x{old_w} grid "
            f"with {num_prefix_tokens} prefix token(s): expected (1, {expected}, D)."
        )
    if (old_h, old_w) == (new_h, new_w):
        return embedding.copy()
    prefix = embedding[:, :num_prefix_tokens]
    grid = embedding[0, num_prefix_tokens:].reshape(old_h, old_w, -1)
    grid = scipy.ndimage.zoom(grid, (new_h / old_h, new_w / old_w, 1), order=1)
    grid = grid.reshape(1, new_h * new_w, -1).astype(np.float32)
    return np.concatenate([prefix, grid], axis=1)
