"""Exports a classifier to the runtimes that are not TensorFlow: LiteRT, ONNX and OpenVINO.

    export_litert(model, "vit.tflite", precision="float32"|"float16"|"int8"|"int8_full")
    export_onnx(model, "vit.onnx", precision="float32"|"int8")
    export_openvino(model, "vit.xml", precision="float32"|"bfloat16"|"int8")   (+ vit.bin)

Every file has the interface of the SavedModel's `predict_pixels` signature, without labels
(a dynamic-size model is exported at the size it was built for, `export.served_image_size`):

    input    images         float32 (batch, size, size, 3), RGB in [0, 255], batch dynamic
    outputs  probabilities  float32 (batch, num_classes)  softmax of the logits
             classes        int32   (batch, top_k)        best first
             scores         float32 (batch, top_k)        their probabilities

Each is made by its ecosystem's own converter from one `tf.function` around the Keras model in
inference mode (so the attention's and the MLP's 2-D TensorFlow Dense path is what they see:
all three convert it): the TensorFlow Lite converter and OpenVINO's `convert_model` read it
from a SavedModel written to a temporary directory (the LiteRT converter freezes a
SavedModel's variables, not those a concrete function captures: converted from the function,
every weight reads as NaN), tf2onnx converts the function itself.

The graph cannot check its input (none of the three runs TensorFlow's Assert): each runtime
checks the declared shape and dtype itself, or not (docs/serving.md lists what each does), and
`run_exported` checks rank, size, dtype and finiteness before calling any of them.

Publishing: the files are written into a hidden `.tmp-export-<host>-<pid>-*` directory beside
the output, under their final names, optionally checked there (`verify`), then renamed into
place, OpenVINO's .bin before its .xml, so that a killed export leaves no file a loader would
take (`export.remove_stale_exports` removes the directory later). An existing output is never
overwritten: a server may be reading it, and OpenVINO's two files cannot be swapped at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_vit.serving.export import (
    ExportError,
    _check_top_k,
    _require_tensorflow_backend,
    served_image_size,
    _temp_prefix,
    remove_stale_exports,
)
from keras_vit.serving.signatures import PIXELS_INPUT
from keras_vit.serving import run_exported
from keras_vit.serving.run_exported import OPENVINO_HINT_KEY

LITERT_PRECISIONS = ("float32", "float16", "int8", "int8_full")
ONNX_PRECISIONS = ("float32", "int8")
OPENVINO_PRECISIONS = ("float32", "bfloat16", "int8")
# Each precision's inference hint, recorded in the OpenVINO model's rt_info under
# OPENVINO_HINT_KEY; run_exported passes it to compile_model. The CPU plugin's default on CPUs
# with AMX/AVX512-BF16 is bf16, so a float32 model compiled without the hint runs in bfloat16
# (errors of ~5e-3 measured).
_OPENVINO_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
ONNX_OPSET = 17


def _require(module_name: str, package: str, **install):
    """`run_exported.require`, for an export."""
    return run_exported.require(module_name, package, needed_by="This export", **install)


def _check_precision(precision: str, supported: tuple[str, ...], file_format: str):
    if precision not in supported:
        raise ExportError(
            f"{file_format} export supports precision {', '.join(supported)}; got "
            f"{precision!r}.")


def serving_function(model: keras.Model, top_k: int = 5) -> tf.types.experimental.Function:
    """The `tf.function` every format converts: images -> probabilities, classes, scores.

    Args:
        model: classifier taking float32 (batch, size, size, 3) pixels in [0, 255], returning
            logits (batch, num_classes).
        top_k: classes per image in `classes` and `scores`, at most num_classes.

    Returns:
        A `tf.function` with one input signature, float32 `images` (None, size, size, 3).
    """
    image_size = served_image_size(model)

    def serve(images):
        logits = tf.cast(model(images, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=top_k)
        return {"probabilities": probabilities, "classes": tf.cast(classes, tf.int32),
                "scores": scores}

    signature = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=PIXELS_INPUT)
    return tf.function(serve, input_signature=[signature])


def _write_saved_model(function, directory: str):
    """`function` as the `serving_default` signature of a SavedModel in `directory`."""
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", function)
    archive.write_out(directory, verbose=False)


def _calibration_batches(calibration_images, image_size: int) -> np.ndarray:
    """`calibration_images` as float32 (n, size, size, 3) in [0, 255]; ExportError otherwise."""
    if calibration_images is None:
        raise ExportError(
            "Full-integer int8 needs calibration_images: float32 (n, size, size, 3) pixels in "
            "[0, 255] preprocessed as for evaluation (tools/export.py: --calibration_data), "
            "a few hundred representative images.")
    images = np.asarray(calibration_images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3) or not len(images):
        raise ExportError(
            f"calibration_images must be (n, {image_size}, {image_size}, 3) float32 pixels, "
            f"n >= 1; got shape {images.shape}.")
    if not np.all(np.isfinite(images)):
        raise ExportError("calibration_images hold NaN or Inf pixels; pass RGB values in [0, 255].")
    return images


def _prepare(model, path, extensions, precision, supported, file_format, top_k):
    """Checks shared by every export; returns (the final paths, the function to convert)."""
    _check_precision(precision, supported, file_format)
    _require_tensorflow_backend()
    stem, extension = os.path.splitext(path)
    if extension != extensions[0]:
        raise ExportError(
            f"A {file_format} export is written to a {extensions[0]} file; got {path!r}.")
    finals = [stem + ext for ext in extensions]
    for final in finals:
        if os.path.exists(final):
            raise ExportError(
                f"{final} already exists; exports never overwrite one (a server may be reading "
                "it). Remove it or choose another --output.")
    top_k = _check_top_k(top_k, int(model.output_shape[-1]))
    return finals, serving_function(model, top_k)


def _publish(write, finals, verify):
    """Runs `write(temporaries)`, then `verify(temporaries[0])`, then renames them to `finals`.

    The temporaries sit in a hidden directory beside the output, under the final names (an
    OpenVINO .xml finds its .bin by name), and are renamed last file first: OpenVINO's .bin
    before the .xml a loader opens.
    """
    directory = os.path.dirname(os.path.abspath(finals[0]))
    os.makedirs(directory, exist_ok=True)
    remove_stale_exports(directory)
    temp_dir = tempfile.mkdtemp(prefix=_temp_prefix(), dir=directory)
    try:
        temporaries = [os.path.join(temp_dir, os.path.basename(final)) for final in finals]
        write(temporaries)
        if verify is not None:
            verify(temporaries[0])
        published = []
        try:
            for temporary, final in reversed(list(zip(temporaries, finals))):
                _move_without_overwriting(temporary, final)
                published.append(final)
        except BaseException:
            for final in published:  # an OpenVINO .bin without its .xml
                os.remove(final)
            raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    logging.info("Exported %s.", ", ".join(finals))
    return finals[0]


def _move_without_overwriting(temporary: str, final: str):
    """Moves `temporary` to `final`; ExportError if `final` exists (never replaced)."""
    try:
        os.link(temporary, final)  # fails if `final` exists, unlike rename
    except FileExistsError as error:
        raise ExportError(f"{final} appeared while exporting (another export running at the "
                          "same time?); nothing was overwritten.") from error
    except OSError:  # a file system without hard links
        if os.path.exists(final):
            raise ExportError(f"{final} appeared while exporting; nothing was overwritten.")
        os.rename(temporary, final)
        return
    os.remove(temporary)


def export_litert(model: keras.Model, path: str, *, precision: str = "float32",
                  calibration_images=None, top_k: int = 5, verify=None) -> str:
    """Writes `model` as a LiteRT (TensorFlow Lite) flatbuffer at `path` (.tflite).

    Precisions (the TensorFlow Lite converter's post-training options; input and outputs stay
    float32 in all four):
        float32    as trained;
        float16    weights stored in float16 (`target_spec.supported_types`), computed in
                   float32 by XNNPACK;
        int8       dynamic range: weights int8, activations quantised on the fly
                   (`Optimize.DEFAULT`);
        int8_full  weights and activations int8, ranges calibrated on `calibration_images`
                   (`representative_dataset`); the softmax and top-k stay float.

    Args:
        model: the classifier (see `serving_function`). Needs the TensorFlow backend.
        path: the .tflite to write; must not exist.
        precision: one of LITERT_PRECISIONS.
        calibration_images: int8_full only: float32 (n, size, size, 3) in [0, 255].
        top_k: classes per image in `classes`/`scores`; capped at num_classes.
        verify: optional callable given the finished temporary file before it is published;
            an exception from it publishes nothing.

    Returns:
        `path`.
    """
    finals, function = _prepare(model, path, (".tflite",), precision, LITERT_PRECISIONS,
                                "LiteRT", top_k)
    if precision == "int8_full":
        calibration = _calibration_batches(calibration_images, served_image_size(model))

    def write(temporaries):
        with tempfile.TemporaryDirectory() as saved_model_dir:
            _write_saved_model(function, saved_model_dir)
            converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
            if precision != "float32":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if precision == "float16":
                converter.target_spec.supported_types = [tf.float16]
            if precision == "int8_full":
                converter.representative_dataset = lambda: (
                    {PIXELS_INPUT: calibration[i:i + 1]} for i in range(len(calibration)))
            flatbuffer = converter.convert()
        with open(temporaries[0], "wb") as stream:
            stream.write(flatbuffer)

    return _publish(write, finals, verify)


def export_onnx(model: keras.Model, path: str, *, precision: str = "float32",
                calibration_images=None, top_k: int = 5, verify=None) -> str:
    """Writes `model` as an ONNX graph (opset ONNX_OPSET) at `path` (.onnx), with tf2onnx.

    Precisions:
        float32  as trained;
        int8     ONNX Runtime's dynamic quantisation (`onnxruntime.quantization.
                 quantize_dynamic`, int8 weights, activations quantised per call): runs in
                 ONNX Runtime only.

    Args:
        model: the classifier (see `serving_function`). Needs the TensorFlow backend.
        path: the .onnx to write; must not exist.
        precision: one of ONNX_PRECISIONS.
        calibration_images: not used (dynamic int8 needs none); accepted so that every
            exporter takes the same arguments.
        top_k, verify: as `export_litert`.

    Returns:
        `path`.
    """
    finals, function = _prepare(model, path, (".onnx",), precision, ONNX_PRECISIONS, "ONNX",
                                top_k)
    tf2onnx = _require("tf2onnx", "tf2onnx")
    onnx = _require("onnx", "onnx")
    if precision == "int8":
        quantization = _require("onnxruntime.quantization", "onnxruntime")

    def write(temporaries):
        # tf2onnx logs an op it cannot convert and writes it anyway: check what it wrote.
        model_proto, _ = tf2onnx.convert.from_function(
            function, input_signature=function.input_signature, opset=ONNX_OPSET,
            custom_op_handlers={"Erfc": (_erfc_as_one_minus_erf, [])})
        try:
            onnx.checker.check_model(model_proto, full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"tf2onnx wrote an invalid ONNX graph: {error}") from error
        if precision == "float32":
            onnx.save_model(model_proto, temporaries[0])
            return
        float_path = temporaries[0] + ".float32"
        onnx.save_model(model_proto, float_path)
        quantization.quantize_dynamic(float_path, temporaries[0],
                                      weight_type=quantization.QuantType.QInt8)

    return _publish(write, finals, verify)


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """tf2onnx handler: TensorFlow's exact GELU, 0.5 x erfc(-x / sqrt 2), uses Erfc, which
    ONNX lacks (and tf2onnx does not map); erfc(x) = 1 - erf(x) with ONNX's Erf."""
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    erf = ctx.make_node("Erf", [node.input[0]])
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


def export_openvino(model: keras.Model, path: str, *, precision: str = "float32",
                    calibration_images=None, top_k: int = 5, verify=None) -> str:
    """Writes `model` as an OpenVINO IR at `path` (.xml) and its weights beside it (.bin).

    Precisions:
        float32   weights stored in float32 (`compress_to_fp16=False`), inference hint f32;
        bfloat16  weights stored in float16 (`compress_to_fp16=True`, half the size; the CPU
                  plugin widens them), inference hint bf16 (AMX/AVX512-BF16 matmuls);
        int8      NNCF's post-training quantisation (transformer preset, SmoothQuant off,
                  7-bit weights for CPUs without VNNI) calibrated on `calibration_images`
                  (nncf, in the export extra), inference hint f32 for what stays float.
    The hint is stored in the model's rt_info under OPENVINO_HINT_KEY; OpenVINO 2026.4's
    compile_model does not apply it by itself: `run_exported` passes it, and an OpenVINO Model
    Server config must name it (docs/serving.md).

    Args:
        model: the classifier (see `serving_function`). Needs the TensorFlow backend.
        path: the .xml to write; neither it nor the .bin may exist.
        precision: one of OPENVINO_PRECISIONS.
        calibration_images: int8 only: float32 (n, size, size, 3) in [0, 255].
        top_k, verify: as `export_litert` (verify is given the temporary .xml).

    Returns:
        `path`.
    """
    finals, function = _prepare(model, path, (".xml", ".bin"), precision, OPENVINO_PRECISIONS,
                                "OpenVINO", top_k)
    ov = _require("openvino", "openvino")
    if precision == "int8":
        nncf = _require("nncf", "NNCF (OpenVINO's post-training quantisation)",
                        install="it: pip install nncf")
        calibration = _calibration_batches(calibration_images, served_image_size(model))

    def write(temporaries):
        with tempfile.TemporaryDirectory() as saved_model_dir:
            _write_saved_model(function, saved_model_dir)
            ov_model = ov.convert_model(saved_model_dir)
        if precision == "int8":
            dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
            # Without SmoothQuant (on by default for transformers): on this project's ViTs it
            # moved probabilities 2-4x more (bench/NOTES.md, "Precision on trained models").
            # Weights in 7 bits in every layer (NNCF's default: the first only): CPUs without
            # VNNI (AVX2, AVX-512 before VNNI) saturate a 16-bit sum of u8 x s8 products, which
            # cost a third of top-1 agreement on an AVX2 CPU (bench/NOTES.md, "Every Dense
            # as a 2-D MatMul"); OpenVINO's saturation-issue guide gives this fix.
            advanced = nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1),
                overflow_fix=nncf.OverflowFix.ENABLE)
            ov_model = nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                     advanced_parameters=advanced)
        ov_model.set_rt_info(_OPENVINO_HINTS[precision], list(OPENVINO_HINT_KEY))
        ov.save_model(ov_model, temporaries[0], compress_to_fp16=precision == "bfloat16")

    return _publish(write, finals, verify)


EXPORTERS = {"litert": export_litert, "onnx": export_onnx, "openvino": export_openvino}
PRECISIONS = {"litert": LITERT_PRECISIONS, "onnx": ONNX_PRECISIONS,
              "openvino": OPENVINO_PRECISIONS}
