"""The errors of reading a dataset (the lowest layer of the datamodules: everything may import it)."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset file or row is missing, unreadable or malformed. The message names it."""


class DataRootError(DataError):
    """``data.root`` does not exist or does not look like the dataset."""


__all__ = ["DataError", "DataRootError"]
