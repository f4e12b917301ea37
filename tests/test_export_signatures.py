"""predict_tf_example, predict_image_tensor and the bfloat16 precision of the SavedModel export.

Truths checked against: `serving_default` of the same export on the same images (the signature
whose preprocessing is `pipelines.preprocess_for_eval` itself, checked against Keras and the
NumPy ViT in test_export.py), answered by a separate process that imports TensorFlow alone and
feeds each request through a session on the SignatureDef's tensor names, as TF Serving does;
for bfloat16, the float32 export's probabilities, the dtypes stored in the SavedModel's
variables/ (read by TensorFlow's checkpoint reader) and the ops of its graph (saved_model.pb).
"""

import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_vit
from keras_vit import serving
from pipelines import preprocess, records
from serving_helpers import (
    encode_image,
    sample_images,
    serve_in_tensorflow_only_process,
    strings,
    tiny_classifier,
)

IMAGE_SIZE = 16
NUM_CLASSES = 5
CROP = 0.875  # a central crop, so that both new signatures must apply it as serving_default does


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("npz"))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return serving.export_classifier(
        model, str(tmp_path_factory.mktemp("exports")), top_k=2, central_crop_fraction=CROP,
        warmup_batch_sizes=())


def _example(image_bytes, **extra):
    return records.encode_example(image_bytes, image_format="png", label=3, height=1, width=1,
                                  **extra)


def _generated(count, height=20, width=30, seed=0):
    """(PNG bytes, their uint8 pixels) of `count` random images of one size."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    return [encode_image(array, "PNG") for array in arrays], arrays


def _real_same_size(count):
    """Real photos cut to one size (their common central part), re-encoded as lossless PNG so
    that serving_default decodes exactly the pixels image_tensor is sent."""
    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in
              sample_images(count)]
    height = min(array.shape[0] for array in arrays)
    width = min(array.shape[1] for array in arrays)
    cut = []
    for array in arrays:
        top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
        cut.append(np.ascontiguousarray(array[top:top + height, left:left + width]))
    return [encode_image(array, "PNG") for array in cut], cut


def _same_requests(encoded, arrays, prefix):
    """The same images to the three signatures taking whole images, batch 1 and 3."""
    requests = {}
    for batch in ([0], [1], [0, 1, 2]):
        tag = f"{prefix}_{'_'.join(map(str, batch))}"
        requests[f"serving_default:{tag}"] = strings(*[encoded[i] for i in batch])
        requests[f"predict_tf_example:{tag}"] = strings(*[_example(encoded[i]) for i in batch])
        requests[f"predict_image_tensor:{tag}"] = np.stack([arrays[i] for i in batch])
    return requests


def _assert_same_answers(answers, tags):
    for tag in tags:
        expected = answers[f"serving_default:{tag}"]
        assert "probabilities" in expected, expected
        for signature in ("predict_tf_example", "predict_image_tensor"):
            answer = answers[f"{signature}:{tag}"]
            assert "probabilities" in answer, (signature, tag, answer)
            np.testing.assert_allclose(answer["probabilities"], expected["probabilities"],
                                       rtol=1e-5, atol=1e-7, err_msg=f"{signature} {tag}")
            assert answer["classes"] == expected["classes"], (signature, tag)


def test_signatures_and_their_inputs(exported):
    loaded = tf.saved_model.load(exported.path)
    assert list(loaded.signatures) == list(serving.SIGNATURES)
    specs = {name: loaded.signatures[name].structured_input_signature[1]
             for name in serving.SIGNATURES}
    assert specs["predict_tf_example"] == {
        "tf_examples": tf.TensorSpec([None], tf.string, "tf_examples")}
    assert specs["predict_image_tensor"] == {
        "image_tensor": tf.TensorSpec([None, None, None, 3], tf.uint8, "image_tensor")}
    for name in serving.SIGNATURES:
        outputs = loaded.signatures[name].structured_outputs
        assert {key: (spec.dtype, tuple(spec.shape)) for key, spec in outputs.items()} == {
            "probabilities": (tf.float32, (None, NUM_CLASSES)), "classes": (tf.int32, (None, 2)),
            "scores": (tf.float32, (None, 2)), "labels": (tf.string, (None, 2))}


@pytest.mark.slow
def test_new_signatures_equal_serving_default_on_generated_images(exported, tmp_path):
    encoded, arrays = _generated(3)
    answers = serve_in_tensorflow_only_process(
        exported.path, _same_requests(encoded, arrays, "generated"), tmp_path)
    _assert_same_answers(answers, ["generated_0", "generated_1", "generated_0_1_2"])
    # Differing images, differing answers (guards against a constant model).
    assert answers["serving_default:generated_0"] != answers["serving_default:generated_1"]


@pytest.mark.slow
def test_new_signatures_equal_serving_default_on_real_images(exported, tmp_path):
    encoded, arrays = _real_same_size(3)
    # Each photo whole as well, as the JPEG a client sends (image_tensor: decoded as served).
    requests = _same_requests(encoded, arrays, "real")
    for index, data in enumerate(sample_images(3)):
        requests[f"serving_default:jpeg_{index}"] = strings(data)
        requests[f"predict_tf_example:jpeg_{index}"] = strings(_example(data))
        requests[f"predict_image_tensor:jpeg_{index}"] = preprocess.decode_rgb(
            tf.constant(data)).numpy()[np.newaxis]
    answers = serve_in_tensorflow_only_process(exported.path, requests, tmp_path)
    _assert_same_answers(
        answers, ["real_0", "real_1", "real_0_1_2", "jpeg_0", "jpeg_1", "jpeg_2"])


def _bad_requests():
    good_png = _generated(1)[0][0]
    no_image = tf.train.Example(features=tf.train.Features(feature={
        records.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}))
    scalar = np.empty((), object)
    scalar[()] = _example(good_png)
    pixels = np.zeros((1, 20, 30, 3), np.uint8)
    return {
        "predict_image_tensor:rank_3": pixels[0],
        "predict_image_tensor:rank_5": pixels[np.newaxis],
        "predict_image_tensor:one_channel": pixels[..., :1],
        "predict_image_tensor:four_channels": np.zeros((1, 20, 30, 4), np.uint8),
        "predict_image_tensor:zero_height": np.zeros((1, 0, 30, 3), np.uint8),
        "predict_image_tensor:float32": pixels.astype(np.float32),
        "predict_tf_example:rank_2": strings(_example(good_png)).reshape(1, 1),
        "predict_tf_example:rank_0": scalar,
        "predict_tf_example:not_an_example": strings(
            _example(good_png), b"<html>not an Example</html>"),
        "predict_tf_example:no_image_feature": strings(no_image.SerializeToString()),
        "predict_tf_example:two_images": strings(
            tf.train.Example(features=tf.train.Features(feature={
                records.IMAGE_ENCODED: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[good_png, good_png]))})
            ).SerializeToString()),
        "predict_tf_example:not_an_image": strings(_example(good_png), _example(b"<html>not an image</html>")),
        "predict_tf_example:int64": np.zeros([1], np.int64),
    }


_EXPECTED = {
    "rank_3": ["input `image_tensor`", "(batch, height, width, 3)", "got shape] [20 30 3]"],
    "rank_5": ["input `image_tensor`", "got shape] [1 1 20 30 3]"],
    "one_channel": ["input `image_tensor`", "got shape] [1 20 30 1]"],
    "four_channels": ["input `image_tensor`", "got shape] [1 20 30 4]"],
    "zero_height": ["input `image_tensor`", "at least 1", "got shape] [1 0 30 3]"],
    # TensorFlow itself refuses a feed of another dtype, naming the signature's input.
    "float32": ["predict_image_tensor_image_tensor", "float", "uint8"],
    "rank_2": ["input `tf_examples`", "string vector", "got shape] [1 1]"],
    "rank_0": ["input `tf_examples`", "got shape] []"],
    "not_an_example": ["input `tf_examples`", "tf_examples[1] is not a serialized "
                       "tf.train.Example"],
    "no_image_feature": ["input `tf_examples`", "tf_examples[0] has no `image/encoded` bytes"],
    # Past its first byte the proto is ParseExampleV2's to refuse, in the op named after the input.
    "two_images": ["predict_tf_example_tf_examples", "image/encoded"],
    "not_an_image": ["not a decodable image", "tf_examples[1]"],
    "int64": ["predict_tf_example_tf_examples", "int64", "string"],
}


@pytest.mark.slow
def test_bad_requests_are_refused_naming_the_input_and_the_process_serves_on(exported, tmp_path):
    encoded, arrays = _generated(3)
    good = _same_requests(encoded, arrays, "good")
    bad = _bad_requests()
    # The good requests once before the bad ones and once after (npz keys keep their order).
    requests = {**good, **bad, **{key + "_after": value for key, value in good.items()}}
    answers = serve_in_tensorflow_only_process(exported.path, requests, tmp_path)
    assert set(_EXPECTED) == {key.split(":")[1] for key in bad}
    for key in bad:
        case = key.split(":")[1]
        answer = answers[key]
        assert answer.get("code") == "INVALID_ARGUMENT", (key, answer)
        for word in _EXPECTED[case]:
            assert word in answer["error"], (key, word, answer["error"][:600])
    for key in good:
        assert answers[key + "_after"] == answers[key], key


def test_image_tensor_cap_and_empty_batch(model, tmp_path):
    exported = serving.export_classifier(model, str(tmp_path), max_image_pixels=500, top_k=2,
                                         warmup_batch_sizes=())
    serve = tf.saved_model.load(exported.path).signatures["predict_image_tensor"]
    assert serve(image_tensor=tf.zeros([2, 20, 25, 3], tf.uint8))["probabilities"].shape == (2, 5)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)input `image_tensor`: image too large.*500 pixels.*20 26 3"):
        serve(image_tensor=tf.zeros([1, 20, 26, 3], tf.uint8))
    empty = serve(image_tensor=tf.zeros([0, 7, 9, 3], tf.uint8))
    assert empty["probabilities"].shape == (0, 5) and empty["labels"].shape == (0, 2)
    examples = tf.saved_model.load(exported.path).signatures["predict_tf_example"]
    assert examples(tf_examples=tf.constant([], tf.string))["classes"].shape == (0, 2)


# bfloat16: weights stored in bfloat16, no weight cast per call, outputs float32.


@pytest.fixture(scope="module")
def bfloat16_export(model, tmp_path_factory):
    return serving.export_classifier(model, str(tmp_path_factory.mktemp("bf16")), top_k=2,
                                     precision="bfloat16", warmup_batch_sizes=())


def _keeps_float32(weight_path):
    # LayerNorm scales and offsets (computed in float32 by Keras) and the head (float32 logits).
    return "norm" in weight_path or weight_path.startswith("head/")


def test_bfloat16_variables_are_stored_in_bfloat16(model, bfloat16_export):
    dtypes = serving.variable_dtypes(bfloat16_export.path)
    kept = [weight for weight in model.weights if _keeps_float32(weight.path)]
    assert kept and len(kept) < len(model.weights) / 2
    assert sorted(dtypes.values()) == sorted(
        ["float32"] * len(kept) + ["bfloat16"] * (len(model.weights) - len(kept)))
    expected_bytes = sum(
        int(np.prod(weight.shape)) * (4 if _keeps_float32(weight.path) else 2)
        for weight in model.weights)
    assert bfloat16_export.weight_bytes == expected_bytes
    assert bfloat16_export.precision == "bfloat16"
    assert expected_bytes < 0.6 * serving.weight_bytes(model)  # ~half the float32 weights


def test_bfloat16_graph_casts_no_weight(bfloat16_export, tmp_path):
    assert serving.weight_casts(bfloat16_export.path) == []
    # The check finds what it looks for: mixed_bfloat16 casts every float32 weight per call.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = keras_vit.create_model(keras_vit.ViTConfig(4, 32, 2, 4, 64),
                                       image_size=IMAGE_SIZE, num_classes=3)
    finally:
        keras.config.set_dtype_policy(previous)
    # Keras's own export keeps the policy (export_classifier would export a float32 copy).
    mixed.export(str(tmp_path / "mixed"), format="tf_saved_model", verbose=False)
    casts = serving.weight_casts(str(tmp_path / "mixed"))
    assert len(casts) >= 10, casts
    float32_export = serving.export_classifier(mixed, str(tmp_path / "f32"), warmup_batch_sizes=())
    assert serving.weight_casts(float32_export.path) == []


@pytest.mark.slow
def test_bfloat16_probabilities_near_float32(model, exported, bfloat16_export, tmp_path):
    float32_export = serving.export_classifier(model, str(tmp_path / "f32"), top_k=2,
                                               warmup_batch_sizes=())
    try:
        real = sample_images(3)
    except pytest.skip.Exception:
        real = []
    generated, arrays = _generated(4, seed=5)
    rng = np.random.default_rng(6)
    pixels = rng.uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    requests = {"serving_default:images": strings(*(generated + real)),
                "predict_pixels:pixels": pixels,
                "predict_image_tensor:tensor": np.stack(arrays)}
    answers = {}
    for name, export in (("float32", float32_export), ("bfloat16", bfloat16_export)):
        (tmp_path / name).mkdir()
        answers[name] = serve_in_tensorflow_only_process(export.path, requests, tmp_path / name)
    for key in requests:
        float32 = np.array(answers["float32"][key]["probabilities"])
        bfloat16 = np.array(answers["bfloat16"][key]["probabilities"])
        assert bfloat16.shape == float32.shape
        difference = np.abs(bfloat16 - float32).max()
        assert 0 < difference < 2e-2, (key, difference)  # 0: not bfloat16 at all
    outputs = tf.saved_model.load(bfloat16_export.path).signatures["predict_pixels"](
        images=tf.constant(pixels))
    assert outputs["probabilities"].dtype == tf.float32 and outputs["scores"].dtype == tf.float32


def test_unknown_precision_is_refused_before_writing(model, tmp_path):
    with pytest.raises(serving.ExportError, match=r"precision must be one of float32, bfloat16"):
        serving.export_classifier(model, str(tmp_path / "vit"), precision="float16")
    assert not (tmp_path / "vit").exists()
