r"""Speed of keras_vit against keras-hub's ViT on this machine (TensorFlow backend).

    python bench/model.py --variant=B/16 --image_size=224 --batch_size=8 --compare=keras_hub
    python bench/model.py --variant=S/16 --repeats=3                      # quicker
    python bench/model.py --variant=d32_l1_h2_m64_p8 \
        --image_size=16 --repeats=2 --warmup=1                             # seconds

In one process, for each precision (float32, then the mixed_bfloat16 policy), builds both
models and times, alternating round by round after warm-up, the median of `--repeats` calls of:
  - forward: `model(images, training=False)` under `tf.function` (what `predict` runs);
  - train: the model's own Keras `train_step` (forward, backward, AdamW update; what `fit`
    runs) under `tf.function`. keras-hub's side uses `keras.optimizers.AdamW` (keras-hub has
    no optimizer of its own); keras_vit's uses the optimizer its trainer builds, `FusedAdamW`
    (the same AdamW arithmetic in one TensorFlow kernel per variable); with
    `--keras_vit_optimizer=fused,keras` also keras_vit with `keras.optimizers.AdamW` (rows
    `keras_vit_adamw`, train only, and a `models_alone` line), to compare the models alone.
    All: learning rate 1e-4, Keras's default weight decay 0.004 on every variable.
Each case with XLA off and on (`jit_compile`); and a (batch·tokens, D) @ (D, mlp_dim) matrix
multiply in the precision's compute dtype as the machine's reference rate (`MATMULS_PER_CALL`
of them per timed call, each with its own operands).

FLOP convention (keras_vit.flops): 2 per multiply-add, matrix multiplies only, a training step
3× a forward; ViT-B/16 at 224 is 35.13 GFLOP per image forward. GFLOP/s and %matmul count what
each implementation runs: keras_vit's classifier computes its last block for the class token
alone (32.93 GFLOP for B/16), keras-hub's backbone every token.

Prints one row per case, the best setting of each (implementation, precision, mode), and as
the last line:
    speedup_vs_keras_hub fp32_infer=X bf16_infer=Y fp32_train=Z
(images/s ratios, same precision, each side at its best XLA setting; "n/a" without keras-hub).
"""

import datetime
import os
import platform

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_vit  # noqa: E402
from keras_vit import flops  # noqa: E402
from keras_vit.training.fused_optimizers import FusedAdamW  # noqa: E402

from timing import MATMULS_PER_CALL, interleaved_medians  # noqa: E402

PRECISIONS = {"float32": ("fp32", "float32"), "mixed_bfloat16": ("bf16", "bfloat16")}
# keras_vit_adamw: keras_vit trained with keras.optimizers.AdamW (--keras_vit_optimizer=keras).
IMPLEMENTATIONS = ("keras_vit", "keras_vit_adamw", "keras_hub")
_OPTIMIZER_IMPLEMENTATION = {"fused": "keras_vit", "keras": "keras_vit_adamw"}

_VARIANT = flags.DEFINE_string(
    "variant", "B/16", "A keras_vit variant (B/16, S/16, ...) or a custom d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch>.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Width of the classification head.")
_COMPARE = flags.DEFINE_enum(
    "compare", "keras_hub", ["keras_hub", "none"],
    "Also time keras-hub's ViTBackbone + Dense head (needs the keras-hub package).")
_KERAS_VIT_OPTIMIZER = flags.DEFINE_list(
    "keras_vit_optimizer", ["fused"],
    "keras_vit's AdamW in the train cases, one or both: fused (keras_vit.training's FusedAdamW, "
    "what tools/train.py uses; rows 'keras_vit') and keras (keras.optimizers.AdamW as on "
    "keras-hub's side, to compare the models alone; rows 'keras_vit_adamw', train only).")
_PRECISIONS = flags.DEFINE_list(
    "precisions", list(PRECISIONS), f"Keras dtype policies to time, of {list(PRECISIONS)}.")
_XLA = flags.DEFINE_list("xla", ["off", "on"], "jit_compile settings to time: off, on.")
_MODES = flags.DEFINE_list("modes", ["infer", "train"], "What to time: infer, train.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls of each case before timing.")
_INTERLEAVE_PRECISIONS = flags.DEFINE_boolean(
    "interleave_precisions", True,
    "Build the models of every precision at once and alternate all cases together, so bf16/fp32 "
    "ratios see the same load (B/16: ~10 GB of memory); false times one precision at a time.")


def build_keras_hub(config, image_size, num_classes):
    """keras-hub's ViTBackbone with the same input scaling and a float32 Dense head on the class token."""
    import keras_hub

    images = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(images)
    x = keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=config.patch_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_size,
        mlp_dim=config.mlp_dim,
    )(x)
    x = keras.layers.Dense(num_classes, dtype="float32", name="head")(x[:, 0])
    return keras.Model(images, x, name="keras_hub_vit")


def build(implementation, config, image_size, num_classes):
    if implementation.startswith("keras_vit"):
        return keras_vit.create_model(config, image_size=image_size, num_classes=num_classes)
    return build_keras_hub(config, image_size, num_classes)


def _optimizer(implementation):
    if implementation == "keras_vit":
        return FusedAdamW(learning_rate=1e-4)
    return keras.optimizers.AdamW(learning_rate=1e-4)


def _compile(model, implementation):
    model.compile(
        optimizer=_optimizer(implementation),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )


def model_cases(name, model, images, labels, xla_settings, modes):
    """{case name: callable} for one built model; each call runs one step to completion."""
    _compile(model, name)
    model.train_on_batch(images, labels)  # Builds the optimizer's slots outside any tf.function.
    cases = {}
    for xla in xla_settings:
        if "infer" in modes:
            forward = tf.function(lambda x, m=model: m(x, training=False), jit_compile=xla)
            cases[(name, xla, "infer")] = lambda f=forward: f(images).numpy()
        if "train" in modes:
            # The model's own train_step, wrapped as Keras's make_train_function wraps it.
            step = tf.function(model.train_step, jit_compile=xla)
            cases[(name, xla, "train")] = lambda f=step: f((images, labels))["loss"].numpy()
    return cases


def matmul_cases(config, batch_size, image_size, dtype, xla_settings):
    """The model's MLP matrix multiply (batch·tokens, D) @ (D, mlp_dim) in `dtype`.

    Each call runs `MATMULS_PER_CALL` of them in sequence, each with its own operands (as each
    layer of a model has its own weights; it also keeps graph rewrites from merging them), and
    returns every product whole (a slice of a product would let XLA compute only that slice).
    """
    tokens = (image_size // config.patch_size) ** 2 + 1
    rng = np.random.default_rng(0)
    operands = [
        (tf.constant(rng.standard_normal((batch_size * tokens, config.hidden_size)), dtype=dtype),
         tf.constant(rng.standard_normal((config.hidden_size, config.mlp_dim)), dtype=dtype))
        for _ in range(MATMULS_PER_CALL)]

    def products():
        outputs = []
        for a, b in operands:
            with tf.control_dependencies(outputs[-1:]):  # one at a time, as inside the model
                outputs.append(tf.matmul(a, b))
        return outputs

    cases = {}
    for xla in xla_settings:
        product = tf.function(products, jit_compile=xla)
        cases[("matmul", xla, "mlp")] = lambda f=product: f()[-1][0, 0].numpy()
    return cases


def _check_flags():
    for value in _PRECISIONS.value:
        if value not in PRECISIONS:
            raise app.UsageError(f"--precisions: unknown {value!r}; expected some of {list(PRECISIONS)}.")
    if not _KERAS_VIT_OPTIMIZER.value or any(
            value not in _OPTIMIZER_IMPLEMENTATION for value in _KERAS_VIT_OPTIMIZER.value):
        raise app.UsageError(f"--keras_vit_optimizer: {_KERAS_VIT_OPTIMIZER.value}; expected fused "
                             "and/or keras.")
    for value in _XLA.value:
        if value not in ("off", "on"):
            raise app.UsageError(f"--xla: unknown {value!r}; expected off and/or on.")
    for value in _MODES.value:
        if value not in ("infer", "train"):
            raise app.UsageError(f"--modes: unknown {value!r}; expected infer and/or train.")
    if _BATCH_SIZE.value < 1 or _REPEATS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--batch_size and --repeats must be >= 1, --warmup >= 0.")
    try:
        config = keras_vit.parse_variant(_VARIANT.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    if _IMAGE_SIZE.value % config.patch_size:
        raise app.UsageError(
            f"--image_size={_IMAGE_SIZE.value} is not a multiple of the patch size {config.patch_size}.")
    return config


def _keras_hub_available():
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        return False
    return True


def run(config):
    """Times every case; returns (rows, matmul_gflops) with rows of dicts."""
    batch, size, classes = _BATCH_SIZE.value, _IMAGE_SIZE.value, _NUM_CLASSES.value
    xla_settings = [value == "on" for value in _XLA.value]
    implementations = [_OPTIMIZER_IMPLEMENTATION[value] for value in _KERAS_VIT_OPTIMIZER.value]
    if _COMPARE.value == "keras_hub":
        if _keras_hub_available():
            implementations.append("keras_hub")
        else:
            logging.warning("keras-hub is not installed (pip install keras-hub): timing keras_vit only.")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, classes, (batch,)), tf.int32)

    def work_per_image(name, mode):
        """FLOP one image costs `name` in `mode`: what that implementation runs."""
        forward = flops.forward_flops(config, image_size=size, num_classes=classes,
                                      class_token_only=name != "keras_hub")
        return forward * (flops.TRAINING_FLOPS_PER_FORWARD if mode == "train" else 1)

    mlp_flops = flops.mlp_matmul_flops(config, batch, image_size=size)
    # Groups of precisions timed together: all of them in one alternation (every ratio in the
    # table measured under the same load), or one at a time (half the memory).
    groups = [_PRECISIONS.value] if _INTERLEAVE_PRECISIONS.value else [[p] for p in _PRECISIONS.value]
    medians = {}
    for group in groups:
        cases = {}
        for policy in group:
            short, compute_dtype = PRECISIONS[policy]
            keras.mixed_precision.set_global_policy(policy)
            try:
                models = {name: build(name, config, size, classes) for name in implementations}
            finally:
                keras.mixed_precision.set_global_policy("float32")
            for key, case in matmul_cases(config, batch, size, compute_dtype, xla_settings).items():
                cases[(short,) + key] = case
            for name, model in models.items():
                modes = _MODES.value
                if name == "keras_vit_adamw" and "keras_vit" in models:
                    modes = [m for m in modes if m != "infer"]  # The same model as keras_vit's.
                for key, case in model_cases(name, model, images, labels, xla_settings,
                                             modes).items():
                    cases[(short,) + key] = case
        logging.info("%s: timing %d cases, %d warm-up + %d rounds", "+".join(group), len(cases),
                     _WARMUP.value, _REPEATS.value)
        medians.update(interleaved_medians(
            cases, repeats=_REPEATS.value, warmup=_WARMUP.value,
            on_round=lambda index, _: logging.info("round %d done", index + 1)))
        del models, cases
        keras.backend.clear_session()

    medians = {key: seconds / (MATMULS_PER_CALL if key[1] == "matmul" else 1)
               for key, seconds in medians.items()}
    matmul_rate = {}
    for (short, name, xla, mode), seconds in medians.items():
        if name == "matmul":
            matmul_rate[short] = max(matmul_rate.get(short, 0.0), mlp_flops / seconds)
    rows = []
    for (short, name, xla, mode), seconds in medians.items():
        work = mlp_flops if name == "matmul" else work_per_image(name, mode) * batch
        rows.append({
            "implementation": name, "precision": short, "xla": xla, "mode": mode,
            "ms": seconds * 1e3, "images_per_s": None if name == "matmul" else batch / seconds,
            "gflops": work / seconds / 1e9,
            "percent_of_matmul": 100 * work / seconds / matmul_rate[short],
        })
    rows.sort(key=lambda r: (r["precision"] != "fp32", IMPLEMENTATIONS.index(r["implementation"])
                             if r["implementation"] in IMPLEMENTATIONS else -1, r["xla"], r["mode"]))
    return rows, {short: rate / 1e9 for short, rate in matmul_rate.items()}


def best(rows, implementation, precision, mode):
    """The row with the highest images/s among the XLA settings, or None."""
    candidates = [r for r in rows if (r["implementation"], r["precision"], r["mode"]) ==
                  (implementation, precision, mode)]
    return max(candidates, key=lambda r: r["images_per_s"], default=None)


def ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator['images_per_s'] / denominator['images_per_s']:.2f}"


def format_table(rows):
    header = f"{'implementation':<17}{'precision':<10}{'xla':<5}{'mode':<7}{'ms/step':>10}" \
             f"{'images/s':>10}{'GFLOP/s':>10}{'%matmul':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        images = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.2f}"
        lines.append(
            f"{r['implementation']:<17}{r['precision']:<10}{'on' if r['xla'] else 'off':<5}"
            f"{r['mode']:<7}{r['ms']:>10.4g}{images:>10}{r['gflops']:>10.4g}"
            f" {r['percent_of_matmul']:>7.3g}%")
    return "\n".join(lines)


def main(argv):
    del argv
    config = _check_flags()
    load_before = os.getloadavg()
    rows, matmul_gflops = run(config)
    load_after = os.getloadavg()
    print(f"# finished {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average before {load_before[0]:.2f} after {load_after[0]:.2f}; "
          f"TF {tf.__version__}, Keras {keras.__version__}")
    standard, executed = (
        flops.forward_flops(config, image_size=_IMAGE_SIZE.value, num_classes=_NUM_CLASSES.value,
                            class_token_only=pruned) / 1e9 for pruned in (False, True))
    print(f"# {config}, image {_IMAGE_SIZE.value}, batch {_BATCH_SIZE.value}, "
          f"{standard:.3f} GFLOP/image forward (keras_vit runs {executed:.3f}: its last block for "
          f"the class token only; 2/multiply-add), training step 3x; medians of {_REPEATS.value} "
          f"alternating rounds; %matmul is of the MLP-shape matmul in the same precision; train: "
          + ", ".join(f"{name} with {type(_optimizer(name)).__name__}" for name in IMPLEMENTATIONS
                      if any(r["implementation"] == name for r in rows)))
    print(format_table(rows))
    print()
    rows_of = {r["implementation"] for r in rows}
    print("best setting of each:")
    for implementation in IMPLEMENTATIONS:
        for precision in ("fp32", "bf16"):
            for mode in ("infer", "train"):
                row = best(rows, implementation, precision, mode)
                if row:
                    print(f"  {implementation:<16} {precision} {mode:<6} xla={'on' if row['xla'] else 'off':<4}"
                          f"{row['images_per_s']:8.2f} images/s  {row['percent_of_matmul']:4.0f}% of "
                          f"{matmul_gflops[precision]:.1f} GFLOP/s matmul")
    if "keras_vit" in rows_of and "keras_vit_adamw" in rows_of:
        models_alone = ratio(best(rows, "keras_vit_adamw", "fp32", "train"),
                             best(rows, "keras_hub", "fp32", "train"))
        print(f"models_alone keras_vit_adamw/keras_hub fp32_train={models_alone}")
    # keras_vit as its trainer runs it (FusedAdamW), else with Keras's AdamW if that alone was timed.
    ours = "keras_vit" if "keras_vit" in rows_of else "keras_vit_adamw"
    own_train = ratio(best(rows, ours, "bf16", "train"), best(rows, ours, "fp32", "train"))
    print(f"keras_vit bf16_train/fp32_train={own_train}")
    speedups = {
        key: ratio(best(rows, ours, precision, mode),
                   best(rows, "keras_hub", precision, mode))
        for key, precision, mode in (("fp32_infer", "fp32", "infer"), ("bf16_infer", "bf16", "infer"),
                                     ("fp32_train", "fp32", "train"))
    }
    print("speedup_vs_keras_hub " + " ".join(f"{key}={value}" for key, value in speedups.items()))


if __name__ == "__main__":
    app.run(main)
