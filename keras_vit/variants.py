"""The ViT model sizes of the paper (Table 1), the names they go by, and the other choices of
the architecture that are checked before anything is built: pooling and image size.

A variant is "SIZE/PATCH" ("B/16"); "ViT-B/16" and "b16" mean the same. This is the only place
that knows the table, as big_vision's `decode_variant` is there.
"""

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of a Vision Transformer encoder.

    Attributes:
        patch_size: side P of the square patches, in pixels.
        hidden_size: width D of every token.
        num_layers: number of encoder blocks L.
        num_heads: attention heads per block; must divide `hidden_size`.
        mlp_dim: hidden width of the MLP in each block.
    """

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"ViTConfig.{field.name} must be a positive integer, got {value!r}."
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})."
            )


# Table 1 of the paper, plus Ti and S of "How to train your ViT" (Steiner et al. 2021).
# name: (hidden_size, num_layers, num_heads, mlp_dim)
SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

# The patch sizes with published checkpoints; any other patch size is a custom ViTConfig.
VARIANTS = ("Ti/16", "S/16", "S/32", "B/8", "B/16", "B/32", "L/16", "L/32", "H/14")

# How the encoder output becomes one vector per image: "token", the class token's output
# (Eq. 4); "gap", global average pooling of the patch tokens (prefix tokens excluded); "map",
# multihead attention pooling (big_vision's MAP head).
POOLINGS = ("token", "gap", "map")

_VARIANT_PATTERN = re.compile(r"^(?:vit[-_]?)?(ti|s|b|l|h)[/_-]?(\d+)$", re.IGNORECASE)
# A custom size written as short_name writes it: d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch>.
_CUSTOM_PATTERN = re.compile(r"^d(\d+)_l(\d+)_h(\d+)_m(\d+)_p(\d+)$")


def parse_variant(variant):
    """Returns the ViTConfig for "B/16", "ViT-B/16", "b16", a custom "d64_l4_h4_m128_p4"
    (hidden, layers, heads, MLP, patch) or a ViTConfig (returned as is)."""
    if isinstance(variant, ViTConfig):
        return variant
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a string such as 'B/16' or a ViTConfig, got {variant!r}.")
    custom = _CUSTOM_PATTERN.match(variant.strip())
    if custom:
        hidden_size, num_layers, num_heads, mlp_dim, patch_size = (int(v) for v in custom.groups())
        return ViTConfig(patch_size, hidden_size, num_layers, num_heads, mlp_dim)
    match = _VARIANT_PATTERN.match(variant.strip())
    canonical = None
    if match:
        size = {"ti": "Ti"}.get(match.group(1).lower(), match.group(1).upper())
        canonical = f"{size}/{int(match.group(2))}"
    if canonical not in VARIANTS:
        raise ValueError(
            f"Unknown ViT variant {variant!r}. Expected one of {', '.join(VARIANTS)} "
            "(also written 'ViT-B/16' or 'b16'); for a custom size d<hidden>_l<layers>_h<heads>"
            "_m<mlp>_p<patch> (e.g. d64_l4_h4_m128_p4) or a keras_vit.ViTConfig."
        )
    size, patch = canonical.split("/")
    hidden_size, num_layers, num_heads, mlp_dim = SIZES[size]
    return ViTConfig(int(patch), hidden_size, num_layers, num_heads, mlp_dim)


def short_name(config):
    """"b16" for the B/16 config; "d192_l4_h3_m768_p4" for a custom one. Used in model names."""
    dims = (config.hidden_size, config.num_layers, config.num_heads, config.mlp_dim)
    for size, size_dims in SIZES.items():
        if size_dims == dims:
            return f"{size.lower()}{config.patch_size}"
    return (
        f"d{config.hidden_size}_l{config.num_layers}_h{config.num_heads}"
        f"_m{config.mlp_dim}_p{config.patch_size}"
    )


def check_pooling(pooling):
    """Raises ValueError unless `pooling` is one of `POOLINGS`."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


def image_shape(image_size, patch_size):
    """The (height, width) in pixels of `image_size`, checked against the patch size.

    Args:
        image_size: side of a square image in pixels, or (height, width).
        patch_size: side P of the square patches in pixels.

    Returns:
        (height, width), both multiples of `patch_size`; the patch grid is
        (height / P, width / P).

    Raises:
        ValueError: a side is not a multiple of `patch_size`.
    """
    if isinstance(image_size, int):
        height, width = image_size, image_size
    else:
        height, width = (int(side) for side in image_size)
    for side in (height, width):
        if side % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the patch size "
                f"{patch_size}; choose e.g. {patch_size * (side // patch_size)}."
            )
    return height, width
