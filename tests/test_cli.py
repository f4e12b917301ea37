"""keras_vit.cli and the tools package (keras_vit_tools): exit codes, console scripts, quiet start-up.

Truths: the exit statuses and messages the README promises (a `UserError` is one line and
status 2, a bug keeps its traceback); the console scripts that setup.cfg declares; TensorFlow's
C++ log lines (`file.cc:LINE]`), which a quiet start-up must not print.
"""

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import keras_vit
import keras_vit_tools
from keras_vit import cli

REPO = Path(__file__).resolve().parents[1]
_CPP_LOG_LINE = re.compile(r"\.cc:\d+\]")


def _exit_status(main, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli._exit_on_user_errors(main)(["prog"])
    return stopped.value.code, capsys.readouterr().err


def test_a_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise keras_vit.CheckpointError("ckpt.npz is not a checkpoint: do this.")

    status, stderr = _exit_status(main, capsys)
    assert status == cli.USER_ERROR_EXIT_CODE == 2
    assert stderr == "error: ckpt.npz is not a checkpoint: do this.\n"


def test_a_missing_file_is_a_user_error(capsys):
    def main(argv):
        raise keras_vit.MissingFileError("Model file x.keras does not exist.")

    assert issubclass(keras_vit.MissingFileError, FileNotFoundError)
    assert _exit_status(main, capsys) == (2, "error: Model file x.keras does not exist.\n")


def test_a_bug_keeps_its_traceback(capsys):
    # A plain ValueError is not the user's to fix: it must propagate, not become one line.
    def main(argv):
        raise ValueError("a library bug")

    with pytest.raises(ValueError, match="a library bug"):
        cli._exit_on_user_errors(main)(["prog"])
    assert capsys.readouterr().err == ""


def test_main_status_is_the_exit_status(capsys):
    assert _exit_status(lambda argv: None, capsys) == (0, "")
    assert _exit_status(lambda argv: 3, capsys) == (3, "")


def test_every_library_user_error_derives_from_the_base():
    import pipelines
    from keras_vit import serving
    from keras_vit.serving import client
    from keras_vit.training import ConfigError, TrainingNaNError

    for error in (keras_vit.CheckpointError, ConfigError, TrainingNaNError, serving.ExportError,
                  client.ServingError, pipelines.CorruptShardError, pipelines.CorruptSourceError):
        assert issubclass(error, keras_vit.UserError), error
        assert issubclass(error, ValueError), error  # compatibility with `except ValueError`


@pytest.mark.parametrize("argv, expected", [
    ([], 0), (["--verbosity=1"], 1), (["--verbosity", "2"], 2), (["-v", "1"], 1), (["-v=-1"], -1),
    (["--source=digits:", "--verbosity=0"], 0), (["--verbosity=lots"], 0), (["--verbosity"], 0),
])
def test_requested_verbosity_reads_absl_flag(argv, expected):
    assert keras_vit_tools._requested_verbosity(argv) == expected


def _console_scripts():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=") for line in lines)


def test_each_tool_has_a_console_script():
    scripts = _console_scripts()
    tools = sorted(path.stem for path in (REPO / "tools").glob("*.py") if path.stem != "__init__")
    assert sorted(target.split(":")[0].split(".")[1] for target in scripts.values()) == tools
    for name, target in scripts.items():
        module, function = target.split(":")
        assert name == "keras-vit-" + module.split(".")[1].replace("_", "-")
        assert function == "run"


def _tool_env():
    # No PYTHONPATH: the tools must find keras_vit as installed, not through the checkout.
    return {key: value for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}


@pytest.mark.slow
def test_console_script_runs_and_start_up_is_quiet(tmp_path):
    script = Path(sys.executable).with_name("keras-vit-convert-data")
    if not script.exists():
        pytest.skip(f"{script} is not installed (run `pip install -e .`)")
    result = subprocess.run(
        [str(script), "--source=digits:", f"--output_dir={tmp_path}", "--split=test"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_tool_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"num_examples": 359' in result.stdout
    assert not _CPP_LOG_LINE.search(result.stderr), result.stderr[:3000]
    assert "cuda" not in result.stderr.lower()


@pytest.mark.slow
def test_tool_from_another_directory_reports_a_user_error_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "predict.py"), f"--checkpoint={tmp_path}/none.npz",
         "cat.jpg"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_tool_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: Checkpoint file {tmp_path}/none.npz does not exist."]


def test_tensorflow_info_records_are_dropped_and_the_rest_kept():
    import logging

    import tensorflow as tf

    tensorflow_dir = os.path.dirname(tf.__file__)
    drop = keras_vit_tools._TensorFlowInfoFilter(tensorflow_dir)

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    inside = os.path.join(tensorflow_dir, "python", "saved_model", "signature_serialization.py")
    assert not drop.filter(record(inside, logging.INFO))
    assert drop.filter(record(inside, logging.WARNING))
    assert drop.filter(record(str(REPO / "keras_vit" / "serving" / "export.py"), logging.INFO))
    # A sibling package whose name starts like TensorFlow's is not TensorFlow.
    assert drop.filter(record(tensorflow_dir + "_datasets/core/x.py", logging.INFO))


def test_a_failed_tensorflow_import_shows_what_was_printed(tmp_path):
    # A stand-in `tensorflow` that prints on file descriptor 2, as TensorFlow's C++ code does,
    # then fails: the quiet start-up must replay what it captured and raise the error.
    (tmp_path / "tensorflow.py").write_text(
        "import os\nos.write(2, b'the reason the library gives\\n')\nraise ImportError('boom')\n")
    result = subprocess.run(
        [sys.executable, "-c", "import keras_vit_tools"], capture_output=True, text=True,
        timeout=120, cwd=tmp_path, env={**_tool_env(), "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1
    assert "the reason the library gives" in result.stderr
    assert "ImportError: boom" in result.stderr
