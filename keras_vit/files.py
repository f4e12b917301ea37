"""Writing a file so that an interrupted write never leaves a partial one under its name."""

import os


def write_atomically(path, write, suffix=""):
    """Calls `write(temporary)` for a temporary beside `path`, then renames it to `path`.

    The temporary is hidden and unique to this process (two writers of one path never share
    it) and is removed if `write` fails or the process is interrupted before the rename.

    Args:
        path: the file to write; its directory is created if needed.
        write: a function taking the temporary's path and writing the whole file there.
        suffix: appended to the temporary's name, for writers that add an extension
            (np.savez adds ".npz" to a name without it).

    Returns:
        `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.partial{suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
