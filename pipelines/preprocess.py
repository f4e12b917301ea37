"""Image decoding and the one evaluation preprocessing function.

`preprocess_for_eval` is used by the eval input pipeline and by the serving signature, so the
model sees the same pixels at evaluation and in production. Everything here is pure TF ops.

With a cap on the pixels (`max_image_pixels`, set by the serving export), the image's size is
read from its header (`header_size`) before anything is decoded, so a small file that claims a
huge image is refused without allocating it; a JPEG whose scans are missing is refused too
(`check_jpeg_scan_data`), since libjpeg would otherwise decode it as a gray image.
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.errors import UserError

# First bytes of each format `tf.io.decode_image` understands.
_MAGIC = {
    "jpeg": b"\xff\xd8\xff",
    "png": b"\x89PNG\r\n\x1a\n",
    "gif": b"GIF8",
    "bmp": b"BM",
}

NOT_AN_IMAGE = "input is not a decodable image"
IMAGE_TOO_LARGE = "image too large"
MISSING_SCAN_DATA = "JPEG without image data"

# Bytes of the header `header_size` reads: PNG's IHDR ends at 24, BMP's height at 26.
_HEADER_BYTES = 32
_JPEG_SOS = 0xDA
# Markers without a length field (TEM, RST0-7, SOI): the walk to the scan steps over 2 bytes.
_JPEG_STANDALONE_MARKERS = (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)
# A JPEG has a few dozen header segments; more is not an image a camera or library wrote.
_JPEG_MAX_SEGMENTS = 1024


def sniff_format(data: bytes) -> str | None:
    """Python: the image format of encoded bytes from their magic number, or None."""
    for name, magic in _MAGIC.items():
        if data.startswith(magic):
            return name
    return None


def is_decodable_format(image_bytes: tf.Tensor) -> tf.Tensor:
    """Scalar bool tensor: do the bytes start with a JPEG, PNG, GIF or BMP signature?"""
    checks = [
        tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic) for magic in _MAGIC.values()
    ]
    return tf.reduce_any(tf.stack(checks))


def check_decodable(image_bytes: tf.Tensor, context: tf.Tensor | str = "") -> tf.Tensor:
    """Asserts that encoded bytes look like an image (by their magic number).

    Args:
        image_bytes: scalar string tensor.
        context: string included in the error message (e.g. the shard file).

    Returns:
        `image_bytes`, with the assertion as a control dependency.

    Raises:
        tf.errors.InvalidArgumentError: (when run) a message that starts with "input is not a
            decodable image" and names `context` and the first bytes.
    """
    ok = is_decodable_format(image_bytes)
    assertion = tf.debugging.Assert(
        ok,
        [
            f"{NOT_AN_IMAGE}: expected JPEG, PNG, GIF or BMP bytes; source:",
            context,
            "first bytes:",
            tf.strings.substr(image_bytes, 0, 8),
        ],
    )
    with tf.control_dependencies([assertion]):
        return tf.identity(image_bytes)


def _header_uint8(image_bytes: tf.Tensor) -> tf.Tensor:
    """int64 `(_HEADER_BYTES,)`: the first bytes, zero-padded when the input is shorter."""
    head = tf.strings.substr(image_bytes, 0, _HEADER_BYTES)
    head = tf.strings.substr(head + b"\0" * _HEADER_BYTES, 0, _HEADER_BYTES)
    return tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _integer(head: tf.Tensor, start: int, size: int, big_endian: bool) -> tf.Tensor:
    """The unsigned integer in `head[start:start + size]`, as an int64 scalar."""
    order = range(size) if big_endian else reversed(range(size))
    value = tf.constant(0, tf.int64)
    for index in order:
        value = value * 256 + head[start + index]
    return value


def _bmp_size(head: tf.Tensor) -> tf.Tensor:
    # BITMAPINFOHEADER: signed little-endian width at 18, height at 22 (negative: top-down),
    # the fields TensorFlow's BMP decoder reads.
    def magnitude(value):
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    return tf.stack([magnitude(_integer(head, 22, 4, False)),
                     magnitude(_integer(head, 18, 4, False))])


def header_size(image_bytes: tf.Tensor) -> tf.Tensor:
    """int64 `(2,)` (height, width) that the image's header declares, without decoding it.

    JPEG: `tf.image.extract_jpeg_shape` (the frame header); PNG: IHDR, big-endian width at byte
    16 and height at 20; GIF: the logical screen, little-endian width at 6 and height at 8 (the
    size TensorFlow's GIF decoder allocates); BMP: signed little-endian width at 18 and height
    at 22. (0, 0) for other bytes, which `check_decodable` refuses.
    """
    head = _header_uint8(image_bytes)
    branches = [
        (_starts_with(image_bytes, "jpeg"),
         lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)),
        (_starts_with(image_bytes, "png"),
         lambda: tf.stack([_integer(head, 20, 4, True), _integer(head, 16, 4, True)])),
        (_starts_with(image_bytes, "gif"),
         lambda: tf.stack([_integer(head, 8, 2, False), _integer(head, 6, 2, False)])),
        (_starts_with(image_bytes, "bmp"), lambda: _bmp_size(head)),
    ]
    return tf.case(branches, default=lambda: tf.zeros([2], tf.int64), exclusive=False)


def _starts_with(image_bytes: tf.Tensor, image_format: str) -> tf.Tensor:
    magic = _MAGIC[image_format]
    return tf.equal(tf.strings.substr(image_bytes, 0, len(magic)), magic)


def _height_x_width(size: tf.Tensor) -> tf.Tensor:
    return tf.strings.format("{} x {}", (size[0], size[1]))


def check_image_size(
    image_bytes: tf.Tensor, max_image_pixels: int | None, context: tf.Tensor | str = ""
) -> tf.Tensor:
    """Asserts that the header's height x width is at most `max_image_pixels` (None: no cap).

    Returns:
        `image_bytes`, with the assertion as a control dependency.

    Raises:
        UserError: `max_image_pixels` is not a positive integer.
        tf.errors.InvalidArgumentError: (when run) "image too large: ..." naming `context`.
    """
    if max_image_pixels is None:
        return image_bytes
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or (
            max_image_pixels < 1):
        raise UserError(
            f"max_image_pixels must be a positive integer or None (no cap), got "
            f"{max_image_pixels!r}.")
    size = header_size(image_bytes)
    # float64: a forged header's 2^32 x 2^32 would overflow int64.
    pixels = tf.reduce_prod(tf.cast(size, tf.float64))
    assertion = tf.debugging.Assert(
        pixels <= float(max_image_pixels),
        [f"{IMAGE_TOO_LARGE}: the header declares height x width", _height_x_width(size),
         f"pixels, more than the {max_image_pixels} allowed (max_image_pixels); source:",
         context, "Send a smaller image, or export with a larger --max_image_pixels."],
    )
    with tf.control_dependencies([assertion]):
        return tf.identity(image_bytes)


def _jpeg_scan_start(image_bytes: tf.Tensor) -> tf.Tensor:
    """int32: offset of the first byte after the first scan header (SOS segment), -1 if none.

    Walks the marker segments from the SOI: each is 0xFF, a marker byte and (except the
    standalone markers) a big-endian length that counts itself.
    """
    length = tf.strings.length(image_bytes, unit="BYTE")

    def step(position, found):
        segment = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, position, 4), tf.uint8),
                          tf.int32)
        marker = segment[1]
        is_marker = tf.equal(segment[0], 0xFF)
        standalone = tf.reduce_any(tf.equal(marker, _JPEG_STANDALONE_MARKERS))
        advance = tf.where(
            tf.equal(marker, 0xFF), 1,  # a fill byte before the marker
            tf.where(standalone, 2, 2 + segment[2] * 256 + segment[3]))
        # Not a marker where one must be: stop; the decoder reports the corrupt header.
        position = tf.where(is_marker, position + advance, length)
        return position, tf.logical_and(is_marker, tf.equal(marker, _JPEG_SOS))

    position, found = tf.while_loop(
        lambda position, found: tf.logical_and(tf.logical_not(found), position + 4 <= length),
        step, (tf.constant(2), tf.constant(False)), maximum_iterations=_JPEG_MAX_SEGMENTS)
    return tf.where(found, position, -1)


def check_jpeg_scan_data(image_bytes: tf.Tensor, context: tf.Tensor | str = "") -> tf.Tensor:
    """Asserts that a JPEG carries entropy-coded data for the pixels its header declares.

    libjpeg decodes headers followed by only an end-of-image marker as a gray image (TensorFlow
    accepts it). The rule: after the first scan header there must be at least 1 bit per 8x8
    block of the image, the least a Huffman-coded scan can spend on a block (its DC code); the
    final 2-byte end-of-image marker does not count. Arithmetic-coded JPEGs of flat images may
    fall below it. Other formats pass unchanged (their decoders refuse missing data).

    Returns:
        `image_bytes`, with the assertion as a control dependency.
    """
    def enough_data():
        size = tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)
        blocks = ((size[0] + 7) // 8) * ((size[1] + 7) // 8)
        start = tf.cast(_jpeg_scan_start(image_bytes), tf.int64)
        data_bytes = tf.cast(tf.strings.length(image_bytes, unit="BYTE"), tf.int64) - start - 2
        # Without a scan header the decoder itself refuses the bytes.
        return tf.logical_or(start < 0, data_bytes * 8 >= blocks), size

    ok, size = tf.cond(tf.io.is_jpeg(image_bytes), enough_data,
                       lambda: (tf.constant(True), tf.zeros([2], tf.int64)))
    assertion = tf.debugging.Assert(
        ok,
        [f"{MISSING_SCAN_DATA}: the header declares height x width", _height_x_width(size),
         "but less than 1 bit per 8x8 block of scan data follows (a header without its image "
         "data); source:", context],
    )
    with tf.control_dependencies([assertion]):
        return tf.identity(image_bytes)


def decode_rgb(
    image_bytes: tf.Tensor,
    context: tf.Tensor | str = "",
    *,
    max_image_pixels: int | None = None,
) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 `(height, width, 3)`; grayscale is replicated.

    Before decoding, the magic number is checked (`check_decodable`). With a cap
    (`max_image_pixels`, for untrusted input such as serving requests), so are the header's
    size (`check_image_size`) and a JPEG's scan data (`check_jpeg_scan_data`), so that a
    refused image is never allocated. Without one (the training and eval pipelines, whose data
    is the user's own) neither runs: the JPEG segment walk would slow their decoding (measured in
    docs/serving.md).
    """
    image_bytes = check_decodable(image_bytes, context)
    if max_image_pixels is not None:
        image_bytes = check_image_size(image_bytes, max_image_pixels, context)
        image_bytes = check_jpeg_scan_data(image_bytes, context)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize of `(h, w, 3)` to float32 `(image_size, image_size, 3)` in [0, 255]."""
    # Bilinear weights are a convex combination, so uint8 input stays within [0, 255].
    # Casting first gives bit-identical output, and TF's float kernel is faster than its uint8
    # one (see docs/data.md, 'Benchmark').
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bilinear")
    image.set_shape([image_size, image_size, 3])
    return image


def decode_for_eval(
    image_bytes: tf.Tensor,
    central_crop_fraction: float | None = None,
    *,
    context: tf.Tensor | str = "",
    max_image_pixels: int | None = None,
) -> tf.Tensor:
    """The decoding half of `preprocess_for_eval`: uint8 `(height, width, 3)` before the resize.

    The input pipeline runs it before skipping bad records, and `resize` after (fused with the
    batching); `preprocess_for_eval(b, s, f)` is exactly `resize(decode_for_eval(b, f), s)`.

    Args:
        image_bytes: scalar string tensor of encoded image bytes.
        central_crop_fraction: None for the whole image, else a fraction in (0, 1].
        context: optional string (e.g. a file name) included in error messages.
        max_image_pixels: refuse images whose header declares more pixels, and JPEGs without
            their scan data (see `decode_rgb`); None (the default, as in the training and eval
            pipelines): no cap.

    Raises:
        UserError: `central_crop_fraction` is outside (0, 1], or `max_image_pixels` is not
            a positive integer.
    """
    image = decode_rgb(image_bytes, context, max_image_pixels=max_image_pixels)
    if central_crop_fraction is not None:
        if not 0.0 < central_crop_fraction <= 1.0:
            raise UserError(
                f"central_crop_fraction must be in (0, 1], got {central_crop_fraction}."
            )
        image = tf.image.central_crop(image, central_crop_fraction)
    return image


def preprocess_for_eval(
    image_bytes: tf.Tensor,
    image_size: int,
    central_crop_fraction: float | None = None,
    *,
    context: tf.Tensor | str = "",
    max_image_pixels: int | None = None,
) -> tf.Tensor:
    """THE evaluation preprocessing: encoded image -> float32 `(image_size, image_size, 3)` in [0, 255].

    Decodes any JPEG/PNG/GIF/BMP (first frame of a GIF, grayscale replicated to RGB), optionally
    keeps the central `central_crop_fraction` of each side (e.g. 0.875), then resizes bilinearly
    to a square (the aspect ratio is not kept, as in the ViT paper's fine-tuning evaluation).

    Pure TF ops: usable in `tf.data`, `tf.function` and, via `tf.map_fn`, a serving signature.

    Args:
        image_bytes: scalar string tensor of encoded image bytes.
        image_size: output side in pixels.
        central_crop_fraction: None for the whole image, else a fraction in (0, 1].
        context: optional string (e.g. a file name) included in error messages.
        max_image_pixels: refuse images whose header declares more pixels, and JPEGs without
            their scan data, before decoding them; None (default): neither. The serving export
            sets one.

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: (when run) "input is not a decodable image ..." for bytes
            that are not JPEG/PNG/GIF/BMP; "image too large ..." beyond `max_image_pixels`;
            "JPEG without image data ..." for a JPEG header without its scans.
        UserError: `central_crop_fraction` is outside (0, 1], or `max_image_pixels` is not a
            positive integer.
    """
    image = decode_for_eval(
        image_bytes, central_crop_fraction, context=context, max_image_pixels=max_image_pixels)
    return resize(image, image_size)
