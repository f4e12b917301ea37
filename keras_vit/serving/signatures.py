"""Names of the exported SavedModel's signatures, inputs, outputs and class-name asset.

Shared by the exporter and the client, the two ends of the serving contract.
"""

SERVING_SIGNATURE = "serving_default"  # input BYTES_INPUT: string (batch,) encoded images
PIXELS_SIGNATURE = "predict_pixels"  # input PIXELS_INPUT: float32 (batch, size, size, 3) in [0, 255]
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "images"
OUTPUTS = ("probabilities", "classes", "scores", "labels")
CLASS_NAMES_ASSET = "class_names.txt"
