"""`UserError`: the one base class of errors a user can fix.

A missing or corrupt file, a dataset, checkpoint or export directory that does not fit, a bad
setting: each library error of that kind derives from `UserError`, so a command line can turn
exactly these into a one-line message (`keras_vit.cli.run`) and let anything else, a bug, show
its traceback. It lives in `pipelines`, the lowest layer, so that both `pipelines` and
`keras_vit` can derive from it; `keras_vit.UserError` is the same class.

It derives from `ValueError` for compatibility: code that caught `ValueError` around these
errors keeps working.
"""


class UserError(ValueError):
    """An error the user can fix; its message says what was expected, what was found, and
    what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (also a `FileNotFoundError`)."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the package or the
    `pip install -e ".[EXTRA]"` that brings it (also an `ImportError`)."""
