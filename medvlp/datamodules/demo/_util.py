"""Shared helpers of the synthetic radiology world: seeded RNGs, smoothing, soft shapes, writers.

Everything here is deterministic: the same inputs give the same arrays and the same file bytes
(gzip headers carry no time stamp and no file name).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the integer ``keys`` (order matters).

    Args:
        seed: the user seed of the dataset.
        keys: stream identifiers, e.g. ``(1, study_index, image_index)``.

    Returns:
        An independent ``numpy.random.Generator``; unrelated streams never share state, so
        drawing one image never changes another.
    """
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    """One element of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]


def cap(text: str) -> str:
    """``text`` with its first character upper-cased (the rest untouched)."""
    return text[:1].upper() + text[1:]


def soft(x: np.ndarray, width: float) -> np.ndarray:
    """A smooth step from 0 (``x`` << 0) to 1 (``x`` >> 0) of the given width (logistic)."""
    return 1.0 / (1.0 + np.exp(-np.clip(x / width, -40.0, 40.0)))


def gaussian_blur(a: np.ndarray, sigma: float | Sequence[float]) -> np.ndarray:
    """Separable Gaussian smoothing with reflected borders (no SciPy needed).

    Args:
        a: array of any dimension.
        sigma: standard deviation in voxels, one value for every axis or one per axis (0 skips
            that axis).

    Returns:
        A float32 array of the same shape.
    """
    sigmas = [float(sigma)] * a.ndim if np.isscalar(sigma) else [float(s) for s in sigma]
    out = np.asarray(a, dtype=np.float32)
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        radius = max(1, int(round(3 * s)))
        t = np.arange(-radius, radius + 1, dtype=np.float32)
        kernel = np.exp(-0.5 * (t / s) ** 2)
        kernel /= kernel.sum()
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        for k, weight in enumerate(kernel):  # sum of shifted copies: fast for short kernels
            window = [slice(None)] * out.ndim
            window[axis] = slice(k, k + out.shape[axis])
            acc += weight * padded[tuple(window)]
        out = acc
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian white noise smoothed by ``sigma`` and rescaled to unit standard deviation."""
    n = gaussian_blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    return n / max(float(n.std()), 1e-6)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text with a header line, ``\\n`` line ends and minimal quoting (``None`` -> empty cell)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file; gzip-compressed (reproducible bytes) when ``path`` ends in ``.gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = csv_text(header, rows).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.write_bytes(data)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) with a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def fmt_float(x: float, digits: int = 6) -> str:
    """A float as text with at most ``digits`` significant digits and no trailing noise."""
    return f"{float(x):.{digits}g}"
