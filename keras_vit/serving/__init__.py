"""Serving: export to TensorFlow Serving SavedModels (`export`) and a client for them (`client`).

    from keras_vit import serving
    exported = serving.export_classifier(model, "/models/vit", class_names=names)

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
from keras_vit.serving.signatures import (
    BYTES_INPUT,
    CLASS_NAMES_ASSET,
    OUTPUTS,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
)
