"""Resampling of learned position embeddings to a new patch grid (paper, Section 3.2).

Fine-tuning at a higher resolution keeps the patch size, so the patch grid grows; the
pre-trained embeddings are interpolated in 2-D according to their location in the image.

`resample` does it offline in NumPy (loading a checkpoint at another size); `resample_ops`
computes the same numbers inside a model's graph (`create_model(dynamic_image_size=True)`),
where the grid is known only at call time.
"""

import numpy as np
import scipy.ndimage
from keras import ops


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


def resample_ops(embedding, old_grid_size, new_grid_size, num_prefix_tokens=1):
    """`resample` in `keras.ops`, for a grid known only at call time (in the graph).

    The same bilinear interpolation as `scipy.ndimage.zoom(order=1)` in `resample`: output
    row i of n reads input row i · (m - 1) / (n - 1) (the grids' corners aligned; a side of
    1 reads the first row, as scipy does), so a dynamic-size model at a new size gives the
    logits of a fixed model whose embedding `resample` produced offline (float32 rounding
    aside). Separable, rows then columns, with gathers and a multiply-add rather than a
    matmul: at the old grid the weights are exactly 1 and 0, so the result is the embedding
    itself, bit for bit, on every backend and device.

    Args:
        embedding: tensor (1, num_prefix_tokens + old_h · old_w, D).
        old_grid_size: (old_h, old_w), Python ints: the grid the embedding was built for.
        new_grid_size: (new_h, new_w), Python ints or scalar integer tensors.
        num_prefix_tokens: positions before the patch grid, kept as they are.

    Returns:
        A tensor (1, num_prefix_tokens + new_h · new_w, D) of the embedding's dtype.
    """
    old_h, old_w = (int(side) for side in old_grid_size)
    new_h, new_w = new_grid_size
    dimension = ops.shape(embedding)[-1]
    prefix = embedding[:, :num_prefix_tokens]
    grid = ops.reshape(embedding[0, num_prefix_tokens:], (old_h, old_w, dimension))
    grid = _interpolate_axis(grid, old_h, new_h, axis=0)
    grid = _interpolate_axis(grid, old_w, new_w, axis=1)
    grid = ops.reshape(grid, (1, -1, dimension))
    return ops.concatenate([prefix, grid], axis=1)


def _interpolate_axis(grid, old_size, new_size, axis):
    """Linear interpolation of `grid` along `axis` from old_size to new_size samples, corners
    aligned (scipy.ndimage.zoom's order=1 coordinates).

    Args:
        grid: (h, w, D).
        old_size: Python int, grid.shape[axis].
        new_size: Python int or scalar integer tensor.
        axis: 0 (rows) or 1 (columns).

    Returns:
        grid with new_size samples along `axis`.
    """
    steps = ops.maximum(ops.cast(new_size, "float32") - 1.0, 1.0)
    # scipy's zoom maps output i to input i · (m - 1) / (n - 1); for n = 1 the ratio is 1.
    ratio = ops.where(ops.cast(new_size, "float32") > 1.0,
                      float(old_size - 1) / steps, 1.0)
    source = ops.cast(ops.arange(new_size), "float32") * ratio
    lower = ops.clip(ops.floor(source), 0.0, float(max(old_size - 2, 0)))
    fraction = ops.cast(source - lower, grid.dtype)
    lower = ops.cast(lower, "int32")
    upper = ops.minimum(lower + 1, old_size - 1)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    fraction = ops.reshape(fraction, shape)
    return (ops.take(grid, lower, axis=axis) * (1.0 - fraction)
            + ops.take(grid, upper, axis=axis) * fraction)
