"""The record format and the one eval preprocessing function."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import pipelines
from pipelines import records


def encode(pixels, fmt):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_example_round_trip_uses_model_garden_keys():
    data = encode(np.zeros((5, 7, 3), np.uint8), "PNG")
    serialized = records.encode_example(
        data, image_format="png", label=3, height=5, width=7, class_text="cat", filename="a/b.png")
    parsed = records.parse_example(tf.constant(serialized))
    assert parsed["image/encoded"].numpy() == data
    assert parsed["image/class/label"].numpy() == 3
    assert parsed["image/class/text"].numpy() == b"cat"
    assert parsed["image/format"].numpy() == b"png"
    assert (parsed["image/height"].numpy(), parsed["image/width"].numpy()) == (5, 7)
    assert parsed["image/filename"].numpy() == b"a/b.png"
    # Optional keys may be absent, as in other tools' shards.
    minimal = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
    })).SerializeToString()
    assert records.parse_example(tf.constant(minimal))["image/class/label"].numpy() == 1


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF", "JPEG"])
def test_preprocess_for_eval_decodes_formats(fmt):
    rng = np.random.default_rng(0)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3), np.uint8), 4, 0), 4, 1)
    image = pipelines.preprocess_for_eval(tf.constant(encode(pixels, fmt)), 16)
    assert image.shape == (16, 16, 3) and image.dtype == tf.float32
    if fmt in ("PNG", "BMP"):  # lossless, same size: bilinear resize is the identity
        np.testing.assert_array_equal(image.numpy(), pixels.astype(np.float32))


def test_preprocess_for_eval_grayscale_and_central_crop():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    image = pipelines.preprocess_for_eval(tf.constant(encode(gray, "PNG")), 4, central_crop_fraction=0.5)
    # Central half of the 8x8 image is rows/cols 2..5, resized 4 -> 4 unchanged, channels replicated.
    np.testing.assert_array_equal(image.numpy()[..., 0], gray[2:6, 2:6].astype(np.float32))
    np.testing.assert_array_equal(image.numpy()[..., 0], image.numpy()[..., 2])


def test_preprocess_for_eval_rejects_non_images_inside_map_fn():
    good = encode(np.zeros((3, 3, 3), np.uint8), "PNG")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(batch):
        return tf.map_fn(lambda b: pipelines.preprocess_for_eval(b, 8), batch,
                         fn_output_signature=tf.TensorSpec([8, 8, 3], tf.float32))

    assert serve(tf.constant([good, good])).shape == (2, 8, 8, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="input is not a decodable image"):
        serve(tf.constant([good, b"this is not an image"]))
