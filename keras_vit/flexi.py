"""FlexiViT's patch-embedding resize (Beyer et al. 2023, "FlexiViT: One Model for All Patch
Sizes", Section 3.4): load a patch-P checkpoint into a model of patch P'.

Resizing an image patch x (P×P) to P'×P' is linear, resize(x) = B x with B of shape
(P'², P²). The paper looks for the kernel ŵ with <B x, ŵ> = <x, w> for every patch, i.e.
Bᵀ ŵ = w, and takes the least-squares solution ŵ = pinv(Bᵀ) w (its Eq. 4 and 5): exact when
P' >= P (B has full column rank), the minimum-norm approximation when P' < P.

Follows big_vision `big_vision/models/proj/flexi/vit.py` `resample_patchemb` (bilinear
tf.image.resize, half-pixel centres, as its input pipeline resizes images) and timm
`timm/layers/patch_embed.py` `resample_patch_embed` (the same pseudo-inverse; timm's default
resize is bicubic with antialiasing, big_vision's bilinear is kept here, so that a bilinearly
upsampled image is what the resized kernel inverts). B is built here in NumPy from the 1-D
interpolation matrices (B = B_rows ⊗ B_columns) instead of resizing each basis vector.
"""

import numpy as np


def resample_patch_embedding(kernel, new_patch_size):
    """The patch-embedding kernel resized to another patch size by FlexiViT's PI-resize.

    Args:
        kernel: array (P_h, P_w, C, D), `embedding/kernel` of a checkpoint (the Conv2D kernel
            of `layers.PatchEmbedding`).
        new_patch_size: P' (an int) or (P'_h, P'_w).

    Returns:
        float32 array (P'_h, P'_w, C, D) with <bilinear_resize(x), new> = <x, kernel> for
        every patch x (C channels) when P' >= P; the same values when the sizes are equal.

    Raises:
        ValueError: `kernel` is not 4-D, or a new side is not a positive integer.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"resample_patch_embedding expects a kernel (P, P, C, D), got shape "
                         f"{kernel.shape}; pass the patch embedding's Conv2D kernel.")
    new_h, new_w = _patch_sides(new_patch_size)
    old_h, old_w, channels, width = kernel.shape
    if (old_h, old_w) == (new_h, new_w):
        return kernel.astype(np.float32, copy=True)
    resize = resize_matrix((old_h, old_w), (new_h, new_w))  # (P'², P²)
    # Eq. 5: ŵ = pinv(Bᵀ) w, for every (input channel, output unit) pair at once; float64,
    # because pinv of a poorly conditioned B (downsampling) loses digits in float32.
    flat = kernel.astype(np.float64).reshape(old_h * old_w, channels * width)
    resized = np.linalg.pinv(resize.T) @ flat
    return resized.reshape(new_h, new_w, channels, width).astype(np.float32)


def resize_matrix(old_size, new_size):
    """B (new_h · new_w, old_h · old_w): a bilinear resize of row-major flattened patches.

    Bilinear as `tf.image.resize(method="bilinear")` (half-pixel centres, edges clamped, no
    antialiasing), the resize big_vision's `resample_patchemb` inverts.
    """
    return np.kron(_linear_resize_matrix(old_size[0], new_size[0]),
                   _linear_resize_matrix(old_size[1], new_size[1]))


def _linear_resize_matrix(old, new):
    """(new, old): 1-D linear resize with half-pixel centres, output i reading input
    (i + 0.5) · old / new - 0.5, clamped to the edge samples."""
    source = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0.0, old - 1)
    lower = np.floor(source).astype(int)
    upper = np.minimum(lower + 1, old - 1)
    fraction = source - lower
    matrix = np.zeros((new, old))
    np.add.at(matrix, (np.arange(new), lower), 1.0 - fraction)
    np.add.at(matrix, (np.arange(new), upper), fraction)
    return matrix


def _patch_sides(patch_size):
    sides = (patch_size, patch_size) if np.ndim(patch_size) == 0 else tuple(patch_size)
    if len(sides) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in sides):
        raise ValueError(f"new_patch_size must be a positive int or (height, width) of them, "
                         f"got {patch_size!r}.")
    return int(sides[0]), int(sides[1])
