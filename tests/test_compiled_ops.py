"""pipelines.compiled_ops: the compiled resize+flip op against TensorFlow's ops, its build cache
and its fallback, and the training pipeline with either resize kernel."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import pipelines
from pipelines import augment, compiled_ops

REPO = Path(__file__).resolve().parents[1]

needs_compiler = pytest.mark.skipif(
    not compiled_ops.compiler_available(),
    reason=f"no C++ compiler {compiled_ops.compiler()!r} to build the op")


@pytest.fixture(scope="module")
def resize_op():
    return compiled_ops.load_resize_op(required=True)


def tensorflow_resize_and_flip(image, size, flip):
    """The truth: TensorFlow's Cast + ResizeBilinear (half-pixel centers), then a mirror."""
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear").numpy()
    return resized[:, ::-1] if flip else resized


@needs_compiler
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("in_shape,size", [
    ((281, 344), (224, 224)),   # downscale, the common Inception crop
    ((97, 120), (224, 224)),    # upscale
    ((300, 40), (64, 200)),     # down in y, up in x, non-square output
    ((1, 1), (5, 7)),           # a single pixel
    ((2, 500), (3, 1)),         # one output column
    ((224, 224), (224, 224)),   # identity
])
def test_op_equals_tensorflow_resize_and_flip(resize_op, in_shape, size, flip):
    image = np.random.default_rng(sum(in_shape)).integers(0, 256, (*in_shape, 3), dtype=np.uint8)
    got = resize_op.resize_bilinear_flip(image, size, flip).numpy()
    assert got.dtype == np.float32 and got.shape == (*size, 3)
    np.testing.assert_allclose(got, tensorflow_resize_and_flip(image, size, flip), atol=1e-3)


@needs_compiler
def test_op_on_real_photographs(resize_op):
    """Real ImageNet crops (skips without shared data): equal to TensorFlow's ops to 1e-3."""
    from conftest import shared_data

    folder = shared_data("imagenet", "sample_images")
    rng = np.random.default_rng(0)
    for path in sorted(folder.glob("*.JPEG"))[:20]:
        image = tf.io.decode_jpeg(path.read_bytes(), channels=3).numpy()
        h, w = image.shape[:2]
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        crop = image[top: top + rng.integers(16, h - top + 1), left: left + rng.integers(16, w - left + 1)]
        flip = bool(rng.integers(2))
        got = compiled_ops.resize_bilinear_flip(resize_op, crop, 224, tf.constant(flip)).numpy()
        np.testing.assert_allclose(got, tensorflow_resize_and_flip(crop, [224, 224], flip),
                                   atol=1e-3, err_msg=path.name)


@needs_compiler
def test_op_rejects_bad_input(resize_op):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image must be \(height, width, 3\)"):
        resize_op.resize_bilinear_flip(tf.zeros([4, 4, 1], tf.uint8), [2, 2], False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty image"):
        tf.function(lambda x: resize_op.resize_bilinear_flip(x, [2, 2], False))(
            tf.zeros([0, 4, 3], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="size must be positive"):
        resize_op.resize_bilinear_flip(tf.zeros([4, 4, 3], tf.uint8), [0, 2], False)


def test_flip_decision_is_tensorflows():
    """The pipeline's flip decision is the one `stateless_random_flip_left_right` makes."""
    image = tf.reshape(tf.range(2 * 3 * 3, dtype=tf.int32), [2, 3, 3])
    decisions = []
    for i in range(40):
        seed = tf.constant([i, 7], tf.int64)
        flip = bool(augment.random_flip_decision(seed))
        expected = tf.image.stateless_random_flip_left_right(image, seed)
        np.testing.assert_array_equal(augment.flip_left_right_if(image, tf.constant(flip)), expected)
        decisions.append(flip)
    assert 10 < sum(decisions) < 30  # both outcomes occur


_BUILD_AND_LOAD = """
import sys
from pipelines import compiled_ops
path = compiled_ops.library_path()
existed = path.exists()
library = compiled_ops.load_resize_op(required=True)
print(path, existed, float(library.resize_bilinear_flip([[[10, 20, 30]]], [1, 2], True)[0, 1, 2]))
"""


@needs_compiler
def test_library_is_built_once_and_cached(tmp_path):
    """Two fresh processes: the first builds into the cache, the second loads that file."""
    env = dict(os.environ, KERAS_VIT_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    runs = [subprocess.run([sys.executable, "-c", _BUILD_AND_LOAD], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    (first_path, first_existed, value), (second_path, second_existed, _) = (
        run.stdout.split() for run in runs)
    assert first_path == second_path and (first_existed, second_existed) == ("False", "True")
    assert float(value) == 30.0
    path = Path(first_path)
    assert path.parent == tmp_path / "ops" and f"tf{tf.__version__}" in path.name
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


_COMPARE_WITH_TENSORFLOW = """
import numpy as np, tensorflow as tf
from pipelines import compiled_ops
library = compiled_ops.load_resize_op(required=True)
rng = np.random.default_rng(0)
worst = 0.0
for shape, size in [((281, 344), (224, 224)), ((97, 120), (224, 224)), ((5, 1), (3, 9))]:
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    for flip in (False, True):
        truth = tf.image.resize(tf.cast(image, tf.float32), size).numpy()
        truth = truth[:, ::-1] if flip else truth
        got = library.resize_bilinear_flip(image, size, flip).numpy()
        worst = max(worst, float(np.abs(got - truth).max()))
print(compiled_ops.library_path().name, worst)
"""


@needs_compiler
def test_sse2_baseline_build_equals_tensorflow(tmp_path):
    """The clone that CPUs without AVX2 run, built alone (this machine would pick AVX2)."""
    env = dict(os.environ, KERAS_VIT_CACHE_DIR=str(tmp_path), PYTHONPATH=str(REPO),
               CXX=f"{compiled_ops.compiler()} -DKERAS_VIT_SSE2_ONLY")
    run = subprocess.run([sys.executable, "-c", _COMPARE_WITH_TENSORFLOW], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    name, worst = run.stdout.split()
    assert name != compiled_ops.library_path().name  # a build of its own
    assert float(worst) < 1e-3


@pytest.fixture
def no_library_loaded(tmp_path, monkeypatch):
    """A process state where the op was never loaded, with an empty cache."""
    monkeypatch.setenv("KERAS_VIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled_ops, "_library", None)
    monkeypatch.setattr(compiled_ops, "_errors", {})
    return tmp_path / "ops"


def test_without_a_compiler_auto_falls_back_and_compiled_raises(no_library_loaded, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-keras-vit")
    assert compiled_ops.load_resize_op() is None
    with pytest.raises(compiled_ops.CompiledOpError,
                       match="no C.. compiler 'no-such-compiler") as error:
        compiled_ops.load_resize_op(required=True)
    assert isinstance(error.value, pipelines.UserError) and isinstance(error.value, RuntimeError)
    assert not no_library_loaded.exists()


@needs_compiler
def test_an_unwritable_cache_is_reported(no_library_loaded, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("KERAS_VIT_CACHE_DIR", str(blocker))
    with pytest.raises(compiled_ops.CompiledOpError, match=r"cannot write the op cache .*"
                       r"not-a-folder.*KERAS_VIT_CACHE_DIR"):
        compiled_ops.load_resize_op(required=True)


def test_a_compile_error_is_reported_with_the_command(no_library_loaded, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(compiled_ops.CompiledOpError, match=r"(?s)compiling .*failed \(exit 1\).*"
                       "resize_kernel='tensorflow'"):
        compiled_ops.load_resize_op(required=True)
    assert list(no_library_loaded.iterdir()) == []  # nothing half-built left behind


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    pipelines.convert("digits:", out, split="train", num_shards=2, verbose=False)
    return out


@needs_compiler
def test_training_batches_equal_with_either_resize_kernel(digits_dir):
    """Same seed: the compiled op and TensorFlow's ops give the same crops, flips and pixels."""
    def first_batches(kernel):
        ds = pipelines.build_dataset(digits_dir, split="train", image_size=40, batch_size=32,
                                     deterministic=True, seed=3, shuffle_buffer=100,
                                     resize_kernel=kernel)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    compiled, reference = first_batches("compiled"), first_batches("tensorflow")
    for (x1, y1), (x2, y2) in zip(compiled, reference):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_allclose(x1, x2, atol=1e-3)


def test_resize_kernel_must_be_known(digits_dir):
    with pytest.raises(ValueError, match="resize_kernel must be one of"):
        pipelines.build_dataset(digits_dir, split="train", image_size=8, batch_size=4,
                                resize_kernel="opencv")


def test_eval_preprocessing_never_uses_the_op(digits_dir, monkeypatch):
    """Evaluation (and so serving) keeps TensorFlow's ops: the op is not even loaded."""
    def fail(required=False):
        raise AssertionError("evaluation loaded the compiled op")

    monkeypatch.setattr(compiled_ops, "load_resize_op", fail)
    ds = pipelines.build_dataset(digits_dir, split="train", training=False, image_size=16,
                                 batch_size=64)
    images = next(iter(ds))[0].numpy()
    assert images.shape == (64, 16, 16, 3)
