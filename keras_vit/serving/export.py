"""Exports a classifier as a TensorFlow Serving SavedModel: versioned, atomic, four signatures.

    EXPORT_DIR/
      1/                        one immutable version per export (TF Serving serves the highest)
        saved_model.pb
        variables/              each weight stored once (float32, or bfloat16: `precision`)
        assets/class_names.txt  one class name per line, index = class
        assets.extra/tf_serving_warmup_requests   TF Serving's warmup requests (`warmup`)
      2/ ...

Signatures (batch dimension dynamic, -1 in `saved_model_cli`):

    serving_default       image_bytes: string (batch,)  JPEG/PNG/GIF/BMP of any size, decoded
                          and resized in the graph by `pipelines.preprocess_for_eval`, the
                          evaluation preprocessing itself
    predict_pixels        images: float32 (batch, size, size, 3), RGB in [0, 255]
    predict_tf_example    tf_examples: string (batch,) serialized tf.train.Example, the image's
                          bytes under `pipelines.records.IMAGE_ENCODED` (`image/encoded`, as in
                          the training records and TF Model Garden's export); then as
                          serving_default
    predict_image_tensor  image_tensor: uint8 (batch, height, width, 3), any height and width;
                          cropped and resized in the graph as serving_default does after decoding

    all return            probabilities  float32 (batch, num_classes)  softmax of the logits
                          classes        int32   (batch, top_k)        best first
                          scores         float32 (batch, top_k)        their probabilities
                          labels         string  (batch, top_k)        their class names

Every request is validated in the graph before any kernel that could abort the process (a
mis-ranked tensor reaching Conv2D fails a CHECK in TensorFlow and kills the server): TF Serving
feeds the signature's tensors to the session without checking them against the signature's
shape. A bad request fails with INVALID_ARGUMENT naming the input; see docs/serving.md.

Built with `keras.export.ExportArchive`, without `track(model)`: the archive then tracks the
variables its endpoints use, once. Tracking the model as well makes Keras 3.15 write every
variable twice (keras-team/keras#23553), doubling the SavedModel.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import tempfile
import time

import keras
import tensorflow as tf
from absl import logging

import pipelines
from keras_vit.class_names import fallback_class_names
from keras_vit.inference import eval_crop_fraction
from keras_vit.serving import precision as precision_lib
from keras_vit.serving import warmup
from keras_vit.serving.signatures import (
    BYTES_INPUT,
    CLASS_NAMES_ASSET,
    IMAGE_TENSOR_INPUT,
    IMAGE_TENSOR_SIGNATURE,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    TF_EXAMPLE_INPUT,
    TF_EXAMPLE_SIGNATURE,
)
from pipelines import preprocess, records
from pipelines.errors import UserError

# Variables may exceed the weights by the checkpoint index (names, shapes, checksums): 10% plus
# a fixed allowance that only matters for toy models. A duplicated export is 2x.
MAX_VARIABLE_OVERHEAD = 1.1
_INDEX_ALLOWANCE_BYTES = 16 * 1024
_TEMP_PREFIX = ".tmp-export-"
# A temporary export directory nothing has written to for this long belongs to a dead export.
STALE_EXPORT_SECONDS = 3600
# Default cap on the pixels serving_default decodes: above the photos cameras write by default;
# docs/serving.md gives the sizes and the memory an image at the cap costs.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ExportError(UserError):
    """The model, class names or export directory do not allow the export asked for."""


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """What `export_classifier` wrote."""

    path: str  # EXPORT_DIR/<version>
    version: int
    image_size: int
    num_classes: int
    top_k: int
    weight_bytes: int  # the model's weights in memory
    variables_bytes: int  # the SavedModel's variables/ directory on disk
    max_image_pixels: int | None = None  # serving_default's cap on decoded pixels (None: none)
    precision: str = "float32"  # of the stored weights and the compute: float32 or bfloat16
    warmup_requests: int = 0  # records in assets.extra/tf_serving_warmup_requests (0: no file)


def existing_versions(export_dir: str) -> list[int]:
    """The integer version directories under `export_dir`, ascending ([] if it does not exist)."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(
        int(name) for name in os.listdir(export_dir)
        if re.fullmatch(r"\d+", name) and os.path.isdir(os.path.join(export_dir, name))
    )


def next_version(export_dir: str) -> int:
    """One more than the highest version in `export_dir`, 1 for a new one.

    TF Serving serves the highest version by default, so a new export must sort last.
    """
    versions = existing_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def weight_bytes(model: keras.Model) -> int:
    """Bytes of the model's weights (each variable once)."""
    unique = {id(variable): variable for variable in model.weights}
    return sum(
        int(variable.numpy().nbytes) for variable in unique.values()
    )


def variables_bytes(saved_model_dir: str) -> int:
    """Bytes of a SavedModel's `variables/` directory (data shards and index)."""
    directory = os.path.join(saved_model_dir, "variables")
    return sum(
        os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
    )


def _square_image_size(model: keras.Model) -> int:
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1] is None or shape[1] != shape[2]:
        raise ExportError(
            f"Expected a model taking square RGB images (batch, size, size, 3); {model.name} "
            f"takes {shape}. The serving signature resizes to a square, as the eval pipeline does."
        )
    return int(shape[1])


def _check_class_names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return fallback_class_names(num_classes)
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ExportError(
            f"{len(class_names)} class names for a model with {num_classes} outputs; pass one name "
            "per output (or none for the labels class_0, class_1, ...)."
        )
    for index, name in enumerate(class_names):
        if not name or "\n" in name or "\r" in name:
            raise ExportError(
                f"Class name {index} is {name!r}: names are stored one per line in "
                f"{CLASS_NAMES_ASSET}, so each must be non-empty and on one line."
            )
    return class_names


def _label_table(class_names_path: str) -> tf.lookup.StaticHashTable:
    """class index (int64) -> class name, read from `class_names_path` (saved as an asset)."""
    initializer = tf.lookup.TextFileInitializer(
        class_names_path,
        key_dtype=tf.int64,
        key_index=tf.lookup.TextFileIndex.LINE_NUMBER,
        value_dtype=tf.string,
        value_index=tf.lookup.TextFileIndex.WHOLE_LINE,
    )
    return tf.lookup.StaticHashTable(initializer, default_value="")


def build_archive(
    model: keras.Model,
    class_names_path: str,
    *,
    top_k: int,
    central_crop_fraction: float | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> keras.export.ExportArchive:
    """An `ExportArchive` holding `model` behind the four serving signatures.

    Args:
        model: a classifier taking float32 (batch, size, size, 3) images in [0, 255] and
            returning logits (batch, num_classes), as `keras_vit.create_model` builds.
        class_names_path: text file with one class name per line; becomes the SavedModel asset
            the `labels` output reads.
        top_k: number of best classes in `classes`, `scores` and `labels`, at most num_classes.
        central_crop_fraction: passed to `pipelines.preprocess_for_eval`; must match the
            evaluation pipeline the model was measured with. None: the fraction recorded with
            the model's checkpoint (timm's crop_pct), else the whole image.
        max_image_pixels: `serving_default` and `predict_tf_example` refuse an image whose
            header declares more pixels (height x width), before decoding it, and
            `predict_image_tensor` an image tensor of more; None: no cap.
    """
    image_size = _square_image_size(model)
    central_crop_fraction = eval_crop_fraction(model, central_crop_fraction)
    table = _label_table(class_names_path)
    classify = _classifier(model, table, image_size, top_k)
    decode = _decoder(image_size, central_crop_fraction, max_image_pixels)

    def serve_image_bytes(image_bytes):
        image_bytes = _checked_rank(image_bytes, 1, f"{SERVING_SIGNATURE}: input `{BYTES_INPUT}` "
                                    "must be a string vector (batch,) of encoded images")
        return classify(decode(image_bytes, BYTES_INPUT))

    def serve_pixels(images):
        return classify(_checked_pixels(images, image_size))

    def serve_tf_examples(tf_examples):
        return classify(decode(_parsed_image_bytes(tf_examples), TF_EXAMPLE_INPUT))

    def serve_image_tensor(image_tensor):
        image_tensor = _checked_image_tensor(image_tensor, max_image_pixels)
        return classify(_cropped_and_resized(image_tensor, image_size, central_crop_fraction))

    archive = keras.export.ExportArchive()
    # The table is a resource the signatures capture; tracking it saves it with its asset.
    archive.track(table)
    # serving_default first and by name, so Keras does not alias the first endpoint to it.
    for name, function, spec in (
            (SERVING_SIGNATURE, serve_image_bytes, tf.TensorSpec([None], tf.string, BYTES_INPUT)),
            (PIXELS_SIGNATURE, serve_pixels,
             tf.TensorSpec([None, image_size, image_size, 3], tf.float32, PIXELS_INPUT)),
            (TF_EXAMPLE_SIGNATURE, serve_tf_examples,
             tf.TensorSpec([None], tf.string, TF_EXAMPLE_INPUT)),
            (IMAGE_TENSOR_SIGNATURE, serve_image_tensor,
             tf.TensorSpec([None, None, None, 3], tf.uint8, IMAGE_TENSOR_INPUT))):
        archive.add_endpoint(name, function, input_signature=[spec])
    return archive


def _decoder(image_size, central_crop_fraction, max_image_pixels):
    """(string (batch,) encoded images, input name) -> float32 (batch, size, size, 3), each by
    `pipelines.preprocess_for_eval`; an error names the image as `<input name>[i]`."""

    def decode(image_bytes, input_name):
        def preprocess_one(args):
            one_image, index = args
            return pipelines.preprocess_for_eval(
                one_image, image_size, central_crop_fraction,
                context=tf.strings.format(input_name + "[{}]", index),
                max_image_pixels=max_image_pixels,
            )

        indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
        return tf.map_fn(
            preprocess_one,
            (image_bytes, indices),
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )

    return decode


def _classifier(model, table, image_size, top_k):
    """images float32 (batch, size, size, 3) -> the four outputs of both signatures."""

    def classify(images):
        # TensorFlow's oneDNN Conv2D mis-shapes a batch of 0 images (the patch embedding then
        # fails to add the position embeddings), so an empty batch runs the model on one blank
        # image and keeps 0 rows of its outputs. The model call stays outside the tf.cond, which
        # only picks its input.
        num_images = tf.shape(images)[0]
        batch = tf.cond(
            num_images > 0,
            lambda: images,
            lambda: tf.zeros([1, image_size, image_size, 3], images.dtype),
        )
        logits = tf.cast(model(batch, training=False), tf.float32)[:num_images]
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=top_k)
        return {
            "probabilities": probabilities,
            "classes": tf.cast(classes, tf.int32),
            "scores": scores,
            "labels": table.lookup(tf.cast(classes, tf.int64)),
        }

    return classify


def _runtime_shape(tensor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(int32 rank, int32 shape) of `tensor` as fed, never the static ones the signature declares.

    `tf.shape`/`tf.rank`/`tf.size` return constants when the traced shape is known, so a check
    written with them would vanish from the graph; raw Rank and Shape ops run on what is fed.
    """
    return tf.raw_ops.Rank(input=tensor), tf.raw_ops.Shape(input=tensor, out_type=tf.int32)


def _checked_rank(tensor: tf.Tensor, rank: int, message: str) -> tf.Tensor:
    """`tensor` after an in-graph assertion that it has `rank` dimensions."""
    actual_rank, shape = _runtime_shape(tensor)
    assertion = tf.debugging.Assert(
        tf.equal(actual_rank, rank), [message + "; got shape", shape], summarize=8)
    with tf.control_dependencies([assertion]):
        return tf.identity(tensor)


def _checked_pixels(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """`images` after in-graph checks of shape (batch, size, size, 3) and finite values.

    The shape check runs before the finiteness check and both before the model, so no kernel
    sees a tensor it could abort on. The dtype is checked by TensorFlow itself when fed.
    """
    expected = f"(batch, {image_size}, {image_size}, 3)"
    name = f"{PIXELS_SIGNATURE}: input `{PIXELS_INPUT}`"
    rank, shape = _runtime_shape(images)
    # Padded, so that a tensor of any rank compares element by element without failing.
    padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
    ok = tf.logical_and(
        tf.equal(rank, 4),
        tf.reduce_all(tf.equal(padded[1:4], [image_size, image_size, 3])))
    assertion = tf.debugging.Assert(
        ok, [f"{name} must be float32 {expected} RGB pixels in [0, 255]; got shape", shape],
        summarize=8)
    with tf.control_dependencies([assertion]):
        images = tf.identity(images)
    return tf.debugging.assert_all_finite(
        images, f"{name} holds NaN or Inf pixels; send RGB values in [0, 255]")


def _checked_image_tensor(image_tensor: tf.Tensor, max_image_pixels: int | None) -> tf.Tensor:
    """`image_tensor` after in-graph checks of shape (batch, height, width, 3) with height and
    width at least 1 (any, for an empty batch) and, with a cap, height x width at most it.

    The dtype (uint8) is checked by TensorFlow itself when fed.
    """
    name = f"{IMAGE_TENSOR_SIGNATURE}: input `{IMAGE_TENSOR_INPUT}`"
    rank, shape = _runtime_shape(image_tensor)
    padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
    not_empty = tf.logical_and(padded[1] >= 1, padded[2] >= 1)
    ok = tf.logical_and(
        tf.logical_and(tf.equal(rank, 4), tf.equal(padded[3], 3)),
        tf.logical_or(tf.equal(padded[0], 0), not_empty))
    checks = [tf.debugging.Assert(
        ok, [f"{name} must be uint8 (batch, height, width, 3) RGB pixels, height and width at "
             "least 1; got shape", shape], summarize=8)]
    if max_image_pixels is not None:
        with tf.control_dependencies(checks):
            pixels = tf.cast(padded[1], tf.int64) * tf.cast(padded[2], tf.int64)
            checks.append(tf.debugging.Assert(
                pixels <= max_image_pixels,
                [f"{name}: {preprocess.IMAGE_TOO_LARGE}: height x width more than the "
                 f"{max_image_pixels} pixels allowed (max_image_pixels); got shape", shape],
                summarize=8))
    with tf.control_dependencies(checks):
        return tf.identity(image_tensor)


def _cropped_and_resized(image_tensor, image_size, central_crop_fraction):
    """uint8 (batch, height, width, 3) -> float32 (batch, size, size, 3): each image cropped and
    resized by the ops `pipelines.preprocess_for_eval` applies after decoding."""

    def crop_and_resize(image):
        if central_crop_fraction is not None:
            image = tf.image.central_crop(image, central_crop_fraction)
        return preprocess.resize(image, image_size)

    return tf.map_fn(
        crop_and_resize, image_tensor,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def _first_false(condition: tf.Tensor) -> tf.Tensor:
    """int64 index of the first False of a bool vector (its length if none)."""
    return tf.argmin(tf.concat([tf.cast(condition, tf.int32), [1]], 0), output_type=tf.int64)


def _assert_each(condition, template, checks=()):
    """An assertion that `condition` (bool (batch,)) holds, its message `template` formatted
    with the first failing index; runs after `checks`."""
    with tf.control_dependencies(list(checks)):
        message = tf.strings.format(template, _first_false(condition))
        return tf.debugging.Assert(tf.reduce_all(condition), [message])


def _parsed_image_bytes(tf_examples: tf.Tensor) -> tf.Tensor:
    """string (batch,) serialized Examples -> string (batch,) their `image/encoded` bytes.

    Checked in the graph, each failure naming the input and the element: a vector; each
    element empty or starting as a serialized Example does (0x0a, its field 1, `features`,
    first), so that text, JSON or image bytes sent here by mistake are named; an
    `image/encoded` value present. A proto corrupt past its first byte fails in
    ParseExampleV2 itself ("Could not parse example input"), in the op named after the input:
    a failed parse cannot be caught in a graph except by tf.data, which costs ~10 ms a request.
    """
    name = f"{TF_EXAMPLE_SIGNATURE}: input `{TF_EXAMPLE_INPUT}`"
    tf_examples = _checked_rank(
        tf_examples, 1, f"{name} must be a string vector (batch,) of serialized tf.train.Example")
    starts_as_example = tf.logical_or(
        tf.equal(tf.strings.length(tf_examples), 0),
        tf.equal(tf.strings.substr(tf_examples, 0, 1), b"\x0a"))
    looks_right = _assert_each(
        starts_as_example,
        f"{name}: {TF_EXAMPLE_INPUT}" + "[{}] is not a serialized tf.train.Example")
    feature_spec = {records.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value="")}
    with tf.control_dependencies([looks_right]):
        image_bytes = tf.io.parse_example(
            tf_examples, feature_spec, name=f"{TF_EXAMPLE_SIGNATURE}_{TF_EXAMPLE_INPUT}",
        )[records.IMAGE_ENCODED]
    has_image = _assert_each(
        tf.strings.length(image_bytes) > 0,
        f"{name}: {TF_EXAMPLE_INPUT}" + "[{}] has no `" + records.IMAGE_ENCODED
        + "` bytes (the encoded image)")
    with tf.control_dependencies([has_image]):
        return tf.identity(image_bytes)


def export_classifier(
    model: keras.Model,
    export_dir: str,
    *,
    class_names=None,
    version: int | None = None,
    top_k: int = 5,
    central_crop_fraction: float | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    precision: str = "float32",
    warmup_batch_sizes=warmup.DEFAULT_WARMUP_BATCH_SIZES,
    warmup_images=None,
    verify=None,
) -> ExportedModel:
    """Writes `model` as SavedModel version `version` under `export_dir`, atomically.

    The SavedModel (its warmup file included) is written to a hidden temporary directory
    inside `export_dir` (TF Serving only looks at integer names) and renamed to
    `export_dir/<version>` when complete, so a serving process polling `export_dir` never loads
    half a model. The version is readable as the user's umask allows (world-readable under
    022), as a TF Serving running as another user needs. Temporary directories left by killed
    exports are removed first (`remove_stale_exports`).

    Args:
        model: the classifier, see `build_archive`. Needs the TensorFlow backend.
        export_dir: the model base path TF Serving watches; created if missing.
        class_names: one name per output, or None for `fallback_class_names` ("class_0", ...).
        version: positive integer; default: `next_version(export_dir)`. Never overwritten.
        top_k: best classes returned per image; capped at the number of classes.
        central_crop_fraction: see `build_archive`.
        max_image_pixels: see `build_archive`; default 40 megapixels, None for no cap.
        precision: "float32": the model in float32 (a float32 copy of one trained under
            mixed_bfloat16, `precision.float32_model`); "bfloat16": weights
            stored in bfloat16 and computed in bfloat16 with no per-call weight casts
            (`precision.bfloat16_model`); the outputs are float32 either way.
        warmup_batch_sizes: batch sizes of the warmup requests, one per signature each, in
            `assets.extra/tf_serving_warmup_requests`; () for no warmup file.
        warmup_images: encoded images (bytes) the warmup requests are built from; None: a
            generated JPEG (`warmup.default_warmup_image`).
        verify: None, or a function called with the complete temporary SavedModel directory
            before it is published; what it raises stops the publication (`manifest.verify`
            runs the export in a fresh process and may write the manifest into it).

    Returns:
        An `ExportedModel` describing what was written.

    Raises:
        ExportError: non-square model, class names not matching the head, a version that
            exists, a `max_image_pixels` that is not a positive integer, an unknown precision,
            bad warmup batch sizes or images, variables larger than the weights allow
            (duplicated variables), or a bfloat16 graph that casts weights.
        MissingExtraError: warmup requests asked for without tensorflow-serving-api.
    """
    _require_tensorflow_backend()
    num_classes = int(model.output_shape[-1])
    image_size = _square_image_size(model)
    class_names = _check_class_names(class_names, num_classes)
    top_k = _check_top_k(top_k, num_classes)
    _check_max_image_pixels(max_image_pixels)
    central_crop_fraction = eval_crop_fraction(model, central_crop_fraction)
    served = precision_lib.model_in_precision(model, precision)
    logs = warmup.checked_prediction_logs(warmup_images, warmup_batch_sizes, image_size, central_crop_fraction,
                        max_image_pixels)
    version, final_path = _new_version_path(export_dir, version)
    stored, weights = _write_version(
        served, export_dir, final_path, logs, precision=precision, verify=verify,
        class_names=class_names,
        top_k=top_k, central_crop_fraction=central_crop_fraction,
        max_image_pixels=max_image_pixels)
    logging.info("Exported %s: %d bytes of %s variables for %d bytes of weights.",
                 final_path, stored, precision, weights)
    return ExportedModel(
        path=final_path, version=version, image_size=image_size, num_classes=num_classes,
        top_k=top_k, weight_bytes=weights, variables_bytes=stored,
        max_image_pixels=max_image_pixels, precision=precision, warmup_requests=len(logs))


def _write_version(model, export_dir, final_path, logs, *, precision, verify,
                   **archive_options):
    """Writes the SavedModel and its warmup file to a temporary directory of `export_dir`,
    checks them and renames it to `final_path`; (variables bytes, weight bytes)."""
    os.makedirs(export_dir, exist_ok=True)
    remove_stale_exports(export_dir)
    temp_path = tempfile.mkdtemp(prefix=_temp_prefix(), dir=export_dir)
    try:
        _write_saved_model(model, temp_path, **archive_options)
        if logs:
            warmup.write_warmup_file(temp_path, logs)
        stored, weights = _check_variables_stored_once(model, temp_path)
        if precision == "bfloat16":
            precision_lib.check_no_weight_casts(temp_path)
        if verify is not None:
            verify(temp_path)
        _apply_umask(temp_path)
        _publish(temp_path, final_path)
    except BaseException:
        shutil.rmtree(temp_path, ignore_errors=True)
        raise
    return stored, weights


def _require_tensorflow_backend():
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"Export needs the TensorFlow backend (the serving graph decodes images with TF "
            f"ops); KERAS_BACKEND is {keras.backend.backend()!r}. Run with KERAS_BACKEND=tensorflow."
        )


def _check_top_k(top_k: int, num_classes: int) -> int:
    """`top_k`, capped at `num_classes`; an ExportError when it is not positive."""
    if top_k < 1:
        raise ExportError(f"top_k must be a positive integer, got {top_k}.")
    if top_k > num_classes:
        logging.info("top_k=%d capped at the model's %d classes.", top_k, num_classes)
        return num_classes
    return top_k


def _new_version_path(export_dir: str, version: int | None) -> tuple[int, str]:
    """(version, export_dir/version) for a version that does not exist yet."""
    if version is None:
        version = next_version(export_dir)
    elif not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ExportError(f"version must be a positive integer, got {version!r}.")
    final_path = os.path.join(export_dir, str(version))
    if os.path.exists(final_path):
        raise ExportError(
            f"{final_path} already exists. Versions are immutable (a server may be serving it): "
            f"choose another version or omit it to use the next free one "
            f"({next_version(export_dir)})."
        )
    return version, final_path


def _check_max_image_pixels(max_image_pixels):
    if max_image_pixels is not None and (
            isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
            or max_image_pixels < 1):
        raise ExportError(
            f"max_image_pixels must be a positive integer (height x width of the largest image "
            f"serving_default decodes) or None for no cap, got {max_image_pixels!r}.")


def _host_tag() -> str:
    """This host's name with no '-' (the separator in temporary directory names)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _temp_prefix() -> str:
    """`.tmp-export-<host>-<pid>-`: whose export a temporary directory is."""
    return f"{_TEMP_PREFIX}{_host_tag()}-{os.getpid()}-"


def _is_stale(path: str, name: str, now: float) -> bool:
    """Is the temporary export directory `path` (basename `name`) left by a dead export?

    Dead: its process (named in the directory, on this host) no longer runs, or nothing under
    it was modified for `STALE_EXPORT_SECONDS` (an export on another host sharing the
    directory, a reused pid, or a name from an older exporter).
    """
    match = re.fullmatch(re.escape(_TEMP_PREFIX) + r"([^-]+)-(\d+)-.+", name)
    if match and match.group(1) == _host_tag():
        pid = int(match.group(2))
        if pid != os.getpid() and not _process_runs(pid):
            return True
    newest = os.stat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for entry in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, entry)).st_mtime)
            except OSError:  # removed meanwhile
                continue
    return now - newest > STALE_EXPORT_SECONDS


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def remove_stale_exports(export_dir: str) -> list[str]:
    """Removes the `.tmp-export-*` directories of killed exports in `export_dir`; returns them.

    Exports running at the same time (this or another process, this or another host) keep
    theirs: see `_is_stale` for the rule.
    """
    removed = []
    now = time.time()
    for name in sorted(os.listdir(export_dir)):
        path = os.path.join(export_dir, name)
        if not name.startswith(_TEMP_PREFIX) or not os.path.isdir(path):
            continue
        try:
            stale = _is_stale(path, name, now)
        except OSError:  # removed by another export meanwhile
            continue
        if stale:
            logging.warning("Removing %s, left by an export that did not finish.", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _current_umask() -> int:
    # Linux reports it in /proc (since 4.7); elsewhere os.umask is the only way to read it, by
    # setting it, which another thread creating a file at that moment would see.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _apply_umask(path: str):
    """Gives the tree under `path` the modes new files get: `tempfile.mkdtemp` makes 0700."""
    umask = _current_umask()
    directory_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(path, directory_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), directory_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def _write_saved_model(model, path, *, class_names, top_k, central_crop_fraction,
                       max_image_pixels):
    """Writes the archive of `build_archive` to `path`, the class names as its asset."""
    with tempfile.TemporaryDirectory() as names_dir:
        class_names_path = os.path.join(names_dir, CLASS_NAMES_ASSET)
        with open(class_names_path, "w", encoding="utf-8") as stream:
            stream.write("\n".join(class_names) + "\n")
        archive = build_archive(
            model, class_names_path, top_k=top_k, central_crop_fraction=central_crop_fraction,
            max_image_pixels=max_image_pixels,
        )
        archive.write_out(path, verbose=False)


def _check_variables_stored_once(model, saved_model_dir) -> tuple[int, int]:
    """(bytes of variables/ on disk, bytes of the weights); an ExportError when the variables
    were saved more than once (keras-team/keras#23553)."""
    stored = variables_bytes(saved_model_dir)
    weights = weight_bytes(model)
    if stored > MAX_VARIABLE_OVERHEAD * weights + _INDEX_ALLOWANCE_BYTES:
        raise ExportError(
            f"The SavedModel's variables take {stored} bytes for {weights} bytes of weights "
            f"(more than {MAX_VARIABLE_OVERHEAD}x): variables were saved more than once "
            "(keras-team/keras#23553). Do not track the whole model in the ExportArchive."
        )
    return stored, weights


def _publish(temp_path, final_path):
    """Renames the finished SavedModel to its version directory, atomically."""
    # rename() is atomic within a file system; it fails if a non-empty version appeared.
    try:
        os.rename(temp_path, final_path)
    except OSError as error:
        if os.path.exists(final_path):
            raise ExportError(
                f"{final_path} appeared while exporting (another export running at the same "
                "time?); nothing was overwritten. Export again for the next free version."
            ) from error
        raise
