"""``medvlp preprocess``: decode every 2D radiograph or 3D volume once into a cache that training reads.

3D volumes (a datamodule with ``cache_settings()`` and ``cache_item(record) -> (array, entry)``,
e.g. ``ct_rate``) are stored as int16 HU after reading, rescale, reorientation and resampling
(the expensive part), memory-mappable, with their spacing and origin in the index; windowing,
crop / pad and normalisation still run per step. With ``data.anatomy_dir`` each volume's anatomy label
map is stored beside it (``<hash>.anatomy.npy``, uint8, resampled with nearest neighbour onto the
volume's grid), so that fVLM trains from the cache without reading the masks. The rest of this docstring describes 2D images;
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
from medvlp.datamodules.cache import (  # noqa: F401  (the reader, re-exported: one place for the layout)
    DTYPE,
    FORMAT_VERSION,
    IMAGES,
    INDEX,
    LOCK,
    MANIFEST,
    MAX_NAMED_FAILURES,
    RESIZE_RULE,
    SPLITS,
    PreprocessedImages,
    _plain,
    cache_dir_for,
    command,
    default_dir,
    differences,
    extra_file,
    image_file,
    image_key,
    open_for_training,
    parse_index,
    read_index,
    read_manifest,
    settings,
)

if TYPE_CHECKING:
    from medvlp.datamodules.radiograph import RadiographDataModule

log = logging.getLogger(__name__)

def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
            array, meta, *more = dm.cache_item(record)
            for name, extra in (more[0] if more else {}).items():  # e.g. the anatomy label map, before the volume
                write_array(directory / extra_file(key, name), extra)
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
        diff = differences(manifest, wanted, crop=bool(getattr(dm.cfg, "crop_from", 0)))
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
    size = int(getattr(dm, "read_size", 0) or getattr(dm.cfg, "image_size", 0) or 0)
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
                        f"{error.rstrip('.')}. The {summary.done + summary.skipped_existing} images cached so far are kept in "
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
