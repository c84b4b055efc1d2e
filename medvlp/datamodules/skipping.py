"""Evaluation loaders that survive a batch whose every item was skipped (``data.on_error=skip``).

With a small evaluation batch (HLIP scores every volume alone: ``eval_batch_size: 1``) one unreadable study
makes a whole batch fail. In training that stays an error; in evaluation the collate function hands back
a :class:`FailedBatch` instead and :class:`SkippingLoader` passes its study ids and reasons on with the next
batch that has items (so every consumer counts and lists them as usual), or, after the last batch, records
them in the datamodule's ``dropped`` list.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from torch.utils.data import DataLoader


class FailedBatch(NamedTuple):
    """A batch none of whose items could be loaded: who and why."""

    study_ids: list[str]
    reasons: list[str]


def skipping_collate(collate: Any, items: list[Any]) -> Any:
    """``collate(items)``, or a :class:`FailedBatch` when every item is a skipped one."""
    from medvlp.datamodules.base import SkippedItem

    if items and all(isinstance(it, SkippedItem) for it in items):
        return FailedBatch([it.study_id for it in items], [it.reason for it in items])
    return collate(items)


class SkippingLoader(DataLoader):
    """A ``DataLoader`` that never yields a :class:`FailedBatch`: its skips travel with the next batch."""

    def __init__(self, *args: Any, dm: Any = None, split: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dm, self.split = dm, split

    def __iter__(self) -> Iterator[Any]:
        ids: list[str] = []
        reasons: list[str] = []
        for batch in super().__iter__():
            if isinstance(batch, FailedBatch):
                ids += batch.study_ids
                reasons += batch.reasons
                continue
            if ids:
                batch.skipped += len(ids)
                batch.skipped_ids = ids + list(batch.skipped_ids)
                batch.skipped_reasons = reasons + list(batch.skipped_reasons)
                ids, reasons = [], []
            yield batch
        if ids and self.dm is not None:  # nothing followed: recorded directly
            for study, reason in zip(ids, reasons, strict=True):
                self.dm.note_dropped(self.split, study, reason)


__all__ = ["FailedBatch", "SkippingLoader", "skipping_collate"]
