"""Reading the cache ``medvlp preprocess`` writes: its layout, its manifest and the arrays training reads.

The writing side is :mod:`medvlp.preprocess` (which describes the layout in full); this module is
what a datamodule needs to use a cache, and it imports nothing from the datamodules but their
errors, so that the layers run one way: ``preprocess`` -> ``datamodules.base`` -> ``datamodules.cache``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.datamodules.errors import DataError, os_error

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from medvlp.datamodules.base import Record
    from medvlp.datamodules.radiograph import RadiographDataModule

FORMAT_VERSION = 1
RESIZE_RULE = "longest_side:area_down,bilinear_up"  # transforms.resize_longest_side, then round to uint8
DTYPE = "uint8"
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
IMAGES = "images"
LOCK = ".lock"
SPLITS = ("train", "val", "test")
MAX_NAMED_FAILURES = 5


# --------------------------------------------------------------------------- keys and settings
def image_key(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The cache key of an image: its path relative to the dataset root, with ``/`` separators."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def image_file(key: str) -> str:
    """Path of an image's array inside the cache folder: ``images/<2 hex>/<32 hex>.npy``."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:32]
    return f"{IMAGES}/{digest[:2]}/{digest}.npy"


def extra_file(key: str, name: str) -> str:
    """Path of a second array stored with an image (``images/<2 hex>/<32 hex>.<name>.npy``)."""
    return image_file(key)[: -len(".npy")] + f".{name}.npy"


def settings(dm: RadiographDataModule) -> dict[str, Any]:
    """What the cached arrays depend on (compared with ``manifest.json`` on every use).

    A datamodule with its own ``cache_settings()`` (3D volumes) adds those; 2D radiographs add the
    image size, the resize rule, the dtype and their ``pixel_keys``.
    """
    cfg = dm.cfg
    base = {"format_version": FORMAT_VERSION, "dataset": str(cfg.name),
            "root": os.path.abspath(os.path.expanduser(str(cfg.root)))}
    if hasattr(dm, "cache_settings"):
        return {**base, **{k: _plain(v) for k, v in dm.cache_settings().items()}}
    pixel = {k: _plain(getattr(cfg, k)) for k in dm.pixel_keys if hasattr(cfg, k)}
    return {**base, "image_size": int(getattr(dm, "read_size", cfg.image_size)), "resize": RESIZE_RULE, "dtype": DTYPE,
            "pixel_settings": pixel}


def _plain(value: Any) -> Any:
    """An OmegaConf / numpy value as plain JSON data."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, np.generic):
        return value.item()
    return value


def default_dir(dm: RadiographDataModule) -> Path:
    """``<cache_dir()>/preprocessed/<data.name>-<12 hex digest of the settings>``."""
    from medvlp.cache import cache_dir

    digest = hashlib.sha1(json.dumps(settings(dm), sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return cache_dir() / "preprocessed" / f"{dm.cfg.name}-{digest}"


def cache_dir_for(dm: RadiographDataModule) -> Path:
    """``data.preprocessed_dir`` (made absolute) or :func:`default_dir`."""
    given = str(getattr(dm.cfg, "preprocessed_dir", "") or "")
    return Path(os.path.abspath(os.path.expanduser(given))) if given else default_dir(dm)


_KEY_NAMES = {"dataset": "data.name", "root": "data.root", "image_size": "data.image_size"}
_SUB_KEY_NAMES = {"pad_hu": "data.window (its low end pads the volumes)"}


def differences(manifest: dict[str, Any], wanted: dict[str, Any], crop: bool = False) -> list[str]:
    """``"<key>: cache <a>, config <b>"`` for every compared setting that differs (``crop``: the stored size
    is ``data.crop_from``'s)."""
    out = []
    names = {**_KEY_NAMES, "image_size": "data.crop_from"} if crop else _KEY_NAMES
    for key, value in wanted.items():
        if key in ("pixel_settings", "volume_settings") and isinstance(value, dict):
            have = manifest.get(key) or {}
            for k in sorted(set(have) | set(value)):
                if have.get(k) != value.get(k):
                    name = _SUB_KEY_NAMES.get(k, f"data.{k}")
                    out.append(f"{name}: cache {have.get(k)!r}, config {value.get(k)!r}")
        elif manifest.get(key) != value:
            out.append(f"{names.get(key, key)}: cache {manifest.get(key)!r}, config {value!r}")
    return out


def command(dm: RadiographDataModule, splits: Sequence[str] | None = None) -> str:
    """The ``medvlp preprocess`` command line that builds this datamodule's cache."""
    cfg = dm.cfg
    parts = ["medvlp preprocess", f"--data {cfg.name}"]
    if splits:
        parts.append(f"--splits {','.join(splits)}")
    parts.append(f"data.root={settings(dm)['root']}")
    if hasattr(dm, "cache_settings"):  # volumes: the config keys the stored arrays depend on
        keys = (*getattr(dm, "cache_keys", ()), *(dm.cache_extra_keys() if hasattr(dm, "cache_extra_keys") else ()))
        for key in keys:
            value = _plain(getattr(cfg, key))
            text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list | tuple) else str(value)
            parts.append(f"data.{key}={text}")
    else:
        parts.append(f"data.image_size={int(cfg.image_size)}")
        if int(getattr(cfg, "crop_from", 0) or 0):
            parts.append(f"data.crop_from={int(cfg.crop_from)}")
        parts += [f"data.{k}={v}" for k, v in settings(dm)["pixel_settings"].items()]
    if getattr(cfg, "preprocessed_dir", ""):
        parts.append(f"data.preprocessed_dir={cache_dir_for(dm)}")
    return " ".join(parts)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The folder's ``manifest.json`` (None if absent). DataError if it cannot be parsed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable manifest ({err}); delete the folder {directory} and preprocess again.") from err
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a manifest (a JSON object); delete the folder {directory} and preprocess again.")
    return data


COMPACT_INDEX = "index.npz"  # the index as arrays, rebuilt from index.jsonl whenever that file changed


class CompactIndex:
    """A cache's index as a few numpy arrays: the 128-bit digests of the keys, sorted, and their entries.

    At MIMIC-CXR scale (377k images) a dict of strings and tuples takes hundreds of MB and seconds to build,
    and every DataLoader worker copies it page by page (reference counting writes into every object);
    these arrays take a few MB, load in milliseconds from ``index.npz`` and stay shared between forked
    workers. It answers what training asks of the index: ``key in index``, ``index.get(key)`` (the entry
    as the tuple ``index.jsonl`` holds: ints stay ints) and ``len(index)``.
    """

    def __init__(self, hi: np.ndarray, lo: np.ndarray, meta: np.ndarray, ints: np.ndarray, widths: np.ndarray) -> None:
        self.hi, self.lo, self.meta, self.ints, self.widths = hi, lo, meta, ints, widths

    @staticmethod
    def digest_bytes(key: str) -> bytes:
        """The key's 128-bit BLAKE2b digest: two little-endian uint64 halves, ``(hi, lo)``."""
        return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()

    @classmethod
    def digest(cls, key: str) -> tuple[int, int]:
        d = cls.digest_bytes(key)
        return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")

    @classmethod
    def build(cls, entries: dict[str, tuple]) -> CompactIndex:
        n = len(entries)
        metas = list(entries.values())
        blob = b"".join(map(cls.digest_bytes, entries))
        digests = np.frombuffer(blob, dtype="<u8").reshape(n, 2) if n else np.zeros((0, 2), np.uint64)
        widths = np.fromiter(map(len, metas), np.int8, n)
        width = int(widths.max()) if n else 0
        if n and int(widths.min()) == width:
            meta = np.array(metas, dtype=np.float64).reshape(n, width)
        else:
            meta = np.full((n, width), np.nan)
            for i, m in enumerate(metas):
                meta[i, :len(m)] = m
        ints = np.array([all(type(m[c]) is int for m in metas if len(m) > c) for c in range(width)], bool)
        order = np.lexsort((digests[:, 1], digests[:, 0]))
        return cls(np.ascontiguousarray(digests[order, 0]), np.ascontiguousarray(digests[order, 1]), meta[order], ints,
                   widths[order])

    def _row(self, key: str) -> int:
        h, low = self.digest(key)
        i = int(np.searchsorted(self.hi, np.uint64(h)))
        while i < len(self.hi) and int(self.hi[i]) == h:
            if int(self.lo[i]) == low:
                return i
            i += 1
        return -1

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._row(key) >= 0

    def get(self, key: str, default: Any = None) -> tuple | Any:
        i = self._row(key)
        if i < 0:
            return default
        row = self.meta[i, : int(self.widths[i])]
        return tuple(int(v) if self.ints[c] else float(v) for c, v in enumerate(row))

    def __getitem__(self, key: str) -> tuple:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __len__(self) -> int:
        return len(self.hi)

    def __iter__(self):
        raise TypeError("A CompactIndex holds the digests of its keys, not the keys; parse_index(index.jsonl) lists them.")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactIndex):
            return NotImplemented
        return all(np.array_equal(getattr(self, k), getattr(other, k), equal_nan=k == "meta")
                   for k in ("hi", "lo", "meta", "ints", "widths"))

    __hash__ = None  # type: ignore[assignment]

    def save(self, path: Path, stamp: tuple[int, int]) -> None:
        """Write ``path`` (``.npz``, no pickles) beside the index, atomically; ``stamp`` = ``(size, mtime_ns)``
        of the ``index.jsonl`` it was built from."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, hi=self.hi, lo=self.lo, meta=self.meta, ints=self.ints, widths=self.widths,
                     stamp=np.array(stamp, np.int64))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, stamp: tuple[int, int]) -> CompactIndex | None:
        """The arrays in ``path`` if they were built from the ``index.jsonl`` of this ``stamp``; else None."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if tuple(int(v) for v in z["stamp"]) != tuple(stamp):
                    return None
                return cls(z["hi"], z["lo"], z["meta"], z["ints"], z["widths"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, cut short, another layout
            return None


def parse_index(path: Path) -> dict[str, tuple]:
    """``{key: meta}`` from an ``index.jsonl``; a torn line (an interrupted write) is ignored, and of a key
    written twice the last line counts."""
    index: dict[str, tuple] = {}
    if not path.is_file():
        return index
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    lines = text.splitlines()
    try:  # every line whole (the usual case): one parse
        rows = json.loads("[" + ",".join(line for line in lines if line.strip()) + "]")
    except ValueError:
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    for row in rows:
        if isinstance(row, list) and len(row) > 1:
            index[str(row[0])] = tuple(row[1:])
    return index


def read_index(directory: Path) -> CompactIndex:
    """The index of the cache in ``directory`` (2D: ``(H, W)`` of the stored original; 3D: the spacing
    ``(z, y, x)`` mm and origin ``(x, y, z)`` mm of the stored volume) as a :class:`CompactIndex`: read from
    ``index.npz`` when that was built from the current ``index.jsonl``, else parsed from it (a torn last
    line ignored) and ``index.npz`` rewritten beside it when the folder is writable."""
    path = Path(directory) / INDEX
    try:
        st = path.stat()
    except FileNotFoundError:
        return CompactIndex.build({})
    stamp = (st.st_size, st.st_mtime_ns)
    compact = CompactIndex.load(Path(directory) / COMPACT_INDEX, stamp)
    if compact is not None:
        return compact
    compact = CompactIndex.build(parse_index(path))
    try:
        compact.save(Path(directory) / COMPACT_INDEX, stamp)
    except OSError as err:  # a read-only cache: parsed again next time
        log.debug("could not write %s: %s", Path(directory) / COMPACT_INDEX, err)
    return compact


# --------------------------------------------------------------------------- reading (training)
@dataclass
class PreprocessedImages:
    """A preprocessed cache opened for reading: ``read(path) -> (pixels, (H, W))`` or None."""

    directory: Path
    root: str
    index: CompactIndex | dict[str, tuple]
    command: str = ""  # the command that builds / completes it (for messages)
    dtype: str = DTYPE  # of every stored array
    ndim: int = 2  # 2: images [h, w]; 3: volumes [D, H, W] (read memory-mapped)

    def __contains__(self, path: str) -> bool:
        return image_key(path, self.root) in self.index

    def read(self, path: str) -> tuple[np.ndarray, tuple] | None:
        """The cached array of the file at ``path`` and its index entry, or None when the cache
        does not hold it: 2D ``(uint8 [h, w], (H, W) of the original)``; 3D ``(int16 [D, H, W]
        memory-mapped, (spacing z, y, x, origin x, y, z))``.

        Raises:
            DataError: naming the cached file when it is unreadable.
        """
        key = image_key(path, self.root)
        orig = self.index.get(key)
        if orig is None:
            return None
        file = self.directory / image_file(key)
        pixels = self._load(file, f"copy {file} of {path}", mmap=self.ndim == 3)
        if pixels is None:
            return None
        if pixels.dtype != np.dtype(self.dtype) or pixels.ndim != self.ndim:
            raise DataError(f"The preprocessed copy {file} of {path} holds {pixels.dtype} {pixels.shape}, not "
                            f"{self.dtype} with {self.ndim} axes; delete it and run:\n  {self.command}")
        return pixels, orig

    def read_extra(self, path: str, name: str) -> np.ndarray | None:
        """A second array stored with the file at ``path`` (e.g. ``anatomy``: the volume's label map on the
        volume's grid, uint8), memory-mapped; None when the cache does not hold it.

        Raises:
            DataError: naming the cached file when it is unreadable.
        """
        key = image_key(path, self.root)
        if key not in self.index:
            return None
        file = self.directory / extra_file(key, name)
        return self._load(file, f"{name} of {path} ({file})", mmap=True)

    def _load(self, file: Path, what: str, mmap: bool) -> np.ndarray | None:
        """``np.load`` of one stored array (None when the file is absent); a damaged file is named."""
        try:
            return np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
        except FileNotFoundError:
            return None
        except PermissionError as err:
            raise os_error(file, err) from err  # type: ignore[misc]
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"The preprocessed {what} is unreadable ({err}); delete it and run:\n  {self.command}") from err

    def missing(self, records: Iterable[Record]) -> list[str]:
        """Image paths of ``records`` the index does not hold."""
        out = []
        for rec in records:
            for path in rec.image_path if isinstance(rec.image_path, list) else [rec.image_path]:
                if image_key(path, self.root) not in self.index:
                    out.append(str(path))
        return out

    def check_coverage(self, dm: RadiographDataModule, split: str, records: list[Record]) -> None:
        """Apply ``data.use_preprocessed`` to the images of ``split`` the cache lacks: ``true`` raises,
        ``auto`` logs how many are decoded on the fly."""
        missing = self.missing(records)
        if not missing:
            log.info("%s %s: reading %d images from the preprocessed cache %s", dm.cfg.name, split, len(records),
                     self.directory)
            return
        total = sum(len(r.image_path) if isinstance(r.image_path, list) else 1 for r in records)
        text = (f"{len(missing)} of {total} {split} images are not in the preprocessed cache {self.directory} "
                f"(first: {missing[0]})")
        if dm.use_preprocessed == "true":
            raise DataError(f"data.use_preprocessed=true, but {text}. Complete it with:\n  {command(dm, [split])}\n"
                            f"(images that failed to decode stay missing; or set data.use_preprocessed=auto to decode them on the fly)")
        log.info("%s %s: %s; those are decoded on the fly", dm.cfg.name, split, text)


def open_for_training(dm: RadiographDataModule) -> PreprocessedImages | None:
    """The cache ``dm`` should read under ``data.use_preprocessed``, or None to decode on the fly.

    Raises:
        DataError: ``use_preprocessed=true`` and the cache is absent or its manifest differs
            (the message names the differing keys and the command to run).
    """
    mode = dm.use_preprocessed
    if mode == "false":
        return None
    directory = cache_dir_for(dm)
    cmd = command(dm)
    manifest = read_manifest(directory)
    if manifest is None:
        if mode == "true":
            raise DataError(f"data.use_preprocessed=true, but {directory} holds no preprocessed cache (no {MANIFEST}). "
                            f"Build it with:\n  {cmd}")
        log.info("%s: no preprocessed cache at %s; decoding images on the fly (build one with `%s`)",
                 dm.cfg.name, directory, cmd)
        return None
    diff = differences(manifest, settings(dm), crop=bool(getattr(dm.cfg, "crop_from", 0)))
    if diff:
        text = f"the preprocessed cache {directory} was made with other settings ({'; '.join(diff)})"
        if mode == "true":
            raise DataError(f"data.use_preprocessed=true, but {text}. Build a matching one with (leave "
                            f"data.preprocessed_dir empty for a per-setting default folder):\n  {cmd}")
        log.info("%s: %s; decoding images on the fly", dm.cfg.name, text)
        return None
    wanted = settings(dm)
    return PreprocessedImages(directory, wanted["root"], read_index(directory), cmd, dtype=str(wanted["dtype"]),
                              ndim=int(wanted.get("ndim", 2)))


# --------------------------------------------------------------------------- writing
