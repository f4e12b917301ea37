"""Exports a classifier as a TensorFlow Serving SavedModel: versioned, atomic, four signatures.

    EXPORT_DIR/
      1/                        one immutable version per export (TF Serving serves the highest)
        saved_model.pb
        variables/              each weight stored once (float32, or bfloat16: `precision`)
        assets/class_names.txt  one class name per line, index = class
        assets.extra/tf_serving_warmup_requests   TF Serving's warmup requests (`warmup`)
      2/ ...

Signatures (batch dimension dynamic, -1 in `saved_model_cli`); `signatures=` picks among
them and `features` and `explain` (`representations`), serving_default and predict_pixels
always exported:

    serving_default       image_bytes: string (batch,)  JPEG/PNG/GIF/BMP of any size, decoded
                          and resized in the graph by `pipelines.preprocess_for_eval`, the
                          evaluation preprocessing itself
    predict_pixels        images: float32 (batch, size, size, 3), RGB in [0, 255]; a
                          dynamic-size model's (batch, height, width, 3), any multiple of the
                          patch (the others resize to the size it was built for)
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
shape. A bad request fails with INVALID_ARGUMENT naming the input (`inputs`); see
docs/serving.md.

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

from keras_vit.class_names import fallback_class_names
from keras_vit.inference import eval_crop_fraction
from keras_vit.model import built_image_size
from keras_vit.serving import precision as precision_lib
from keras_vit.serving import inputs, representations, warmup
from keras_vit.serving.representations import ExplainOptions, FeatureOptions
from keras_vit.serving.signatures import (
    ALL_SIGNATURES,
    BYTES_INPUT,
    CLASS_NAMES_ASSET,
    DEFAULT_SIGNATURES,
    EXPLAIN_SIGNATURE,
    FEATURES_SIGNATURE,
    IMAGE_TENSOR_INPUT,
    IMAGE_TENSOR_SIGNATURE,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    REQUIRED_SIGNATURES,
    SERVING_SIGNATURE,
    TF_EXAMPLE_INPUT,
    TF_EXAMPLE_SIGNATURE,
)
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
    signatures: tuple[str, ...] = DEFAULT_SIGNATURES  # in the order the SavedModel lists them


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


def served_image_size(model: keras.Model) -> int:
    """The side S the signatures resize images to: the model's input side, or for a
    dynamic-size model (input (batch, None, None, 3)) the side it was built for
    (`keras_vit.model.built_image_size`); an ExportError unless square RGB."""
    shape = tuple(model.input_shape)
    size = None
    if len(shape) == 4 and shape[-1] == 3:
        try:
            size = built_image_size(model) if None in shape[1:3] else shape[1:3]
        except ValueError:  # no patch embedding: not a dynamic-size ViT
            size = None
    if size is None or size[0] != size[1]:
        built = "" if size is None or size == shape[1:3] else f", built for {size}"
        raise ExportError(
            f"Expected a model taking square RGB images (batch, size, size, 3); {model.name} "
            f"takes {shape}{built}. The serving signature resizes to a square, as the eval "
            "pipeline does.")
    return int(size[0])


def dynamic_patch_size(model: keras.Model) -> int | None:
    """The patch side of a dynamic-size model (input height and width None), else None."""
    if None not in tuple(model.input_shape)[1:3]:
        return None
    return int(model.get_layer("patch_embedding").patch_size)


def checked_signatures(signatures) -> tuple[str, ...]:
    """`signatures` with REQUIRED_SIGNATURES added, in ALL_SIGNATURES order; an ExportError
    naming unknown ones and the valid names."""
    if isinstance(signatures, str):
        signatures = [signatures]
    asked = [str(name).strip() for name in signatures]
    unknown = [name for name in asked if name not in ALL_SIGNATURES]
    if unknown:
        raise ExportError(
            f"Unknown signature(s) {', '.join(map(repr, unknown))}: the signatures are "
            f"{', '.join(ALL_SIGNATURES)} ({', '.join(REQUIRED_SIGNATURES)} always exported).")
    return tuple(name for name in ALL_SIGNATURES if name in asked or name in REQUIRED_SIGNATURES)


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
    signatures=DEFAULT_SIGNATURES,
    feature_options: FeatureOptions = FeatureOptions(),
    explain_options: ExplainOptions = ExplainOptions(),
) -> keras.export.ExportArchive:
    """An `ExportArchive` holding `model` behind the serving signatures.

    Args:
        model: a classifier taking float32 (batch, size, size, 3) images in [0, 255] and
            returning logits (batch, num_classes), as `keras_vit.create_model` builds; or a
            dynamic-size one (batch, None, None, 3) built for a square size.
        class_names_path: text file with one class name per line; becomes the SavedModel asset
            the `labels` output reads.
        top_k: number of best classes in `classes`, `scores` and `labels`, at most num_classes.
        central_crop_fraction: passed to `pipelines.preprocess_for_eval`; must match the
            evaluation pipeline the model was measured with. None: the fraction recorded with
            the model's checkpoint (timm's crop_pct), else the whole image.
        max_image_pixels: `serving_default` and `predict_tf_example` refuse an image whose
            header declares more pixels (height x width), before decoding it, and
            `predict_image_tensor` an image tensor of more; None: no cap.
        signatures: names of ALL_SIGNATURES to export (`checked_signatures` adds the required).
        feature_options: what `features` returns (`representations.FeatureOptions`).
        explain_options: how `explain` rolls attention out (`representations.ExplainOptions`).
    """
    image_size = served_image_size(model)
    patch_size = dynamic_patch_size(model)
    central_crop_fraction = eval_crop_fraction(model, central_crop_fraction)
    table = _label_table(class_names_path)
    top_k_outputs = _top_k_outputs(table, top_k)
    classify = _classifier(model, top_k_outputs)
    decode = inputs.decoder(image_size, central_crop_fraction, max_image_pixels)

    def decoded(name):
        def serve(image_bytes):
            image_bytes = inputs.checked_rank(image_bytes, 1, f"{name}: input `{BYTES_INPUT}` "
                                        "must be a string vector (batch,) of encoded images")
            return endpoints[name](decode(image_bytes, BYTES_INPUT))
        return serve

    def serve_pixels(images):
        return classify(inputs.checked_pixels(images, image_size, patch_size))

    def serve_tf_examples(tf_examples):
        return classify(decode(inputs.parsed_image_bytes(tf_examples), TF_EXAMPLE_INPUT))

    def serve_image_tensor(image_tensor):
        image_tensor = inputs.checked_image_tensor(image_tensor, max_image_pixels)
        return classify(inputs.cropped_and_resized(image_tensor, image_size, central_crop_fraction))

    endpoints = {SERVING_SIGNATURE: classify}
    signatures = checked_signatures(signatures)
    if FEATURES_SIGNATURE in signatures:
        endpoints[FEATURES_SIGNATURE] = representations.features_function(model, feature_options)
    if EXPLAIN_SIGNATURE in signatures:
        endpoints[EXPLAIN_SIGNATURE] = representations.explain_function(
            model, top_k_outputs, explain_options, image_size)
    side = None if patch_size else image_size
    bytes_spec = tf.TensorSpec([None], tf.string, BYTES_INPUT)
    functions = {
        SERVING_SIGNATURE: (decoded(SERVING_SIGNATURE), bytes_spec),
        PIXELS_SIGNATURE: (serve_pixels,
                           tf.TensorSpec([None, side, side, 3], tf.float32, PIXELS_INPUT)),
        TF_EXAMPLE_SIGNATURE: (serve_tf_examples,
                               tf.TensorSpec([None], tf.string, TF_EXAMPLE_INPUT)),
        IMAGE_TENSOR_SIGNATURE: (serve_image_tensor, tf.TensorSpec(
            [None, None, None, 3], tf.uint8, IMAGE_TENSOR_INPUT)),
        FEATURES_SIGNATURE: (decoded(FEATURES_SIGNATURE), bytes_spec),
        EXPLAIN_SIGNATURE: (decoded(EXPLAIN_SIGNATURE), bytes_spec),
    }
    archive = keras.export.ExportArchive()
    # The table is a resource the signatures capture; tracking it saves it with its asset.
    archive.track(table)
    # serving_default first and by name, so Keras does not alias the first endpoint to it.
    for name in signatures:
        function, spec = functions[name]
        archive.add_endpoint(name, function, input_signature=[spec])
    return archive


def _top_k_outputs(table, top_k):
    """logits float32 (batch, K) -> the four outputs every classifying signature returns."""

    def outputs(logits):
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=top_k)
        return {
            "probabilities": probabilities,
            "classes": tf.cast(classes, tf.int32),
            "scores": scores,
            "labels": table.lookup(tf.cast(classes, tf.int64)),
        }

    return outputs


def _classifier(model, top_k_outputs):
    """images float32 (batch, size, size, 3) -> the four outputs (an empty batch allowed:
    `representations.on_nonempty_batch`)."""

    def logits_outputs(images):
        return top_k_outputs(tf.cast(model(images, training=False), tf.float32))

    return lambda images: representations.on_nonempty_batch(logits_outputs, images)


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
    signatures=DEFAULT_SIGNATURES,
    feature_options: FeatureOptions = FeatureOptions(),
    explain_options: ExplainOptions = ExplainOptions(),
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
        warmup_batch_sizes: batch sizes of the warmup requests, one per exported signature each, in
            `assets.extra/tf_serving_warmup_requests`; () for no warmup file.
        warmup_images: encoded images (bytes) the warmup requests are built from; None: a
            generated JPEG (`warmup.default_warmup_image`).
        verify: None, or a function called with the complete temporary SavedModel directory
            before it is published; what it raises stops the publication (`manifest.verify`
            runs the export in a fresh process and may write the manifest into it).
        signatures, feature_options, explain_options: see `build_archive`; default the four
            classifying signatures.

    Returns:
        An `ExportedModel` describing what was written.

    Raises:
        ExportError: non-square model, class names not matching the head, a version that
            exists, a `max_image_pixels` that is not a positive integer, an unknown precision,
            bad warmup batch sizes or images, variables larger than the weights allow
            (duplicated variables), a bfloat16 graph that casts weights, an unknown signature,
            or features/explain options the model does not allow.
        MissingExtraError: warmup requests asked for without tensorflow-serving-api.
    """
    _require_tensorflow_backend()
    num_classes = int(model.output_shape[-1])
    image_size = served_image_size(model)
    signatures = checked_signatures(signatures)
    class_names = _check_class_names(class_names, num_classes)
    top_k = _check_top_k(top_k, num_classes)
    _check_max_image_pixels(max_image_pixels)
    central_crop_fraction = eval_crop_fraction(model, central_crop_fraction)
    _check_representations(model, signatures, feature_options)
    served = precision_lib.model_in_precision(model, precision)
    logs = warmup.checked_prediction_logs(warmup_images, warmup_batch_sizes, image_size,
                                          central_crop_fraction, max_image_pixels, signatures)
    version, final_path = _new_version_path(export_dir, version)
    stored, weights = _write_version(
        served, export_dir, final_path, logs, precision=precision, verify=verify,
        class_names=class_names,
        top_k=top_k, central_crop_fraction=central_crop_fraction,
        max_image_pixels=max_image_pixels, signatures=signatures,
        feature_options=feature_options, explain_options=explain_options)
    logging.info("Exported %s: %d bytes of %s variables for %d bytes of weights.",
                 final_path, stored, precision, weights)
    return ExportedModel(
        path=final_path, version=version, image_size=image_size, num_classes=num_classes,
        top_k=top_k, weight_bytes=weights, variables_bytes=stored,
        max_image_pixels=max_image_pixels, precision=precision, warmup_requests=len(logs),
        signatures=signatures)


def _check_representations(model, signatures, feature_options):
    """Refuses, before anything is written, features/explain options the model cannot serve."""
    if FEATURES_SIGNATURE in signatures:
        representations.feature_model(model, feature_options)
    if EXPLAIN_SIGNATURE in signatures:
        representations.rollout_geometry(model)


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


def _write_saved_model(model, path, *, class_names, **archive_options):
    """Writes the archive of `build_archive` to `path`, the class names as its asset."""
    with tempfile.TemporaryDirectory() as names_dir:
        class_names_path = os.path.join(names_dir, CLASS_NAMES_ASSET)
        with open(class_names_path, "w", encoding="utf-8") as stream:
            stream.write("\n".join(class_names) + "\n")
        archive = build_archive(model, class_names_path, **archive_options)
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
