"""Shared pieces of the training tests: a tiny config, converted digits, subprocess runs."""

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "tools" / "train.py")

# A tiny ViT (patch 4, hidden 32, 2 layers) on 16x16 digits: seconds per run on 2 CPU cores.
TINY_FLAGS = dict(
    model="d32_l2_h4_m64_p4",
    image_size=16,
    pooling="gap",
    global_batch_size=16,
    optimizer="adam",
    learning_rate=0.003,
    warmup_steps=2,
    total_steps=20,
    checkpoint_every_steps=10,
    eval_every_steps=10,
    augment="none",
    cache_data=True,
    deterministic=True,  # a fixed input order, so loss thresholds do not depend on thread timing
    strategy="default",
    seed=0,
)


def tiny_config(data, model_dir, **overrides):
    """The `TrainConfig` of `TINY_FLAGS` on `data` (train and eval) into `model_dir`."""
    from keras_vit.training import TrainConfig

    return TrainConfig(**(TINY_FLAGS | dict(train_data=data, eval_data=data,
                                            model_dir=str(model_dir)) | overrides))


def convert_digits(directory):
    """sklearn digits, train and test splits, in `directory` (pipelines' converter)."""
    import pipelines

    for split in ("train", "test"):
        pipelines.convert("digits:", str(directory), split=split, verbose=False)
    return str(directory)


def flag_list(**flags):
    """absl command-line arguments of `flags`: --name=value, and --name / --noname for a bool."""
    args = []
    for name, value in flags.items():
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no{name}")
        else:
            args.append(f"--{name}={value}")
    return args


def subprocess_env(**extra):
    """The environment of a tool run as a subprocess: the repository importable, CPU only."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO),
               CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def run_train(timeout=300, env=None, **flags):
    """Runs tools/train.py with `flags` from the repository root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, TRAIN, *flag_list(**flags)], capture_output=True,
                          text=True, timeout=timeout, env=env or subprocess_env(), cwd=REPO)


def free_ports(count):
    """`count` TCP ports on 127.0.0.1 that were free a moment ago (for a local cluster)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def newest_backup_step(model_dir):
    """The update step of the newest backup in MODEL_DIR/backup that passes its checks (0: none)."""
    from keras_vit.training import backup

    return backup.newest_complete_step(os.path.join(model_dir, "backup"))


# The line a test file's `main` prints its JSON result on, when the test runs it as a script.
RESULT_PREFIX = "RESULT "


def two_logical_cpus():
    """Splits the CPU into 2 logical devices and returns their names, for a MirroredStrategy
    over 2 replicas. Must run before TensorFlow initialises its devices: in the `main` of a
    test file that a test runs in a subprocess (`run_result_script`)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return ["/cpu:0", "/cpu:1"]


def print_result(result):
    """Prints `result` as the JSON line `run_result_script` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_result_script(path, timeout=300):
    """Runs `python path` from the repository root (CPU only) and returns the JSON its `main`
    printed with `print_result`; fails with the script's stderr when it printed none."""
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                            timeout=timeout, env=subprocess_env(), cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def record_offsets(data):
    """`[(offset, payload length)]` of every record of a TFRecord file's bytes."""
    pos, out = 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append((pos, length))
        pos += 16 + length
    return out


def flip_byte(path, record, where):
    """Flips one byte of record `record`: in its payload, or in its length CRC (header)."""
    data = bytearray(path.read_bytes())
    pos, length = record_offsets(data)[record]
    data[pos + 12 + length // 2 if where == "payload" else pos + 9] ^= 0x01
    path.write_bytes(bytes(data))
