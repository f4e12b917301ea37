"""A restricted unpickler for the CIFAR python-format files.

Unpickling runs whatever callables the pickle names, so a pickle from the internet can run code.
The CIFAR files only need plain containers and numpy arrays; anything else is refused.
"""

from __future__ import annotations

import io
import pickle

# (module, name) pairs a numpy array pickle may reference; the old and new numpy module paths.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1"), a pure function.
    ("_codecs", "encode"),
    # Protocol 5 array pickles rebuild from a buffer.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle references a callable outside the allowed list (possibly malicious)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain types (dict, list, str, bytes, numbers) and numpy arrays.

    `source` is a human-readable name used in errors (a file path or archive member).
    """

    def __init__(self, file, *, source: str, encoding: str = "bytes"):
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobalError(
            f"{self._source}: refusing to unpickle global '{module}.{name}'. A CIFAR python file "
            "holds only dicts, lists, bytes and numpy arrays; this file references other code and "
            "may be malicious. Use the official archive from https://www.cs.toronto.edu/~kriz/cifar.html."
        )


def restricted_loads(data: bytes, *, source: str):
    """Unpickles `data` with `RestrictedUnpickler` (dict keys stay bytes, as in the CIFAR files).

    Args:
        data: the pickle.
        source: the file's name, for error messages.

    Raises:
        ForbiddenGlobalError: the pickle references a callable outside the allowed list.
    """
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()
