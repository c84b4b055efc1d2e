"""The errors of reading a dataset (the lowest layer of the datamodules: everything may import it)."""

from __future__ import annotations

import os


class DataError(RuntimeError):
    """A dataset file or row is missing, unreadable or malformed. The message names it."""


class DataRootError(DataError):
    """``data.root`` does not exist or does not look like the dataset."""


def os_error(path: str | os.PathLike, err: BaseException) -> DataError | None:
    """The DataError for an operating-system failure to read ``path`` (permission denied, a folder
    where a file is expected, a missing file), or None when ``err`` is not one of those, so that
    the caller words a format problem ("truncated or corrupt") itself.

    A permission problem is never reported as a corrupt file: re-downloading would not fix it.
    """
    if isinstance(err, PermissionError):
        code = f"errno {err.errno}" if err.errno else str(err)
        return DataError(
            f"Cannot read {path}: permission denied ({code}). Make it readable by the user running medvlp "
            f"(e.g. chmod a+r, or check the mount's access rights)."
        )
    if isinstance(err, IsADirectoryError):
        return DataError(f"Cannot read {path}: it is a directory, not a file.")
    if isinstance(err, FileNotFoundError):
        return DataError(f"{path} does not exist.")
    return None


def check_readable(path: str | os.PathLike) -> None:
    """Open ``path`` for reading and close it: a DataError naming the file when that fails.

    For readers that report any failure as one generic error (SimpleITK's C++ reader), so that a
    permission problem is named as such before the reader runs."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise os_error(path, err) or DataError(f"Cannot read {path}: {err}") from err


__all__ = ["DataError", "DataRootError", "check_readable", "os_error"]
