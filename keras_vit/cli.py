"""Running a command line of tools/: user errors become one clear line, not a traceback.

An error that is the user's to fix (a missing file, a checkpoint or dataset that does not fit,
a bad setting) is printed as `error: ...` on stderr and the process exits with status 2. The
traceback is still logged at debug level (`--verbosity=1` shows it). Anything else, a bug,
keeps its full traceback.
"""

import pickle
import sys
import traceback

from absl import app, logging

# ValueError covers CheckpointError, ConfigError, ExportError, CorruptShardError,
# CorruptSourceError and the argument checks of the library.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, pickle.UnpicklingError)


def _exit_on_user_errors(main):
    def wrapped(argv):
        try:
            status = main(argv)
        except USER_ERRORS as error:
            logging.debug("".join(traceback.format_exception(error)))
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        sys.exit(status or 0)

    return wrapped


def run(main):
    """`absl.app.run(main)`, with `main`'s user errors printed as `error: ...` (exit 2)."""
    app.run(_exit_on_user_errors(main))
