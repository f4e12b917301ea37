"""Running a command line of tools/: errors the user can fix become one clear line.

An error that is the user's to fix derives from `keras_vit.UserError` (a missing file, a
checkpoint, dataset or export directory that does not fit, a bad setting, a diverged run, a
server that does not answer). `run` prints it as `error: ...` on stderr and exits with status 2;
the traceback is still logged at debug level (`--verbosity=1` shows it). Any other exception is
a bug and keeps its full traceback. absl's `app.UsageError` (a wrong command line) keeps absl's
own handling: the message and the usage, exit status 1.
"""

import sys
import traceback

from absl import app, logging

from pipelines.errors import UserError

#: Exit status of a command that stopped on a `UserError`.
USER_ERROR_EXIT_CODE = 2


def _exit_on_user_errors(main):
    def wrapped(argv):
        try:
            status = main(argv)
        except UserError as error:
            logging.debug("".join(traceback.format_exception(error)))
            print(f"error: {error}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)
        sys.exit(status or 0)

    return wrapped


def run(main):
    """`absl.app.run(main)`, with `main`'s `UserError`s printed as `error: ...` (exit 2)."""
    app.run(_exit_on_user_errors(main))


# The --checkpoint help of every tool that opens a model (`keras_vit.load_classifier`).
CHECKPOINT_HELP = (
    "A .keras file, a training model directory, or a checkpoint (keras_vit.from_checkpoint): "
    "a registry name, a Google/big_vision/keras_vit .npz, a timm or Hugging Face folder, or a "
    ".safetensors file.")
