"""One export in any format, checked in its own runtime before it is published.

    export_verified(model, "saved_model", export_dir="/models/vit", precision="bfloat16")
    export_verified(model, "onnx", output="/out/vit.onnx")

The manifest (`manifest.build_manifest`) is made from the float32 Keras model first; the
exporter writes to a temporary name; `manifest.verify` runs the probe batch through the
temporary in a fresh process; only then are the manifest and the export published:

    SavedModel   EXPORT_DIR/<version>/assets.extra/keras_vit_export.json
    other files  beside the file: vit.onnx -> vit.onnx.keras_vit_export.json
"""

import os

import numpy as np

from keras_vit.inference import eval_crop_fraction
from keras_vit.serving import export as export_lib
from keras_vit.serving import manifest as manifest_lib
from keras_vit.serving import precision as precision_lib
from keras_vit.serving import runtimes
from pipelines.errors import UserError

FORMATS = ("saved_model",) + tuple(runtimes.EXPORTERS)
PRECISIONS = {"saved_model": ("float32", "bfloat16"), **runtimes.PRECISIONS}


def manifest_path(export_path):
    """Where the manifest of the export at `export_path` (a SavedModel version or a file) is."""
    if os.path.isdir(export_path):
        return os.path.join(export_path, "assets.extra", manifest_lib.MANIFEST_NAME)
    return export_path + "." + manifest_lib.MANIFEST_NAME


def check_format(export_format, precision):
    """Raises a UserError unless `precision` is one `export_format` offers."""
    if export_format not in FORMATS:
        raise UserError(f"format {export_format!r} is none of {', '.join(FORMATS)}.")
    if precision not in PRECISIONS[export_format]:
        raise UserError(f"{export_format} exports offer the precisions "
                        f"{', '.join(PRECISIONS[export_format])}, not {precision!r}.")


def export_verified(model, export_format, *, precision="float32", source=None,
                    probe_images=None, output=None, export_dir=None, calibration_images=None,
                    top_k=5, **saved_model_options):
    """Exports `model`, verifies the export in its runtime, then publishes it with its manifest.

    Args:
        model: the float32 Keras classifier (float32 [0, 255] images in, logits out).
        export_format: one of FORMATS.
        precision: one of PRECISIONS[export_format].
        source: the checkpoint or model directory `model` came from (its sha256 is recorded).
        probe_images: float32 (N, S, S, 3) in [0, 255]; default `manifest.probe_images(S)`.
        output: the file to write, for every format but "saved_model".
        export_dir: the SavedModel base directory, for "saved_model".
        calibration_images: float32 (n, S, S, 3) for the calibrated int8 precisions.
        top_k: classes per image in the top-k outputs.
        **saved_model_options: `export_classifier`'s other keywords (class_names, version,
            central_crop_fraction, max_image_pixels, warmup_batch_sizes, warmup_images,
            signatures, feature_options, explain_options).

    Returns:
        (the export: an `ExportedModel` for "saved_model", else the file's path; the manifest
        dict with its "verification" result).

    Raises:
        manifest.VerificationError: the export differs from the Keras model by more than the
            precision's bound; nothing is published.
    """
    check_format(export_format, precision)
    model = precision_lib.float32_model(model)  # the reference, and what is exported
    image_size = export_lib.served_image_size(model)
    images = manifest_lib.probe_images(image_size) if probe_images is None else probe_images
    record = manifest_lib.build_manifest(
        model, np.asarray(images, np.float32), source=source, export_format=export_format,
        precision=precision, preprocessing=_preprocessing(model, saved_model_options))
    pending = []  # a file's manifest, written by the check, published after the file
    check = _checker(record, None if export_format == "saved_model" else output, pending)
    if export_format == "saved_model":
        exported = export_lib.export_classifier(
            model, export_dir, precision=precision, top_k=top_k, verify=check,
            **saved_model_options)
        return exported, record
    if saved_model_options:
        raise UserError(f"{sorted(saved_model_options)} apply to SavedModel exports only.")
    try:
        path = runtimes.EXPORTERS[export_format](
            model, output, precision=precision, top_k=top_k, verify=check,
            **({} if export_format == "onnx" else {"calibration_images": calibration_images}))
    except BaseException:
        for manifest_file in pending:
            _remove(manifest_file)
        raise
    for manifest_file in pending:  # the file is published: now its manifest
        os.replace(manifest_file, manifest_path(path))
    return path, record


def _checker(record, final, pending):
    """The `verify` hook: runs the temporary export, then writes the manifest: into the
    SavedModel's temporary directory (published with it), or for a file to a hidden name
    beside it (appended to `pending`; renamed once the file is published, so a kill in between
    leaves no manifest without its file)."""
    def check(temporary):
        record["verification"] = manifest_lib.verify(temporary, record, name=final)
        if final is None:
            manifest_lib.write_manifest(record, manifest_path(temporary))
            return
        directory, name = os.path.split(manifest_path(os.path.abspath(final)))
        pending.append(manifest_lib.write_manifest(
            record, os.path.join(directory, f".{name}.{os.getpid()}.pending")))

    return check


def _preprocessing(model, options):
    """What a caller feeds the export: the input and the eval preprocessing of the images."""
    return {
        "input": "float32 RGB (batch, height, width, 3) in [0, 255]",
        # A dynamic-size model's SavedModel predict_pixels takes any multiple of the patch; the
        # probe batch, the other signatures and the other formats use this size.
        "image_size": export_lib.served_image_size(model),
        "central_crop_fraction": eval_crop_fraction(model, options.get("central_crop_fraction")),
        "resize": "bilinear, after the central crop (pipelines.preprocess_for_eval)",
        "normalisation": "inside the model",
    }


def verify_export(export_path):
    """`tools/export.py --verify=PATH`: re-runs the manifest's check on `export_path`."""
    if not os.path.exists(export_path):
        raise UserError(f"{export_path} does not exist: expected a SavedModel version directory "
                        "or an exported .tflite, .onnx or .xml file.")
    record = manifest_lib.read_manifest(manifest_path(export_path))
    return manifest_lib.verify(export_path, record)


def _remove(path):
    if os.path.exists(path):
        os.remove(path)
