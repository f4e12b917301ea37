"""Names of the exported SavedModel's signatures, inputs, outputs, class-name asset and warmup
file.

Shared by the exporter and the client, the two ends of the serving contract.
"""

SERVING_SIGNATURE = "serving_default"  # input BYTES_INPUT: string (batch,) encoded images
PIXELS_SIGNATURE = "predict_pixels"  # input PIXELS_INPUT: float32 (batch, size, size, 3) in [0, 255]
# input TF_EXAMPLE_INPUT: string (batch,) serialized tf.train.Example holding `image/encoded`
TF_EXAMPLE_SIGNATURE = "predict_tf_example"
# input IMAGE_TENSOR_INPUT: uint8 (batch, height, width, 3), any height and width
IMAGE_TENSOR_SIGNATURE = "predict_image_tensor"
# input BYTES_INPUT, decoded as serving_default; output FEATURES_OUTPUT (feature_extractor's)
FEATURES_SIGNATURE = "features"
# input BYTES_INPUT, decoded as serving_default; OUTPUTS plus EXPLAIN_OUTPUTS (attention rollout)
EXPLAIN_SIGNATURE = "explain"
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "images"
TF_EXAMPLE_INPUT = "tf_examples"
IMAGE_TENSOR_INPUT = "image_tensor"
#: Each signature's one input, in the order the SavedModel lists them.
SIGNATURE_INPUTS = {
    SERVING_SIGNATURE: BYTES_INPUT,
    PIXELS_SIGNATURE: PIXELS_INPUT,
    TF_EXAMPLE_SIGNATURE: TF_EXAMPLE_INPUT,
    IMAGE_TENSOR_SIGNATURE: IMAGE_TENSOR_INPUT,
    FEATURES_SIGNATURE: BYTES_INPUT,
    EXPLAIN_SIGNATURE: BYTES_INPUT,
}
#: Every signature an export can hold, in the order the SavedModel lists them.
ALL_SIGNATURES = tuple(SIGNATURE_INPUTS)
#: What an export holds unless asked for more (`export_classifier(signatures=...)`).
DEFAULT_SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE, TF_EXAMPLE_SIGNATURE,
                      IMAGE_TENSOR_SIGNATURE)
#: Exported whatever is asked for: TF Serving's default, and what verification runs.
REQUIRED_SIGNATURES = (SERVING_SIGNATURE, PIXELS_SIGNATURE)
SIGNATURES = DEFAULT_SIGNATURES  # the name before `features` and `explain` existed
OUTPUTS = ("probabilities", "classes", "scores", "labels")  # all but `features`
FEATURES_OUTPUT = "features"
# explain's outputs beyond OUTPUTS: (batch, gh, gw) over the patch grid, (batch, S, S) pixels.
EXPLAIN_OUTPUTS = ("attention_rollout", "heatmap")
CLASS_NAMES_ASSET = "class_names.txt"
# Where TF Serving looks for warmup requests, relative to the version directory.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
