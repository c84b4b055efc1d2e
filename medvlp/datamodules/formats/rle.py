"""The SIIM-ACR Pneumothorax run-length encoding (``specs/datasets.md`` §4.3, §4.4).

Format: whitespace-separated integer pairs ``(gap, length)``. Pixels are numbered down the
columns (column-major / Fortran order: column ``c``, row ``r`` -> ``c * height + r``). The first
gap is the absolute start of the first run; each later gap counts from the end of the previous
run. ``-1`` (the CSV may hold ``" -1"``) or an empty string is an empty mask. An image with
several annotations has several CSV rows; its mask is their union (:func:`rle_union`).

Example (16x16, column 3 rows 2-5 and column 4 rows 2-5): ``"50 4 12 4"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from medvlp.datamodules.base import DataError

_EMPTY = "-1"
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _show(rle: str, limit: int = 60) -> str:
    return repr(rle if len(rle) <= limit else rle[:limit] + "...")


def _check_size(height: int, width: int) -> int:
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    return int(height) * int(width)


def _runs(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute ``(starts, ends)`` (flat Fortran indices, end exclusive) of a relative RLE."""
    n = _check_size(height, width)
    if not isinstance(rle, str):
        raise DataError(
            f"RLE must be a string such as '-1' or '50 4 12 4', got {type(rle).__name__} {rle!r}."
        )
    text = rle.strip()
    if text in ("", _EMPTY):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    tokens = text.split()
    for i, token in enumerate(tokens):
        if not _INTEGER.fullmatch(token):
            raise DataError(
                f"RLE {_show(rle)} has a non-integer token {token!r} at position {i}; "
                f"expected integer (gap, length) pairs."
            )
    values = np.array([int(t) for t in tokens], dtype=np.int64)
    if len(values) % 2:
        raise DataError(
            f"RLE {_show(rle)} has an odd number of values ({len(values)}); expected (gap, length) pairs."
        )
    if (values < 0).any():
        i = int(np.flatnonzero(values < 0)[0])
        raise DataError(
            f"RLE {_show(rle)} has a negative value {values[i]} at position {i}; gaps and lengths must "
            f"be >= 0 ('-1' alone means an empty mask)."
        )
    gaps, lengths = values[0::2], values[1::2]
    ends = np.cumsum(gaps + lengths)
    starts = ends - lengths
    if ends[-1] > n:
        # absolute encoding: each "gap" is really a start; they increase strictly and fit the image
        if len(gaps) > 1 and (np.diff(gaps) > 0).all() and gaps[-1] + lengths[-1] <= n:
            raise DataError(
                f"RLE {_show(rle)} looks like an absolute (start, length) encoding: its starts increase "
                f"strictly and decoding them as relative gaps runs past the {height}x{width} image "
                f"({ends[-1]} > {n} pixels). The SIIM-ACR format is relative (each gap counts from the end "
                f"of the previous run); convert with gap[i] = start[i] - (start[i-1] + length[i-1])."
            )
        k = int(np.argmax(ends > n))
        raise DataError(
            f"RLE {_show(rle)} runs past the end of the {height}x{width} image: run {k} ends at pixel "
            f"{ends[k]} > {n}. Check the image size (SIIM masks are 1024x1024) and that the value is a "
            f"relative RLE."
        )
    return starts, ends


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode one SIIM-ACR RLE string to a binary mask.

    Args:
        rle: the ``EncodedPixels`` value, surrounding spaces allowed; ``"-1"`` or ``""`` = empty.
        height: image rows (1024 for SIIM).
        width: image columns (1024 for SIIM).

    Returns:
        ``[height, width]`` uint8 mask with values {0, 1}, C-contiguous.

    Raises:
        DataError: non-string value, non-integer token, odd token count, a negative value, a
            run past the end of the image, or an absolute (start, length) encoding (the message
            says which).
    """
    starts, ends = _runs(rle, height, width)
    n = int(height) * int(width)
    delta = np.zeros(n + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    flat = (np.cumsum(delta[:-1]) > 0).astype(np.uint8)
    return np.ascontiguousarray(flat.reshape((int(height), int(width)), order="F"))


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2D mask as a SIIM-ACR RLE string (inverse of :func:`rle_decode`).

    Args:
        mask: ``[H, W]`` array; every non-zero pixel is foreground (0/1, bool or 0/255 all work).

    Returns:
        ``"gap length gap length ..."`` with maximal runs, or ``"-1"`` for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"Expected a 2D mask [H, W], got shape {mask.shape}")
    flat = (mask != 0).ravel(order="F").astype(np.int8)
    edges = np.diff(np.concatenate(([0], flat, [0])))
    starts = np.flatnonzero(edges == 1)
    if starts.size == 0:
        return _EMPTY
    ends = np.flatnonzero(edges == -1)
    gaps = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.stack([gaps, ends - starts], axis=1).ravel()
    return " ".join(map(str, pairs.tolist()))


def rle_union(rles: Iterable[str] | str, height: int, width: int) -> np.ndarray:
    """Union (logical OR) of the RLE rows of one image.

    Args:
        rles: the image's ``EncodedPixels`` values (a single string counts as one row).
        height: image rows.
        width: image columns.

    Returns:
        ``[height, width]`` uint8 mask with values {0, 1}; all zero when every row is ``-1``.

    Raises:
        DataError: as :func:`rle_decode`, prefixed with the index of the bad row.
    """
    if isinstance(rles, str):
        rles = [rles]
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    for i, rle in enumerate(rles):
        try:
            mask |= rle_decode(rle, height, width)
        except DataError as err:
            raise DataError(f"RLE row {i} of the image: {err}") from err
    return mask
