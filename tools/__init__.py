"""keras-vit's command lines (installed as the package `keras_vit_tools`).

Each module is a thin absl program: `python tools/train.py ...`, or after `pip install -e .`
the console script `keras-vit-train ...` (also `keras-vit-evaluate`, `-predict`, `-export`,
`-convert-data`, `-visualize`, `-serving-client`).

Importing this package sets up what every tool needs before TensorFlow or Keras is imported, so
each tool imports it first: the TensorFlow backend of Keras (the tools use tf.data,
tf.distribute and SavedModel export), and quiet start-up logging. TensorFlow prints about 40 lines on a CPU-only machine (CUDA
probing, oneDNN notices) before absl's logging is set up, where no setting reaches them, and
its Python logger reports every renamed capture of an export. `--verbosity=1` (or higher) on
the command line keeps all of it, as without this package.
"""

import contextlib
import logging
import os
import sys
import tempfile


def _requested_verbosity(argv):
    """The value of `--verbosity`/`-v` in `argv` (absl's flag), 0 when absent or unreadable."""
    for index, arg in enumerate(argv):
        for name in ("--verbosity", "-v"):
            value = None
            if arg.startswith(name + "="):
                value = arg[len(name) + 1:]
            elif arg == name and index + 1 < len(argv):
                value = argv[index + 1]
            if value is not None:
                try:
                    return int(value)
                except ValueError:
                    return 0
    return 0


@contextlib.contextmanager
def _stderr_captured():
    """Sends file descriptor 2 (C++ logging included) to a temporary file; yields the file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _quiet_tensorflow(argv):
    if _requested_verbosity(argv) >= 1:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    failure = None
    with _stderr_captured() as captured:
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe, while its complaints are captured
        except BaseException as error:
            captured.seek(0)
            failure, printed = error, captured.read()
    if failure is not None:
        sys.stderr.buffer.write(printed)  # what TensorFlow said on the way is shown after all
        sys.stderr.flush()
        raise failure
    tensorflow_info = _TensorFlowInfoFilter(os.path.dirname(tf.__file__))
    logging.getLogger("tensorflow").addFilter(tensorflow_info)
    logging.getLogger("absl").addFilter(tensorflow_info)  # TensorFlow logs through absl too


class _TensorFlowInfoFilter(logging.Filter):
    """Drops the INFO and DEBUG records of TensorFlow's own modules; keeps warnings, errors and
    every record of keras_vit and the tools, which log through the same absl logger."""

    def __init__(self, tensorflow_dir):
        super().__init__()
        self._tensorflow_dir = tensorflow_dir + os.sep

    def filter(self, record):
        return record.levelno >= logging.WARNING or not record.pathname.startswith(
            self._tensorflow_dir)


os.environ["KERAS_BACKEND"] = "tensorflow"
_quiet_tensorflow(sys.argv[1:])
