"""The training pipeline's compiled TensorFlow op: `resize_bilinear_flip`.

After JPEG decoding, TensorFlow's Cast + `ResizeBilinear` + flip are the largest cost of the
training input pipeline. `ResizeBilinearFlip` (`ops/resize_bilinear_flip.cc`) computes the same
float32 pixels (to ~3e-5) in one separable pass, in less CPU time; the measurements are in
docs/data.md, 'The compiled resize op'.

The op is compiled from its source against the installed TensorFlow on first use (a C++17
compiler: `$CXX`, else `c++`) and cached as
`$KERAS_VIT_CACHE_DIR/ops/resize_bilinear_flip-tf<version>-<hash>.so` (default cache dir
`~/.cache/keras_vit`), the hash covering the source, the compiler and the flags. Where it cannot
be built or loaded, `load_resize_op(required=False)` logs why, once, and returns None: the pipeline
then uses TensorFlow's own ops.

Only the training input pipeline uses it. Evaluation and the serving signature keep TensorFlow's
ops, so an exported SavedModel never needs this library.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import tensorflow as tf
from absl import logging

from pipelines.errors import UserError

SOURCE = Path(__file__).resolve().parent / "ops" / "resize_bilinear_flip.cc"
#: `build_dataset(resize_kernel=...)`: the compiled op where it builds (else TensorFlow's ops,
#: with a warning), the compiled op or an error, or TensorFlow's ops only.
RESIZE_KERNELS = ("auto", "compiled", "tensorflow")

_lock = threading.Lock()
# One library per process: loading a second copy (another cache file) would register the kernel
# twice, which TensorFlow refuses when the op runs.
_library = None
_errors: dict[str, str] = {}  # library path -> why it could not be built or loaded


class CompiledOpError(UserError, RuntimeError):
    """The compiled op could not be built or loaded; the message says why and what to do.

    Also a `RuntimeError`, so code that catches `RuntimeError` around the build keeps working.
    """


def cache_dir() -> Path:
    """Where compiled libraries are kept: `$KERAS_VIT_CACHE_DIR/ops` or `~/.cache/keras_vit/ops`."""
    root = os.environ.get("KERAS_VIT_CACHE_DIR") or Path.home() / ".cache" / "keras_vit"
    return Path(root) / "ops"


def compiler() -> str:
    """The C++ compiler command: `$CXX`, else `c++`."""
    return os.environ.get("CXX") or "c++"


def compiler_available() -> bool:
    """Is the compiler command's program on PATH?"""
    return shutil.which(shlex.split(compiler())[0]) is not None


def _build_command(output: Path) -> list[str]:
    return [
        *shlex.split(compiler()), "-shared", "-fPIC", "-O3", "-w", str(SOURCE), "-o", str(output),
        *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags(),
    ]


def library_path() -> Path:
    """The cached library for this source, compiler, flags and TensorFlow version."""
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join(_build_command(Path("out.so"))).encode())
    return cache_dir() / f"resize_bilinear_flip-tf{tf.__version__}-{key.hexdigest()[:12]}.so"


def _build(path: Path) -> None:
    """Compiles the op into `path` atomically (concurrent builders each write their own file).

    Raises:
        CompiledOpError: no compiler, an unwritable cache folder, or the compiler failed.
    """
    if not compiler_available():
        raise CompiledOpError(
            f"no C++ compiler {compiler()!r} on PATH to build {SOURCE.name}. Install one (e.g. "
            "g++) or set $CXX, or pass resize_kernel='tensorflow' (--resize_kernel=tensorflow).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        workspace = tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-")
    except OSError as error:
        raise CompiledOpError(
            f"cannot write the op cache {path.parent}: {error}. Set $KERAS_VIT_CACHE_DIR to a "
            "writable folder, or pass resize_kernel='tensorflow'.") from error
    with workspace as tmp:
        partial = Path(tmp) / path.name
        command = _build_command(partial)
        logging.info("Compiling %s for TensorFlow %s (once; cached as %s).",
                     SOURCE.name, tf.__version__, path)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CompiledOpError(
                f"compiling {SOURCE} failed (exit {result.returncode}): {shlex.join(command)}\n"
                f"{result.stderr[-2000:]}\nPass resize_kernel='tensorflow' "
                "(--resize_kernel=tensorflow) to use TensorFlow's ops instead.")
        os.replace(partial, path)


def load_resize_op(required: bool = False):
    """The loaded op library, building it on first use.

    Args:
        required: raise `CompiledOpError` when the op cannot be built or loaded; otherwise log
            the reason (once per process) and return None.

    Returns:
        The library, whose `.resize_bilinear_flip` `resize_bilinear_flip` calls, or None.

    Raises:
        CompiledOpError: `required` and the op cannot be built or loaded.
    """
    global _library
    with _lock:
        if _library is None:
            path = library_path()
            if str(path) not in _errors:
                try:
                    if not path.exists():
                        _build(path)
                    _library = tf.load_op_library(str(path))
                except CompiledOpError as error:
                    _errors[str(path)] = str(error)
                except (OSError, tf.errors.OpError) as error:
                    _errors[str(path)] = (f"loading {path} failed: {error}. Delete the file to "
                                          "rebuild it, or pass resize_kernel='tensorflow'.")
                if str(path) in _errors and not required:
                    logging.warning("The training pipeline uses TensorFlow's resize (about 10%% "
                                    "slower): %s", _errors[str(path)])
            if _library is None:
                if required:
                    raise CompiledOpError(_errors[str(path)])
                return None
        return _library


def resize_bilinear_flip(library, image: tf.Tensor, image_size: int, flip: tf.Tensor) -> tf.Tensor:
    """uint8 `(h, w, 3)` -> float32 `(image_size, image_size, 3)` in [0, 255], mirrored if `flip`.

    Equals `preprocess.resize(image)` (then `tf.reverse(..., [1])` when `flip`) to ~3e-5.

    Args:
        library: what `load_resize_op` returned.
        image: uint8 `(h, w, 3)`.
        image_size: output side in pixels.
        flip: scalar bool tensor.

    Returns:
        float32 `(image_size, image_size, 3)` in [0, 255].
    """
    resized = library.resize_bilinear_flip(image, [image_size, image_size], flip)
    resized.set_shape([image_size, image_size, 3])
    return resized
