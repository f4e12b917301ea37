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
}
SIGNATURES = tuple(SIGNATURE_INPUTS)
OUTPUTS = ("probabilities", "classes", "scores", "labels")
CLASS_NAMES_ASSET = "class_names.txt"
# Where TF Serving looks for warmup requests, relative to the version directory.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
