"""`from_checkpoint`: a ViT from any published checkpoint, by path or by registry name.

The format is recognised from the files' contents, never their names:

    a registry name            `keras_vit.pretrained` downloads (or finds) its files first
    folder, config.json with model_type "vit"         Hugging Face transformers (formats.huggingface)
    folder, config.json with "architecture"           a timm Hub folder (formats.timm)
    zip of named arrays, big_vision keys              big_vision .npz (formats.big_vision)
    zip of named arrays, otherwise                    Google's / keras_vit's .npz (checkpoints)
    safetensors of timm keys                          a bare timm file (formats.timm)
    a pickle (torch .bin/.pth)                        refused, with how to convert it

Every reader gives the arrays in the canonical layout (`keras_vit.checkpoints`) with the
options the arrays cannot say, and `checkpoints.build_model` builds and loads the model.
"""

import os

from keras_vit import checkpoints, pretrained
from keras_vit.checkpoints import CheckpointError, CheckpointNotFoundError
from keras_vit.formats import big_vision, common, huggingface, timm

# Reader arguments: what some formats cannot tell from their files.
_READER_ARGUMENTS = ("num_heads",)


def from_checkpoint(source, *, image_size=None, num_classes=None, allow_non_finite=False,
                    patch_size=None, **overrides):
    """Builds a ViT from a checkpoint of any supported layout and loads its weights.

    Args:
        source: a registry name (`keras_vit.pretrained.names()`, e.g. "augreg_B/16_i21k"), or
            the path of a Google or big_vision .npz, a timm Hub folder or bare .safetensors,
            or a Hugging Face ViT folder.
        image_size: input side in pixels (or (height, width)); None keeps the checkpoint's.
            Another size resamples the position-embedding grid bilinearly.
        num_classes: None keeps the checkpoint's head; another number attaches a new
            zero-initialised head (and drops pre-logits).
        allow_non_finite: load arrays holding NaN or Inf instead of refusing them.
        patch_size: None keeps the checkpoint's; another P' loads it at patch size P'
            (FlexiViT): the patch embedding resized by the pseudo-inverse of a bilinear
            resize (`keras_vit.resample_patch_embedding`), the position grid resampled to
            image_size / P'. With image_size = the checkpoint's size x P' / P (the same
            grid), the model computes on images upsampled by P' / P nearly what the
            checkpoint does on the originals (tests/test_flexi.py).
        **overrides: dropout_rate, attention_dropout_rate, stochastic_depth_rate,
            include_top, name, remat, dynamic_image_size (passed to `create_model`);
            num_heads, for a timm checkpoint whose architecture no config names;
            position_embedding_prefix, for the rare checkpoint whose position embedding's
            length does not say whether it covers the prefix tokens (the error says when).

    Returns:
        A `keras.Model` taking float32 RGB in [0, 255] (the checkpoint's input normalisation
        is inside it), with the checkpoint's weights.

    Raises:
        CheckpointNotFoundError: `source` is neither a file, a folder nor a registry name.
        CheckpointError: the files are unreadable, of no known layout, a pickle, or do not
            fit a ViT (each missing or mis-shaped key named).
    """
    reader_arguments = {k: overrides.pop(k) for k in _READER_ARGUMENTS if k in overrides}
    checkpoints._check_overrides("from_checkpoint", overrides)
    converted = read_checkpoint(source, image_size=image_size, **reader_arguments)
    return checkpoints.build_model(
        converted.arrays, converted.source, options=converted.options, image_size=image_size,
        num_classes=num_classes, allow_non_finite=allow_non_finite, patch_size=patch_size,
        **overrides)


def read_checkpoint(source, *, image_size=None, num_heads=None):
    """Reads `source` (as `from_checkpoint` takes it) into a `formats.common.ConvertedCheckpoint`.

    `image_size` is needed only by a big_vision model with fixed sin-cos position embeddings,
    which are computed for the grid; `num_heads` only by a timm checkpoint whose architecture
    no config names.
    """
    path = local_path(source)
    if os.path.isdir(path):
        return _read_folder(path, num_heads)
    if common.is_pickle(path):
        common.refuse_pickle(path)
    if common.is_safetensors(path):
        return timm.read_timm(path, num_heads=num_heads)
    with open(path, "rb") as file:
        is_zip = file.read(4) == common.ZIP_MAGIC
    if not is_zip:
        raise CheckpointError(
            f"{path} is of no checkpoint format keras_vit reads: expected an .npz (Google, "
            "big_vision, keras_vit), a .safetensors file, or a timm or Hugging Face folder "
            "(config.json + model.safetensors).")
    return _read_npz(path, image_size)


def local_path(source):
    """The file or folder of `source`: itself when it exists, else a registry name's download."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if _looks_like_a_path(source):
        raise CheckpointNotFoundError(f"Checkpoint file {source} does not exist.")
    try:
        return pretrained.resolve(source)
    except pretrained.UnknownNameError as error:
        raise CheckpointNotFoundError(
            f"{source} is neither a file, a folder, nor a registry name: {error}") from error


def _looks_like_a_path(source):
    """Whether `source` is meant as a path (registry names hold "/" too, but no extension and
    never start at a root or a dot)."""
    return (source.startswith((os.sep, ".", "~"))
            or os.path.splitext(source)[1].lower() in _FILE_EXTENSIONS)


_FILE_EXTENSIONS = (".npz", ".safetensors", ".bin", ".pth", ".pt", ".json", ".keras", ".h5")


def _read_folder(path, num_heads):
    if huggingface.is_huggingface_folder(path):
        return huggingface.read_huggingface(path)
    if timm.is_timm_folder(path):
        return timm.read_timm(path, num_heads=num_heads)
    raise CheckpointError(
        f"{path} is a folder of no checkpoint layout keras_vit reads: expected a timm Hub "
        "folder (config.json with \"architecture\" + model.safetensors) or a Hugging Face ViT "
        "folder (config.json with model_type \"vit\" + model.safetensors). A training model "
        "directory (model.keras) opens with keras_vit.load_classifier.")


def _read_npz(path, image_size):
    arrays = checkpoints.load_npz(path)
    if big_vision.is_big_vision(arrays):
        return big_vision.convert_big_vision(arrays, path, image_size=image_size)
    arrays, options = checkpoints.canonical_arrays(arrays, path)
    return common.ConvertedCheckpoint(arrays, options, path, "google")
