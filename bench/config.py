"""The --variant flag of the benchmarks: a named ViT or a custom (tiny) shape."""

import keras_vit

_CUSTOM_KEYS = {
    "patch": "patch_size",
    "hidden": "hidden_size",
    "layers": "num_layers",
    "heads": "num_heads",
    "mlp": "mlp_dim",
}
CUSTOM_EXAMPLE = "custom:patch=8,hidden=32,layers=1,heads=2,mlp=64"


def parse_variant_flag(value):
    """Returns a `keras_vit.ViTConfig` for "B/16" (any keras_vit spelling) or a custom shape.

    A custom shape is written "custom:patch=P,hidden=D,layers=L,heads=H,mlp=M", all five keys.
    """
    if not value.startswith("custom:"):
        return keras_vit.parse_variant(value)
    fields = {}
    for item in filter(None, value[len("custom:"):].split(",")):
        key, separator, number = item.partition("=")
        if not separator or key not in _CUSTOM_KEYS or not number.isdigit():
            raise ValueError(
                f"--variant={value}: cannot read {item!r}. Expected key=integer with keys "
                f"{', '.join(_CUSTOM_KEYS)}, e.g. --variant={CUSTOM_EXAMPLE}."
            )
        fields[_CUSTOM_KEYS[key]] = int(number)
    missing = [key for key, field in _CUSTOM_KEYS.items() if field not in fields]
    if missing:
        raise ValueError(
            f"--variant={value} lacks {', '.join(missing)}; e.g. --variant={CUSTOM_EXAMPLE}."
        )
    return keras_vit.ViTConfig(**fields)
