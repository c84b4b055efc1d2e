"""The record of every item a run did not use: dropped while building records, or skipped at load time.

Two sources fill :attr:`VLPDataModule.dropped <medvlp.datamodules.base.VLPDataModule.dropped>`:

* building records: a study without a usable report, a listed file that does not exist, a row
  that cannot be parsed, ... (each datamodule calls ``dm.note_dropped(split, study_id, reason)``);
* loading items with ``data.on_error=skip``: an unreadable image is skipped inside a DataLoader
  worker; its id and reason travel in the batch (``ImageTextBatch.skipped_ids`` /
  ``skipped_reasons``) and :class:`DroppedItems` adds them to the datamodule's record.

:func:`write_dropped` writes the record as ``dropped.csv`` (``split,study_id,reason``, one line per
distinct entry); :class:`DroppedItems` is the Lightning callback that keeps ``<run_dir>/dropped.csv``
up to date during a fit. Importing this module does not import torch or Lightning (the callback
class is created on first access).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from medvlp.datamodules.base import VLPDataModule

log = logging.getLogger(__name__)

FILE_NAME = "dropped.csv"
COLUMNS = ("split", "study_id", "reason")


class DroppedItem(NamedTuple):
    """One item a run did not use: its split, its study id and why (a message naming the file / row)."""

    split: str
    study_id: str
    reason: str


def write_dropped(entries: Iterable[tuple[str, str, str]], path: str | os.PathLike) -> Path:
    """Write ``entries`` ``(split, study_id, reason)`` to the CSV ``path`` (header ``split,study_id,reason``),
    each distinct entry once, in the order given; atomically (a ``.tmp`` file renamed into place).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    seen: set[tuple[str, str, str]] = set()
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for entry in entries:
            row = (str(entry[0]), str(entry[1]), " ".join(str(entry[2]).split()))  # one line per entry
            if row not in seen:
                seen.add(row)
                writer.writerow(row)
    os.replace(tmp, path)
    return path


def read_dropped(path: str | os.PathLike) -> list[DroppedItem]:
    """The entries of a ``dropped.csv`` written by :func:`write_dropped`."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [DroppedItem(r["split"], r["study_id"], r["reason"]) for r in csv.DictReader(fh)]


def _gather(entries: list[DroppedItem]) -> list[DroppedItem]:
    """Every rank's ``entries`` (this rank's alone outside a distributed run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return entries
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [tuple(e) for e in entries])
    return [DroppedItem(*e) for part in gathered for e in (part or [])]


def _make_callback() -> type:
    from lightning.pytorch import Callback

    class DroppedItems(Callback):
        """Keeps ``<run_dir>/dropped.csv`` listing every item the run did not use (module docstring).

        On train start it writes the items dropped while building records; during training it
        collects the items each train / validation batch skipped (``data.on_error=skip``; gathered
        from every rank in a distributed run) and at each train-epoch end adds them to
        ``dm.dropped`` and rewrites the file. An item skipped again in a later epoch for the same
        reason is listed once. Only rank 0 writes; a warning gives the count and the file.

        Args:
            dm: the datamodule whose loaders feed the trainer.
            run_dir: the run directory; the file is ``<run_dir>/dropped.csv``.
        """

        def __init__(self, dm: VLPDataModule, run_dir: str | os.PathLike) -> None:
            super().__init__()
            self.dm = dm
            self.path = Path(run_dir) / FILE_NAME
            self._pending: list[DroppedItem] = []
            self._reported = -1

        def _collect(self, batch: Any, split: str) -> None:
            ids = getattr(batch, "skipped_ids", None) or []
            reasons = list(getattr(batch, "skipped_reasons", None) or [])
            reasons += ["unreadable (data.on_error=skip)"] * (len(ids) - len(reasons))
            self._pending += [DroppedItem(split, str(i), str(r)) for i, r in zip(ids, reasons, strict=False)]

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._collect(batch, "train")

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                    dataloader_idx: int = 0) -> None:
            if not trainer.sanity_checking:
                self._collect(batch, "val")

        def _write(self, trainer: Any) -> None:
            new, self._pending = _gather(self._pending), []
            for entry in new:
                self.dm.note_dropped(*entry)
            if not trainer.is_global_zero:
                return
            self.dm.write_dropped(self.path)
            n = len(self.dm.dropped)
            if n and n != self._reported:
                log.warning("%d stud(ies) left out (by the dataset's rules, e.g. an empty or too short report, or "
                            "unreadable with data.on_error=skip); each is listed with its reason in %s", n, self.path)
            self._reported = n

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._write(trainer)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._write(trainer)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self._write(trainer)

    DroppedItems.__module__ = __name__
    DroppedItems.__qualname__ = "DroppedItems"  # picklable as medvlp.datamodules.dropped.DroppedItems
    return DroppedItems


def __getattr__(name: str) -> Any:
    if name == "DroppedItems":  # created on first use: Lightning (and torch) are imported only then
        cls = _make_callback()
        globals()["DroppedItems"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["COLUMNS", "FILE_NAME", "DroppedItem", "DroppedItems", "read_dropped", "write_dropped"]  # noqa: F822 (lazy)
