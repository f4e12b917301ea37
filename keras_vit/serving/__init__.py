"""Serving: export to TensorFlow Serving SavedModels (`export`) and a client for them (`client`).

    from keras_vit import serving
    exported = serving.export_classifier(model, "/models/vit", class_names=names)
    exported = serving.export_classifier(model, "/models/vit", precision="bfloat16",
                                         warmup_batch_sizes=(1, 8), warmup_images=[jpeg_bytes])
    exported = serving.export_classifier(
        model, "/models/vit", signatures=serving.ALL_SIGNATURES,
        feature_options=serving.FeatureOptions(output="spatial", block=-2))

    from keras_vit.serving import client  # not imported here: only clients need it
    predictions = client.predict_rest("localhost:8501", "vit", image_bytes=[jpeg_bytes])

See docs/serving.md.
"""

from keras_vit.serving.export import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ExportedModel,
    ExportError,
    build_archive,
    checked_signatures,
    existing_versions,
    export_classifier,
    next_version,
    remove_stale_exports,
    served_image_size,
    variables_bytes,
    weight_bytes,
)
from keras_vit.serving.precision import PRECISIONS, bfloat16_model, variable_dtypes, weight_casts
from keras_vit.serving.representations import ExplainOptions, FeatureOptions
from keras_vit.serving.signatures import (
    ALL_SIGNATURES,
    BYTES_INPUT,
    CLASS_NAMES_ASSET,
    DEFAULT_SIGNATURES,
    EXPLAIN_OUTPUTS,
    EXPLAIN_SIGNATURE,
    FEATURES_OUTPUT,
    FEATURES_SIGNATURE,
    IMAGE_TENSOR_INPUT,
    IMAGE_TENSOR_SIGNATURE,
    OUTPUTS,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    REQUIRED_SIGNATURES,
    SERVING_SIGNATURE,
    SIGNATURE_INPUTS,
    SIGNATURES,
    TF_EXAMPLE_INPUT,
    TF_EXAMPLE_SIGNATURE,
    WARMUP_FILE,
)
from keras_vit.serving.warmup import DEFAULT_WARMUP_BATCH_SIZES, default_warmup_image
