"""``medvlp preprocess``: decode every 2D radiograph or 3D volume once into a cache that training reads.

3D volumes (a datamodule with ``cache_settings()`` and ``cache_item(record) -> (array, entry)``,
e.g. ``ct_rate``) are stored as int16 HU after reading, rescale, reorientation and resampling
(the expensive part), memory-mappable, with their spacing and origin in the index; windowing,
crop / pad and normalisation still run per step. The rest of this docstring describes 2D images;
the folder layout, atomic writes, resumption, locking and manifest checks are the same for both.

Decoding a full-size chest X-ray (a 2,500 x 3,000 px DICOM or JPEG) takes tens to hundreds of
milliseconds; reading a 224-px array takes well under one. This module decodes each image of the
requested splits once, through the datamodule's own ``read_pixels`` (so DICOM VOI, MONOCHROME1,
16-bit PNG scaling, ... are exactly those of training), resizes it so that its longest side is
``data.image_size`` (area averaging when shrinking, bilinear when enlarging: the rule of
:func:`~medvlp.datamodules.transforms.resize_longest_side`; aspect ratio kept, no padding) and
stores it as uint8. :class:`~medvlp.datamodules.radiograph.RadiographDataModule` then reads the
cache (``data.use_preprocessed``); the letterbox, augmentation and normalisation still run per step.

Layout of the cache folder (``data.preprocessed_dir``; "" = ``<cache_dir()>/preprocessed/<name>-<digest>``,
the digest covering the absolute root, ``data.image_size`` and the dataset's pixel settings)::

    manifest.json          settings (compared on every use) + informative counts
    index.jsonl            one line per stored image: ["<path relative to data.root>", H, W]
                           (H, W = size of the stored original: the frame of boxes and masks)
    images/ab/<hash>.npy   uint8 [h, w], max(h, w) == image_size; <hash> = sha1 of the relative
                           path (first 32 hex digits), ab = its first two digits (256 shards)
    .lock                  held (flock) while a preprocess run writes

Every array is written to ``<hash>.npy.tmp`` and renamed into place, and its index line is
appended only after the rename, so an interrupted run never leaves a file that counts: a re-run
skips the images that have both a file and an index line and redoes the rest (a stale ``.tmp``
is overwritten). A config whose settings differ from an existing manifest is refused with a
DataError naming the differing keys; the cache is never mixed.

``data.on_error`` applies per image: ``raise`` (default) stops at the first unreadable image
(what was written is kept; a re-run resumes), ``skip`` counts and reports the failures (those
images are then decoded on the fly by training, which applies ``on_error`` again).

Config keys used: ``data.name``, ``data.root``, ``data.image_size``, ``data.preprocessed_dir``,
``data.on_error``, ``data.num_workers`` (default worker count) and the datamodule's
``pixel_keys`` (e.g. ``data.voi``). ``data.label_fraction`` and ``data.limit_train`` do not apply:
the cache covers whole splits, so every label fraction reads from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.datamodules.base import DataError, Record

if TYPE_CHECKING:
    from medvlp.datamodules.radiograph import RadiographDataModule

log = logging.getLogger(__name__)

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
    return {**base, "image_size": int(cfg.image_size), "resize": RESIZE_RULE, "dtype": DTYPE,
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


def differences(manifest: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"<key>: cache <a>, config <b>"`` for every compared setting that differs."""
    out = []
    for key, value in wanted.items():
        if key == "pixel_settings":
            have = manifest.get(key) or {}
            for k in sorted(set(have) | set(value)):
                if have.get(k) != value.get(k):
                    out.append(f"data.{k}: cache {have.get(k)!r}, config {value.get(k)!r}")
        elif manifest.get(key) != value:
            out.append(f"{_KEY_NAMES.get(key, key)}: cache {manifest.get(key)!r}, config {value!r}")
    return out


def command(dm: RadiographDataModule, splits: Sequence[str] | None = None) -> str:
    """The ``medvlp preprocess`` command line that builds this datamodule's cache."""
    cfg = dm.cfg
    parts = ["medvlp preprocess", f"--data {cfg.name}"]
    if splits:
        parts.append(f"--splits {','.join(splits)}")
    parts.append(f"data.root={settings(dm)['root']}")
    if hasattr(dm, "cache_settings"):  # volumes: the config keys the stored arrays depend on
        for key in getattr(dm, "cache_keys", ()):
            value = _plain(getattr(cfg, key))
            text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list | tuple) else str(value)
            parts.append(f"data.{key}={text}")
    else:
        parts.append(f"data.image_size={int(cfg.image_size)}")
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


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_index(directory: Path) -> dict[str, tuple]:
    """``{key: meta}`` from ``index.jsonl`` (2D: ``(H, W)`` of the stored original; 3D: the spacing
    ``(z, y, x)`` mm and origin ``(x, y, z)`` mm of the stored volume); a torn last line (an
    interrupted write) is ignored."""
    path = Path(directory) / INDEX
    index: dict[str, tuple] = {}
    if not path.is_file():
        return index
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                key, *meta = json.loads(line)
            except (ValueError, TypeError):
                continue
            if meta:
                index[str(key)] = tuple(meta)
    return index


# --------------------------------------------------------------------------- reading (training)
@dataclass
class PreprocessedImages:
    """A preprocessed cache opened for reading: ``read(path) -> (pixels, (H, W))`` or None."""

    directory: Path
    root: str
    index: dict[str, tuple]
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
        try:
            pixels = np.load(file, allow_pickle=False, mmap_mode="r" if self.ndim == 3 else None)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"The preprocessed copy {file} of {path} is unreadable ({err}); delete it and run:\n  "
                            f"{self.command}") from err
        if pixels.dtype != np.dtype(self.dtype) or pixels.ndim != self.ndim:
            raise DataError(f"The preprocessed copy {file} of {path} holds {pixels.dtype} {pixels.shape}, not "
                            f"{self.dtype} with {self.ndim} axes; delete it and run:\n  {self.command}")
        return pixels, orig

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
    diff = differences(manifest, settings(dm))
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
def resize_to(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[h, w]`` with ``max(h, w) == size``: :func:`~medvlp.datamodules.transforms.resize_longest_side`
    (area averaging down, bilinear up) of ``gray`` in [0, 1], rounded back to uint8."""
    import torch

    from medvlp.datamodules.transforms import resize_longest_side, to_float_image

    out = resize_longest_side(to_float_image(np.ascontiguousarray(gray)), int(size))[0]
    return (out * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def write_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` atomically (``<path>.tmp`` then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


_WORKER: dict[str, Any] = {}


def _init_worker(dm: RadiographDataModule, directory: str, size: int) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(dm=dm, directory=Path(directory), size=size)


def _process(task: tuple[str, Record]) -> tuple[str, list, str | None]:
    """Decode and store one file: ``(key, index entry, None)`` or ``(key, [], error message)``.

    2D radiographs: resized to ``data.image_size`` (entry = original ``[H, W]``); datamodules with
    ``cache_item(record) -> (array, entry)`` (3D volumes) store what it returns.
    """
    key, record = task
    dm, directory, size = _WORKER["dm"], _WORKER["directory"], _WORKER["size"]
    path = str(record.image_path)
    try:
        if hasattr(dm, "cache_item"):
            array, meta = dm.cache_item(record)
            write_array(directory / image_file(key), array)
            return key, [_plain(v) for v in meta], None
        pixels = dm.read_pixels(record, train=False)
        if pixels.ndim != 2:
            raise DataError(f"read_pixels returned shape {pixels.shape} for {path}; expected a gray [H, W] image")
        orig_h, orig_w = dm.original_size(record, pixels)
        write_array(directory / image_file(key), resize_to(pixels, size))
    except Exception as err:  # noqa: BLE001 - reported per image (data.on_error)
        msg = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
        if path not in msg:
            msg = f"{path}: {msg}"
        return key, [], msg
    return key, [int(orig_h), int(orig_w)], None


@dataclass
class PreprocessSummary:
    """What a ``preprocess`` run did."""

    directory: Path
    dataset: str
    splits: list[str]
    total: int = 0  # distinct images of the splits
    done: int = 0  # decoded and stored by this run
    skipped_existing: int = 0  # already in the cache
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first MAX_NAMED_FAILURES messages
    seconds: float = 0.0
    workers: int = 1

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"preprocessed {self.dataset} ({', '.join(self.splits)}): {self.total} images -> {self.directory}",
            f"  done {self.done}   skipped (already cached) {self.skipped_existing}   failed {self.failed}   "
            f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, {self.workers} worker(s))",
        ]
        if self.failures:
            lines.append("  first failures (not cached; training decodes them on the fly and applies data.on_error):")
            lines += [f"    {m}" for m in self.failures]
        return "\n".join(lines)


def _full_split_config(cfg: Any) -> Any:
    """A copy of ``cfg`` with ``label_fraction=1`` and ``limit_train=0`` (the cache covers whole splits)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, label_fraction=1.0, limit_train=0)
    import copy

    out = copy.deepcopy(cfg)
    out.label_fraction = 1.0
    out.limit_train = 0
    return out


def _cacheable(cls: type) -> bool:
    from medvlp.datamodules.radiograph import RadiographDataModule

    return issubclass(cls, RadiographDataModule) or hasattr(cls, "cache_item")


def datamodule_class(name: str) -> type[RadiographDataModule]:
    """The registered datamodule ``name``; DataError unless it can be preprocessed (the 2D radiograph
    datasets and the volume datasets with ``cache_item``)."""
    from medvlp.registry import DATAMODULES

    cls = DATAMODULES.get(str(name))
    if not _cacheable(cls):
        ok = sorted(n for n in DATAMODULES.names() if _cacheable(DATAMODULES.get(n)))
        raise DataError(f"medvlp preprocess supports {', '.join(ok)}; data.name={name} is not one of them.")
    return cls


def build(cfg: Any) -> RadiographDataModule:
    """The datamodule of ``cfg`` (``data.*``) over whole splits; checks its root."""
    cls = datamodule_class(str(cfg.name))
    cls.check_root(cfg)
    return cls(_full_split_config(cfg))


class _Lock:
    """An exclusive ``flock`` on ``<dir>/.lock`` (one writer per cache folder)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        self.fh: Any = None

    def __enter__(self) -> _Lock:
        self.fh = open(self.path, "a")  # noqa: SIM115 - released in __exit__
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError as err:
            self.fh.close()
            raise DataError(f"Another `medvlp preprocess` is writing to {self.path.parent} (its lock {self.path} is held); "
                            f"wait for it to finish.") from err
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()  # closing releases the flock


def preprocess(
    cfg: Any,
    splits: Sequence[str] = SPLITS,
    workers: int | None = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Decode the images of ``splits`` once into the preprocessed cache (see the module docstring).

    Args:
        cfg: the ``data`` config (dataclass or DictConfig) of a 2D radiograph datamodule, its root
            resolved (``medvlp preprocess`` resolves ``data.root=demo``).
        splits: the splits whose images are cached.
        workers: decoding processes; None = ``data.num_workers`` or ``os.cpu_count()``; 0 or 1
            decodes in this process.
        progress: show a progress bar (tqdm, on stderr).

    Returns:
        The counts of images done / already cached / failed, the first failures and the time.

    Raises:
        DataError: not a radiograph dataset; the folder holds a cache made with other settings
            (the message names the keys) or other files; another run holds the lock; with
            ``data.on_error=raise``, the first unreadable image (named; what was written is kept).
    """
    t0 = time.perf_counter()
    dm = build(cfg)
    directory = cache_dir_for(dm)
    wanted = settings(dm)
    manifest = read_manifest(directory)
    if manifest is not None:
        diff = differences(manifest, wanted)
        if diff:
            raise DataError(
                f"{directory} holds a preprocessed cache made with other settings: {'; '.join(diff)}. It is never "
                f"mixed: choose another data.preprocessed_dir (or leave it empty for a per-setting default folder), "
                f"or delete {directory}."
            )
    elif directory.is_dir() and any(p.name != LOCK for p in directory.iterdir()):
        raise DataError(f"data.preprocessed_dir={directory} is not empty and holds no {MANIFEST}; choose an empty or new folder.")
    directory.mkdir(parents=True, exist_ok=True)

    # distinct images of the splits, each with one record (read_pixels may look at its fields)
    tasks: dict[str, Record] = {}
    for split in splits:
        for rec in dm.records(split):
            for path in rec.image_path if isinstance(rec.image_path, list) else [rec.image_path]:
                key = image_key(path, wanted["root"])
                if key not in tasks:
                    tasks[key] = rec if path == rec.image_path else dataclasses.replace(rec, image_path=path)
    n_workers = int(workers) if workers is not None else int(dm.cfg.num_workers or os.cpu_count() or 1)
    summary = PreprocessSummary(directory, str(dm.cfg.name), list(splits), total=len(tasks), workers=max(1, n_workers))

    with _Lock(directory):
        if manifest is None:
            _write_json_atomic(directory / MANIFEST, {**wanted, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                      "datamodule": type(dm).__name__})
        for i in range(256):
            (directory / IMAGES / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        index = read_index(directory)
        todo = []
        for key, rec in tasks.items():
            file = directory / image_file(key)
            if key in index and file.is_file() and file.stat().st_size > 0:
                summary.skipped_existing += 1
            else:
                todo.append((key, rec))
        if summary.skipped_existing:
            log.info("%s: %d of %d images already in %s%s", dm.cfg.name, summary.skipped_existing, len(tasks), directory,
                     f"; decoding the other {len(todo)}" if todo else "")
        try:
            _run(dm, directory, todo, summary, n_workers, progress)
        finally:
            summary.seconds = time.perf_counter() - t0
            stored = read_index(directory)
            manifest_now = read_manifest(directory) or wanted
            manifest_now.update(images=len(stored), updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                last_run={"splits": list(splits), "done": summary.done, "failed": summary.failed,
                                          "skipped_existing": summary.skipped_existing})
            _write_json_atomic(directory / MANIFEST, manifest_now)
    return summary


def _end_torn_line(path: Path) -> None:
    """Terminate a torn last line of ``path`` (a run killed mid-write), so that the next line appended
    is not glued onto it and lost."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def _run(dm: RadiographDataModule, directory: Path, todo: list[tuple[str, Record]], summary: PreprocessSummary,
         n_workers: int, progress: bool) -> None:
    """Decode ``todo`` (in a pool of ``n_workers`` processes when > 1), appending each stored image
    to the index; applies ``data.on_error``."""
    from tqdm.auto import tqdm

    if not todo:
        return
    size = int(getattr(dm.cfg, "image_size", 0) or 0)
    bar = tqdm(total=len(todo), unit="img", desc=f"preprocess {dm.cfg.name}", disable=not progress, dynamic_ncols=True)
    pool = None
    saved = dict(_WORKER)
    try:
        if n_workers > 1:
            import multiprocessing as mp

            import medvlp.datamodules.transforms  # noqa: F401 - torch imported once here, inherited by forked workers

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(n_workers, initializer=_init_worker, initargs=(dm, str(directory), size))
            chunk = max(1, min(8, len(todo) // (n_workers * 8)))
            results: Iterable[tuple[str, list, str | None]] = pool.imap_unordered(_process, todo, chunksize=chunk)
        else:
            _WORKER.update(dm=dm, directory=directory, size=size)
            results = map(_process, todo)
        _end_torn_line(directory / INDEX)
        with open(directory / INDEX, "a", encoding="utf-8") as index:
            for key, meta, error in results:
                bar.update(1)
                if error is None:
                    index.write(json.dumps([key, *meta]) + "\n")
                    index.flush()
                    summary.done += 1
                    continue
                summary.failed += 1
                if len(summary.failures) < MAX_NAMED_FAILURES:
                    summary.failures.append(error)
                if dm.cfg.on_error != "skip":
                    raise DataError(
                        f"{error}. The {summary.done + summary.skipped_existing} images cached so far are kept in "
                        f"{directory}; re-run the command to continue, or set data.on_error=skip to skip (and count) "
                        f"unreadable images."
                    )
                log.warning("preprocess %s: skipping %s", dm.cfg.name, error)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _WORKER.clear()
        _WORKER.update(saved)
