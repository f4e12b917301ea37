r"""Peak memory and step time of a ViT training step, without and with remat, and the cost
of EMA and layer decay per step (TensorFlow backend, float32).

    python bench/memory.py                                  # ViT-B/16, 224, batch 32 (issue 17)
    python bench/memory.py --cases=plain,remat --rounds=2   # remat only, twice, alternating
    python bench/memory.py --variant=d32_l1_h2_m64_p8 \
        --image_size=16 --batch_size=4 --num_classes=10 --repeats=2   # seconds

Each case runs in its own child process (this script with --child=CASE), so one case's
allocations cannot raise another's peak; the children run one after another, back to back,
and with --rounds=R the sequence repeats R times, rotated by one case per round (bench/timing.py's
reason: a shared machine's load drifts), each case's medians over its rounds reported.
A child builds the model and the optimizer (AdamW, as tools/train.py builds it with
`build_optimizer`), builds the optimizer's slots, records its resident memory, then runs
`--warmup` untimed and `--repeats` timed calls of the model's own `train_step` under
`tf.function` (what `fit` runs; XLA off) on one fixed random batch. Cases:
  - plain: `create_model(variant)`, `build_optimizer("adamw", ...)`;
  - remat: `create_model(variant, remat=True)` (each encoder block rematerialised);
  - ema: plain with `build_optimizer(..., ema_decay=0.9999)`;
  - layer_decay: plain with `build_optimizer(..., layer_decay=0.65, model=model)`.

What "peak" is: `peak_rss`, the child's peak resident set size (`ru_maxrss`: weights,
optimizer slots, TensorFlow's runtime and every step's activations; the whole cost of the
configuration on this machine); `step_rss`, `peak_rss` minus the resident size after the model
and optimizer were built and before any step (what a training step adds: activations kept for
the backward pass, gradients and temporaries; remat shrinks the first). On a GPU also
`device_peak`, TensorFlow's allocator peak (`tf.config.experimental.get_memory_info`).

Prints a table, one row per case, and as the last line:
    remat peak_rss=-X% step_rss=-Y% step_time=+Z% ema_step_time=+E% layer_decay_step_time=+L%
(changes against the plain case; "n/a" for a case not run). Targets (issue 17): remat at
least 40% less peak memory for at most 35% more step time; EMA and layer decay each under 5%.
"""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

CASES = ("plain", "remat", "ema", "layer_decay")
RESULT_PREFIX = "RESULT "  # a child's one line of JSON on stdout

_VARIANT = flags.DEFINE_string(
    "variant", "B/16", "A keras_vit variant or a custom d<hidden>_l<layers>_h<heads>_m<mlp>_p<patch>.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input side in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per training step.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Width of the classification head.")
_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)} to run, in this order.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per child; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first (tracing, allocator warm-up).")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Times the sequence of children runs, rotated.")
_CHILD = flags.DEFINE_enum("child", None, list(CASES), "Internal: run this one case and print it.")


def _rss_mb():
    """The resident set size now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(case):
    """The compiled model of `case`, with the optimizer's slots built."""
    import keras_vit
    from keras_vit.training.losses import ClassificationLoss
    from keras_vit.training.optimizers import build_optimizer

    model = keras_vit.create_model(_VARIANT.value, image_size=_IMAGE_SIZE.value,
                                   num_classes=_NUM_CLASSES.value, remat=case == "remat")
    extra = {"ema": dict(ema_decay=0.9999), "layer_decay": dict(layer_decay=0.65)}.get(case, {})
    optimizer = build_optimizer("adamw", 1e-4, model=model, weight_decay=0.05, **extra)
    model.compile(optimizer=optimizer, loss=ClassificationLoss("softmax", _NUM_CLASSES.value),
                  jit_compile=False)
    optimizer.build(model.trainable_variables)
    return model


def run_child(case):
    """Builds and times one case in this process; returns its measurements."""
    import numpy as np
    import tensorflow as tf

    model = _build(case)
    rng = np.random.default_rng(0)
    size = _IMAGE_SIZE.value
    images = tf.constant(rng.uniform(0, 255, (_BATCH_SIZE.value, size, size, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, _NUM_CLASSES.value, _BATCH_SIZE.value), tf.int32)
    built_rss = _rss_mb()
    # The model's own train_step, wrapped as Keras's make_train_function wraps it.
    step = tf.function(model.train_step, jit_compile=False)
    for _ in range(_WARMUP.value):
        step((images, labels))["loss"].numpy()
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        step((images, labels))["loss"].numpy()
        times.append(time.perf_counter() - start)
    result = {"case": case, "step_ms": 1e3 * statistics.median(times),
              "peak_rss_mb": _peak_rss_mb(), "built_rss_mb": built_rss}
    result["step_rss_mb"] = result["peak_rss_mb"] - built_rss
    if tf.config.list_physical_devices("GPU"):
        result["device_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return result


def _spawn(case, argv):
    """Runs `case` in a child process; its result dict."""
    flags_given = [arg for arg in argv[1:] if not arg.startswith(("--child", "--rounds", "--cases"))]
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--child={case}", *flags_given],
        capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode or not lines:
        raise RuntimeError(f"case {case} failed (exit {completed.returncode}):\n"
                           f"{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_rounds(cases, rounds, argv, log=print):
    """{case: measurements, medians over `rounds`}; round r runs `cases` rotated by r."""
    found = {case: [] for case in cases}
    for round_index in range(rounds):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            found[case].append(_spawn(case, argv))
            log(f"# round {round_index + 1}/{rounds} {case}: "
                f"{found[case][-1]['step_ms']:.0f} ms/step, "
                f"peak {found[case][-1]['peak_rss_mb']:.0f} MiB")
    return {case: {key: (statistics.median(r[key] for r in results) if key != "case" else case)
                   for key in results[0]}
            for case, results in found.items()}


def format_table(results):
    """One row per case: step time, images/s, peak RSS, step RSS, device peak."""
    header = (f"{'case':<13}{'ms/step':>10}{'images/s':>10}{'peak_rss MiB':>14}"
              f"{'step_rss MiB':>14}{'device_peak MiB':>17}")
    lines = [header, "-" * len(header)]
    for case, r in results.items():
        device = f"{r['device_peak_mb']:.0f}" if "device_peak_mb" in r else "-"
        lines.append(f"{case:<13}{r['step_ms']:>10.1f}{_BATCH_SIZE.value / r['step_ms'] * 1e3:>10.2f}"
                     f"{r['peak_rss_mb']:>14.0f}{r['step_rss_mb']:>14.0f}{device:>17}")
    return "\n".join(lines)


def change(results, case, key):
    """"+X%" or "-X%": `case`'s `key` against the plain case's; "n/a" if either is missing."""
    if case not in results or "plain" not in results:
        return "n/a"
    return f"{100 * (results[case][key] / results['plain'][key] - 1):+.1f}%"


def summary_line(results):
    return (f"remat peak_rss={change(results, 'remat', 'peak_rss_mb')} "
            f"step_rss={change(results, 'remat', 'step_rss_mb')} "
            f"step_time={change(results, 'remat', 'step_ms')} "
            f"ema_step_time={change(results, 'ema', 'step_ms')} "
            f"layer_decay_step_time={change(results, 'layer_decay', 'step_ms')}")


def _check_flags():
    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown or not _CASES.value:
        raise app.UsageError(f"--cases must be some of {list(CASES)}, got {_CASES.value}.")
    if _REPEATS.value < 1 or _ROUNDS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--repeats and --rounds must be >= 1, --warmup >= 0.")


def main(argv):
    _check_flags()
    if _CHILD.value:
        print(RESULT_PREFIX + json.dumps(run_child(_CHILD.value)), flush=True)
        return
    load_before = os.getloadavg()
    results = run_rounds(list(_CASES.value), _ROUNDS.value, sys.argv)
    load_after = os.getloadavg()
    import keras
    import tensorflow as tf

    print(f"# finished {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.node()}, "
          f"{os.cpu_count()} CPUs, load average before {load_before[0]:.2f} after "
          f"{load_after[0]:.2f}; TF {tf.__version__}, Keras {keras.__version__}")
    print(f"# {_VARIANT.value}, image {_IMAGE_SIZE.value}, batch {_BATCH_SIZE.value}, float32, "
          f"AdamW (build_optimizer), XLA off; each case in its own process, median of "
          f"{_REPEATS.value} steps after {_WARMUP.value} warm-up, {_ROUNDS.value} round(s)")
    print(format_table(results))
    print(summary_line(results))


if __name__ == "__main__":
    app.run(main)
