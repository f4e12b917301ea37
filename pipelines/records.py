"""The TFRecord record format: one `tf.train.Example` per image.

This module is the one place that knows the feature key names. They are the keys of the
TF Model Garden's ImageNet TFRecords, so shards written by its converters can be read unchanged:

| key                 | type   | meaning                                                      |
|---------------------|--------|--------------------------------------------------------------|
| `image/encoded`     | bytes  | the encoded image, JPEG stored as-is or lossless PNG         |
| `image/format`      | bytes  | `"jpeg"` or `"png"` (informational; decoding sniffs bytes)   |
| `image/class/label` | int64  | class index, `label_offset`-based (0 here, 1 in Model Garden)|
| `image/class/text`  | bytes  | class name (optional)                                        |
| `image/height`      | int64  | pixels                                                       |
| `image/width`       | int64  | pixels                                                       |
| `image/filename`    | bytes  | where the image came from (optional)                         |
"""

from __future__ import annotations

import tensorflow as tf

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
LABEL = "image/class/label"
CLASS_TEXT = "image/class/text"
HEIGHT = "image/height"
WIDTH = "image/width"
FILENAME = "image/filename"

#: What `parse_example` reads. Optional keys default to empty / -1 so shards without them parse.
FEATURE_SPEC = {
    IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=""),
    CLASS_TEXT: tf.io.FixedLenFeature([], tf.string, default_value=""),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
}


#: What the input pipeline needs: parsing only these is measurably cheaper per record.
IMAGE_AND_LABEL_SPEC = {key: FEATURE_SPEC[key] for key in (IMAGE_ENCODED, LABEL)}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def encode_example(
    image_bytes: bytes,
    *,
    image_format: str,
    label: int,
    height: int,
    width: int,
    class_text: str | None = None,
    filename: str | None = None,
) -> bytes:
    """Serializes one image as a `tf.train.Example`.

    Args:
        image_bytes: the encoded image (JPEG or PNG bytes), stored unchanged.
        image_format: `"jpeg"` or `"png"`.
        label: the class index as stored (already including any label offset).
        height, width: image size in pixels.
        class_text: optional class name.
        filename: optional origin of the image (relative path, archive member...); a file name
            that was not valid UTF-8 (surrogate escapes, as `os` gives it) keeps its bytes.

    Returns:
        The serialized proto. Serialization is deterministic (map keys sorted), so the same
        input always gives the same bytes.
    """
    feature = {
        IMAGE_ENCODED: _bytes(image_bytes),
        IMAGE_FORMAT: _bytes(image_format.encode()),
        LABEL: _int64(label),
        HEIGHT: _int64(height),
        WIDTH: _int64(width),
    }
    if class_text is not None:
        feature[CLASS_TEXT] = _bytes(class_text.encode())
    if filename is not None:
        feature[FILENAME] = _bytes(filename.encode("utf-8", "surrogateescape"))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialized Example (scalar string tensor) into a dict of scalar tensors."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def decode_example_py(serialized: bytes) -> dict:
    """Parses one serialized Example in Python (for tools and tests): key -> bytes or int."""
    example = tf.train.Example.FromString(serialized)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value)
        out[key] = values[0] if len(values) == 1 else values
    return out


def parse_image_and_label(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Parses `(image/encoded string scalar, image/class/label int64 scalar)` of one Example."""
    features = tf.io.parse_single_example(serialized, IMAGE_AND_LABEL_SPEC)
    return features[IMAGE_ENCODED], features[LABEL]
