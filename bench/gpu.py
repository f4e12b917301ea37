r"""Training throughput and model FLOPs utilization (MFU) of keras_vit under the JAX backend.

    KERAS_BACKEND=jax python bench/gpu.py                               # B/16, 224, bf16, GPU
    python bench/gpu.py --variant=d32_l1_h2_m64_p8 \
        --image_size=16 --batch_size=8 --repeats=2                       # tiny, runs on a CPU

Meant for an accelerator machine that has JAX but not TensorFlow: this script imports no
TensorFlow (keras_vit's model code is backend-neutral). It times, alternating after warm-up,
  - one training step of keras_vit (forward, backward, AdamW update) as `model.fit` runs it
    under JAX (`train_on_batch`, jit-compiled, synchronized by fetching the loss);
  - a (batch·tokens, D) @ (D, mlp_dim) matrix multiply in the compute dtype (the model's MLP
    shape), under `jax.jit`, as the device's reachable rate;
and reports images/s and MFU = model FLOP/s (keras_vit.flops: 2 per multiply-add, training
step 3× forward, counting the last block for the class token alone as the model runs it) /
measured matmul FLOP/s. The last line is
    gpu_train images_per_s=X mfu=Y device=NAME
"""

import datetime
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from absl import app, flags, logging  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_vit  # noqa: E402
from keras_vit import flops  # noqa: E402
from keras_vit.model import create_model  # noqa: E402

from timing import MATMULS_PER_CALL, interleaved_medians  # noqa: E402

_VARIANT = flags.DEFINE_string(
    "variant", "B/16", "A keras_vit variant (B/16, S/16, ...) or a custom d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch>.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side in pixels.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 256,
    "Images per step: large enough to keep a GPU busy (not tuned here: no GPU was available).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Width of the classification head.")
_PRECISION = flags.DEFINE_enum(
    "precision", "mixed_bfloat16", ["mixed_bfloat16", "float32"], "Keras dtype policy.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each case first (compilation).")


def training_case(config, image_size, batch_size, num_classes, policy):
    """A callable running one jit-compiled keras_vit training step to completion."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = create_model(config, image_size=image_size, num_classes=num_classes)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, (batch_size,)).astype(np.int32)
    images, labels = jax.device_put(images), jax.device_put(labels)

    def step():
        # train_on_batch returns NumPy values, so the step has finished when it returns.
        return model.train_on_batch(images, labels)

    return step


def matmul_case(rows, inner, columns, dtype):
    """A callable running `MATMULS_PER_CALL` jitted (rows, inner) @ (inner, columns) matmuls to
    completion, each with its own operands and returned whole (so none is simplified away)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * MATMULS_PER_CALL)
    lefts = [jax.random.normal(k, (rows, inner), dtype) for k in keys[:MATMULS_PER_CALL]]
    rights = [jax.random.normal(k, (inner, columns), dtype) for k in keys[MATMULS_PER_CALL:]]
    products = jax.jit(lambda ls, rs: [jnp.matmul(a, b) for a, b in zip(ls, rs)])
    return lambda: jax.block_until_ready(products(lefts, rights))


def main(argv):
    del argv
    try:
        config = keras_vit.parse_variant(_VARIANT.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    size, batch = _IMAGE_SIZE.value, _BATCH_SIZE.value
    if size % config.patch_size:
        raise app.UsageError(
            f"--image_size={size} is not a multiple of the patch size {config.patch_size}.")
    if keras.backend.backend() != "jax":
        raise app.UsageError(
            f"bench/gpu.py measures the JAX backend; KERAS_BACKEND is {keras.backend.backend()!r}. "
            "Run it with KERAS_BACKEND=jax (or unset).")
    if batch < 1 or _REPEATS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--batch_size and --repeats must be >= 1, --warmup >= 0.")
    device = jax.devices()[0]
    logging.info("device %s (%s), %s", device.device_kind, device.platform, _PRECISION.value)
    compute_dtype = jnp.bfloat16 if _PRECISION.value == "mixed_bfloat16" else jnp.float32
    tokens = (size // config.patch_size) ** 2 + 1
    cases = {
        "train": training_case(config, size, batch, _NUM_CLASSES.value, _PRECISION.value),
        "matmul": matmul_case(batch * tokens, config.hidden_size, config.mlp_dim, compute_dtype),
    }
    medians = interleaved_medians(cases, repeats=_REPEATS.value, warmup=_WARMUP.value)
    medians["matmul"] /= MATMULS_PER_CALL

    # What the model runs: its last block computes the class token alone (keras_vit.flops).
    step_flops = batch * flops.training_step_flops(
        config, image_size=size, num_classes=_NUM_CLASSES.value, class_token_only=True)
    model_rate = step_flops / medians["train"]
    matmul_rate = flops.mlp_matmul_flops(config, batch, image_size=size) / medians["matmul"]
    images_per_s = batch / medians["train"]
    mfu = model_rate / matmul_rate
    name = device.device_kind.replace(" ", "_")
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {device.platform} {device.device_kind}; "
          f"load average {os.getloadavg()[0]:.2f}; JAX {jax.__version__}, Keras {keras.__version__}")
    print(f"# {config}, image {size}, batch {batch}, {_PRECISION.value}; medians of "
          f"{_REPEATS.value} alternating rounds; FLOP: 2/multiply-add, training step 3x forward, "
          f"the last block for the class token only, as the model runs it")
    print(f"train step  {medians['train'] * 1e3:10.4g} ms  {images_per_s:10.4g} images/s  "
          f"{model_rate / 1e9:10.4g} GFLOP/s")
    print(f"MLP matmul  {medians['matmul'] * 1e3:10.4g} ms  {matmul_rate / 1e9:10.4g} GFLOP/s "
          f"({batch * tokens}x{config.hidden_size} @ {config.hidden_size}x{config.mlp_dim}, "
          f"{jnp.dtype(compute_dtype).name})")
    print(f"gpu_train images_per_s={images_per_s:.2f} mfu={mfu:.4f} device={name}")


if __name__ == "__main__":
    app.run(main)
