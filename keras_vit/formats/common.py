"""What every checkpoint reader returns, and the file reading they share.

The canonical layout is keras_vit's own .npz layout (`keras_vit.checkpoints`): Google's
google-research/vision_transformer keys, extended with `dist`, `reg`, LayerScale, `fc_norm`,
the MAP head and `head_dist` (docs/checkpoints.md lists them).
"""

import dataclasses
import json
import os

import numpy as np

from keras_vit.checkpoints import CheckpointError, CheckpointNotFoundError
from keras_vit.files import write_atomically

# The first bytes of the files a checkpoint reader may meet: a zip archive (.npz, and also
# torch's zip-pickle .pth/.bin), and a bare pickle (protocol 2-5, old torch files).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_BYTE = 0x80


@dataclasses.dataclass
class ConvertedCheckpoint:
    """A checkpoint read into the canonical layout.

    Attributes:
        arrays: {canonical key: float32 NumPy array}.
        options: `create_model` keywords the arrays cannot say (GELU form, LayerNorm
            epsilon, input mean and std on [0, 1] pixels, eval crop fraction, whether the
            position embedding covers the prefix tokens, pooling, the training image size).
        source: the file or folder read, for messages.
        format: the layout it was read from, e.g. "big_vision", "timm", "huggingface".
        class_names: the class names the checkpoint carries, or None.
    """

    arrays: dict
    options: dict
    source: str
    format: str
    class_names: list | None = None


def refuse_pickle(path):
    """Raises a CheckpointError for a PyTorch pickle (.bin/.pth): loading one runs code."""
    raise CheckpointError(
        f"{path} is a PyTorch pickle (torch.save), which keras_vit never opens: unpickling runs "
        "arbitrary code. Convert it once, where PyTorch is installed, to safetensors: "
        "`python -c \"import torch, safetensors.torch as s; "
        f"s.save_file(torch.load('{os.path.basename(path)}', map_location='cpu', "
        "weights_only=True), 'model.safetensors')\"`, or download the model.safetensors the "
        "Hub publishes beside it."
    )


def is_pickle(path):
    """Whether `path` starts like a pickle or a torch zip-pickle (holds a data.pkl member)."""
    with open(path, "rb") as file:
        head = file.read(4)
    if head[:1] and head[0] == PICKLE_PROTOCOL_BYTE:
        return True
    if head == ZIP_MAGIC:
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def read_json(path):
    """The JSON object in `path`, with errors naming the file."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist.")
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}).") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, expected an object.")
    return value


def is_safetensors(path):
    """Whether `path` starts as a safetensors file: a little-endian u64 length, then '{'."""
    with open(path, "rb") as file:
        head = file.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_safetensors(path):
    """Every tensor of a .safetensors file as a NumPy array, with errors naming the file.

    Read with the safetensors package's NumPy API: no torch. bfloat16 tensors come back as
    `ml_dtypes.bfloat16` arrays (cast them with `checkpoints.as_float32`).

    Returns:
        ({name: array}, metadata dict or {}).
    """
    from safetensors import SafetensorError, safe_open  # A required dependency (setup.cfg).

    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist.")
    try:
        with safe_open(path, framework="numpy") as file:
            arrays = {key: file.get_tensor(key) for key in file.keys()}
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({error}); check that the download "
            "is complete."
        ) from error
    return arrays, metadata


def write_safetensors(arrays, path, metadata=None):
    """Writes {name: array} to `path` atomically (temporary name, then rename)."""
    from safetensors.numpy import save_file

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return write_atomically(
        path, lambda temporary: save_file(contiguous, temporary, metadata=metadata))

