"""Serving: export to TensorFlow Serving SavedModels (`export`) and a client for them (`client`).

    from keras_vit import serving
    exported = serving.export_classifier(model, "/models/vit", class_names=names)
    exported = serving.export_classifier(model, "/models/vit", precision="bfloat16",
                                         warmup_batch_sizes=(1, 8), warmup_images=[jpeg_bytes])

    from keras_vit.serving import client  # not imported here: only clients need it
    predictions = client.predict_rest("localhost:8501", "vit", image_bytes=[jpeg_bytes])

See docs/serving.md.
"""

from keras_vit.serving.export import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ExportedModel,
    ExportError,
    build_archive,
    existing_versions,
    export_classifier,
    next_version,
    remove_stale_exports,
    variables_bytes,
    weight_bytes,
)
from keras_vit.serving.precision import PRECISIONS, bfloat16_model, variable_dtypes, weight_casts
from keras_vit.serving.signatures import (
    BYTES_INPUT,
    CLASS_NAMES_ASSET,
    IMAGE_TENSOR_INPUT,
    IMAGE_TENSOR_SIGNATURE,
    OUTPUTS,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    SIGNATURE_INPUTS,
    SIGNATURES,
    TF_EXAMPLE_INPUT,
    TF_EXAMPLE_SIGNATURE,
    WARMUP_FILE,
)
from keras_vit.serving.warmup import DEFAULT_WARMUP_BATCH_SIZES, default_warmup_image
