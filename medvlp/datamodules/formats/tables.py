"""Official CSV tables and text files, read with every failure named: the file, the line, the column.

* :func:`read_csv` reads a CSV (plain or ``.gz``) with pandas; by default every column is a string
  (IDs round-trip; blank -> NaN, ``specs/datasets.md`` §0). A UTF-8 byte-order mark and CRLF line
  endings are read as the plain file would be. Everything else that would make pandas fail, or
  quietly change the table, raises a :class:`~medvlp.datamodules.errors.DataError` naming the file:
  permission denied, not UTF-8 (with the line and byte), empty, a malformed row, a column named
  twice (pandas would rename the second ``X.1``), a required column missing (with the closest name
  found, for a renamed column). Extra columns are ignored.
* :func:`read_text` reads a text file (a report) as strict UTF-8 (BOM removed, CRLF -> LF).

pandas is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvlp.datamodules.errors import DataError, os_error

if TYPE_CHECKING:
    import pandas as pd


def _raw_bytes(path: Path) -> bytes:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read()


def _where_not_utf8(path: Path) -> str:
    """``"line L, byte 0xNN"`` of the first byte of ``path`` that is not UTF-8 ("" if none)."""
    try:
        data = _raw_bytes(path)
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"line {line}, byte 0x{data[err.start]:02x} at offset {err.start}"
    except (OSError, EOFError):
        return ""
    return ""


def _not_utf8(path: Path) -> DataError:
    where = _where_not_utf8(path)
    return DataError(
        f"{path} is not UTF-8 text ({where or 'undecodable bytes'}); the official files are UTF-8. "
        f"Re-download it, or convert it (e.g. iconv -f latin1 -t utf-8)."
    )


def _header(path: Path, sep: str) -> list[str]:
    """The first CSV row of ``path`` (the column names as written)."""
    opener: Any = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
        return next(csv.reader(fh, delimiter=sep), [])


def missing_columns_message(path: str | os.PathLike, missing: list[str], found: list[str]) -> str:
    """``"<path> lacks the column(s) [...]; found [...]"`` with the closest found name of each
    missing one (a renamed or re-cased column)."""
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, [str(f) for f in found], n=1, cutoff=0.6)
        if not close:
            close = [f for f in map(str, found) if f.strip().lower() == name.lower()][:1]
        if close:
            hints.append(f"'{close[0]}' instead of '{name}'?")
    hint = f" (renamed? {' '.join(hints)})" if hints else ""
    return f"{path} lacks the column(s) {missing}; found {list(found)}{hint}."


def read_csv(path: str | os.PathLike, columns: list[str] | None = None, *, strings: bool = True,
             **kwargs: Any) -> pd.DataFrame:
    """Read an official CSV table; every problem is a DataError naming the file.

    Args:
        path: a ``.csv`` or ``.csv.gz`` file.
        columns: columns that must be present (others are kept and may be ignored by the caller).
        strings: read every column as a string, blank -> NaN (``dtype=str, keep_default_na=False,
            na_values=[""]``); ``False`` leaves pandas' type inference (pass ``dtype`` yourself).
        **kwargs: passed to ``pandas.read_csv``.

    Raises:
        DataError: the file does not exist, cannot be read (permission), is not UTF-8, is empty,
            has a malformed row, names a column twice, or lacks one of ``columns``.
    """
    import pandas as pd

    p = Path(path)
    if strings:
        kwargs = {"dtype": str, "keep_default_na": False, "na_values": [""], **kwargs}
    kwargs.setdefault("encoding", "utf-8")
    try:
        df = pd.read_csv(p, **kwargs)
    except UnicodeDecodeError as err:
        raise _not_utf8(p) from err
    except OSError as err:
        named = os_error(p, err)
        if named is not None:
            raise named from err
        raise DataError(f"Could not read {p} ({type(err).__name__}: {err}); it is probably truncated or corrupt, "
                        f"re-download it.") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{p} is empty (no header line); re-download it.") from err
    except pd.errors.ParserError as err:
        raise DataError(f"{p} is not a well-formed CSV table: {str(err).strip()}.") from err
    except Exception as err:  # noqa: BLE001 - pandas raises many types on a truncated gzip or a bad row
        raise DataError(f"Could not read {p}: {type(err).__name__}: {err}") from err
    if kwargs.get("header", "infer") is not None and kwargs.get("names") is None:
        sep = kwargs.get("sep", kwargs.get("delimiter", ","))
        if isinstance(sep, str) and len(sep) == 1:
            try:
                header = _header(p, sep)
            except (OSError, EOFError, UnicodeDecodeError, csv.Error):
                header = []
            seen: set[str] = set()
            for name in (h.strip() for h in header):
                if name and name in seen:
                    raise DataError(f"{p} names the column '{name}' twice; each column must appear once.")
                seen.add(name)
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(missing_columns_message(p, missing, list(df.columns)))
    return df


def read_header(path: str | os.PathLike, sep: str = ",") -> list[str]:
    """The column names of a CSV (its first row); DataError naming the file if it cannot be read."""
    p = Path(path)
    try:
        return _header(p, sep)
    except UnicodeDecodeError as err:
        raise _not_utf8(p) from err
    except (OSError, EOFError, csv.Error) as err:
        named = os_error(p, err) if isinstance(err, OSError) else None
        raise (named or DataError(f"Could not read the header of {p}: {type(err).__name__}: {err}")) from err


def read_text(path: str | os.PathLike, what: str = "File") -> str:
    """A text file as strict UTF-8 (a byte-order mark removed, CRLF and CR read as LF).

    Raises:
        DataError: ``"<what> <path> does not exist"``, permission denied, or not UTF-8 (the
            message gives the line and the byte).
    """
    p = Path(path)
    try:
        with open(p, encoding="utf-8-sig") as fh:  # universal newlines
            return fh.read()
    except UnicodeDecodeError as err:
        raise _not_utf8(p) from err
    except FileNotFoundError as err:
        raise DataError(f"{what} {p} does not exist.") from err
    except OSError as err:
        raise (os_error(p, err) or DataError(f"{what} {p} could not be read: {err}")) from err


__all__ = ["missing_columns_message", "read_csv", "read_header", "read_text"]
