"""Shared pieces of the export and serving tests: encoded test images and a tiny classifier."""

import io

import numpy as np
from PIL import Image

import keras_vit
from vit_reference import random_checkpoint


def encode_image(array, image_format):
    """uint8 (height, width, 3) pixels as the bytes of a JPEG, PNG, GIF (palette) or BMP file."""
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if image_format == "GIF":
        image = image.convert("P")
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def tiny_classifier(directory):
    """A 16x16, 5-class ViT (patch 4, hidden 32, 2 layers) with random, non-zero head weights,
    loaded from an .npz written into `directory`."""
    arrays = random_checkpoint(4, 32, 2, 4, 64, grid=4, num_classes=5, seed=1)
    path = str(directory / "tiny.npz")
    np.savez(path, **arrays)
    return keras_vit.from_npz(path)
