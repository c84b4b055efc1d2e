"""The datamodule contract shared by every dataset.

A dataset subclass provides:

* ``Config``: a dataclass derived from :class:`DataConfig` (the schema of ``configs/data/*.yaml``);
* ``EXPECTED_LAYOUT``: the on-disk layout, printed when ``data.root`` is wrong;
* ``check_root(cfg)``: a cheap test (no decoding) that the root looks like the dataset;
* ``build_records(split)``: a list of :class:`Record` read from the official files;
* ``load_image(record, train)``: the image tensor of a record (``[C, H, W]`` or ``[C, D, H, W]``);
  datasets with boxes or masks override ``load_sample`` instead, which also returns the targets
  in the geometry of the transformed image;
* ``label_names``: the label columns attached to records (``Record.labels`` follows this order).

The base class does the rest: datasets, error policy (``data.on_error``), tokenisation and
collation into :class:`~medvlp.batch.ImageTextBatch`, and the zero-shot prompt sets. Every item
a subclass leaves out while building records is noted with ``note_dropped(split, study_id, reason)``;
with the items ``data.on_error=skip`` skips at load time it forms :attr:`VLPDataModule.dropped`
(:mod:`medvlp.datamodules.dropped`).

Import cost matters here: ``medvlp fit`` validates ``data.root`` through ``check_root`` before it
imports torch or Lightning, so that a wrong path fails within a second or two. Dataset modules
therefore import torch (and their image readers) inside the functions that need them, never at
module level. The trainer receives the dataloaders directly, so no LightningDataModule is needed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.cache import open_for_training
from medvlp.datamodules.dropped import DroppedItem, write_dropped
from medvlp.datamodules.errors import DataError, DataRootError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from medvlp.batch import ImageTextBatch

log = logging.getLogger(__name__)

DEMO_ROOT = "demo"  # data.root value meaning "the built-in synthetic dataset, generated on demand"


@dataclass
class DataConfig:
    """Fields common to every datamodule (``data.*``)."""

    name: str = "mimic_cxr"
    root: str = "???"  # dataset root as downloaded, or "demo" for the synthetic world
    batch_size: int = bounded(32, gt=0)
    eval_batch_size: int = bounded(64, gt=0)
    num_workers: int = bounded(0, ge=0)
    pin_memory: bool = False
    persistent_workers: bool = False
    max_length: int = bounded(112, gt=0)  # text tokens, padded to this length
    on_error: Literal["raise", "skip"] = "raise"  # skip counts and reports every dropped item
    # train-time report augmentation: none | shuffle (sentence order) | sample
    text_augment: Literal["none", "shuffle", "sample"] = "none"
    text_keep: float = bounded(0.5, gt=0, le=1)  # sample: fraction of the sentences kept (at least one), in random order
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    worker_mmap_threshold_kb: int = bounded(128, ge=0)  # DataLoader workers (glibc): buffers above this go to mmap; 0 = glibc default
    limit_train: int = bounded(0, ge=0)  # 0 = all records; >0 keeps the first N (debugging)
    label_fraction: float = bounded(1.0, gt=0, le=1)  # fraction of the train studies used (1 %, 10 %: fine-tuning benchmarks)
    fraction_seed: int = bounded(42, ge=0, le=2**32 - 1)  # MGCA's random_state for data_pct
    fraction_sampling: Literal["mgca", "stratified"] = "mgca"  # mgca (pandas df.sample replica) | stratified (per label pattern)
    fraction_file: str = ""  # "" = <cache>/label_fractions/...; the file every method reads (fractions.py)
    eval_labels: list[str] = field(default_factory=list)  # labels scored by zeroshot; [] = all
    prompts: str = ""  # prompt file (yaml) for zero-shot; "" = the dataset's default
    threshold_split: str = ""  # zero-shot thresholds: "" = chosen on the evaluated split (HLIP / fVLM); e.g. val = chosen there
    demo_size: str = "default"  # size preset of the synthetic world when root == "demo"


@dataclass
class Record:
    """One sample as read from the official files (no pixels)."""

    study_id: str
    image_path: str | list[str]  # a list for several images / scans per study
    text: str
    labels: np.ndarray | None = None  # float32 [K], NaN unknown
    meta: dict[str, Any] = field(default_factory=dict)
    boxes: np.ndarray | None = None  # float32 [N, 4] (x1, y1, x2, y2), pixels of the original image
    box_labels: np.ndarray | None = None  # int64 [N], index into the datamodule's box_label_names
    mask: Any = None  # a picklable callable ``mask(height, width) -> uint8 [H, W]`` at the original size


TEXT_AUGMENTS = ("none", "shuffle", "sample")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def augment_text(text: str, how: str, keep: float = 0.5) -> str:
    """Train-time report augmentation on sentences (as CXR-CLIP samples report sentences).

    ``shuffle`` permutes the sentences; ``sample`` keeps ``ceil(keep * n)`` of them (at least one)
    in random order, so that a report is never seen twice in the same form and cannot simply be
    memorised. Randomness comes from torch (seeded per DataLoader worker).
    """
    if how == "none" or not text:
        return text
    import torch

    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    if len(sentences) < 2:
        return text
    order = torch.randperm(len(sentences)).tolist()
    if how == "sample":
        order = order[: max(1, math.ceil(keep * len(sentences)))]
    return " ".join(sentences[i] for i in order)


class SkippedItem(NamedTuple):
    """An item that ``data.on_error=skip`` skipped: what the collate function receives in its place
    (through :meth:`RecordDataset.__getitems__`), so that the batch can name it."""

    study_id: str
    reason: str


class RecordDataset:
    """Loads one record per item; applies the ``on_error`` policy.

    With ``on_error=skip`` an unreadable item becomes ``None`` (``dataset[i]``), or a
    :class:`SkippedItem` in the list a DataLoader fetches (``__getitems__``); the collate function
    drops it and counts and names it in ``ImageTextBatch.skipped`` / ``skipped_ids`` /
    ``skipped_reasons`` (so they survive worker processes).
    """

    def __init__(self, dm: VLPDataModule, records: list[Record], train: bool) -> None:
        self.dm = dm
        self.records = records
        self.train = train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        item = self.load(idx)
        return None if isinstance(item, SkippedItem) else item

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any] | SkippedItem]:
        """The items of one batch (the DataLoader's fetcher calls this instead of ``__getitem__``)."""
        return [self.load(i) for i in indices]

    def load(self, idx: int) -> dict[str, Any] | SkippedItem:
        """Item ``idx``, or with ``data.on_error=skip`` a :class:`SkippedItem` when it cannot be loaded."""
        rec = self.records[idx]
        try:
            sample = self.dm.load_sample(rec, train=self.train)
        except Exception as err:
            msg = f"{type(err).__name__}: {err}" if not isinstance(err, DataError) else str(err)
            if self.dm.cfg.on_error == "skip":
                log.warning("skipping study %s: %s", rec.study_id, msg)
                return SkippedItem(str(rec.study_id), msg)
            if isinstance(err, DataError):
                raise
            raise DataError(
                f"Could not load study {rec.study_id} from {rec.image_path}: {msg}. "
                f"Set data.on_error=skip to skip (and count) unreadable items."
            ) from err
        item = {"study_id": rec.study_id, "labels": rec.labels, "meta": rec.meta, **sample}
        if "text" not in item:  # load_sample may return the text (and labels) of the file it drew
            item["text"] = self.dm.item_text(rec, self.train)
        return item


class MemoryLRUMixin:
    """An in-memory LRU of finished items per process, bounded by ``data.cache_size`` entries (0 = none):
    ``_recall(key)`` / ``_remember(key, value)`` over ``self._cache`` (an ``OrderedDict`` the datamodule makes)."""

    def _recall(self, key: str) -> Any:
        """An entry of the in-memory LRU (``data.cache_size``), or None."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
        return cached

    def _remember(self, key: str, value: Any) -> Any:
        """Keep ``value`` in the in-memory LRU (when ``data.cache_size`` > 0); returns it."""
        if self.cfg.cache_size > 0:
            self._cache[key] = value
            while len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return value


class VLPDataModule:
    """Base class of every image-text datamodule (see the module docstring for the contract)."""

    Config: ClassVar[type[DataConfig]] = DataConfig
    EXPECTED_LAYOUT: ClassVar[str] = ""
    modality: ClassVar[str] = "2d"  # "2d" | "3d"
    default_prompts: ClassVar[str] = ""  # name of a file in configs/prompts/
    demo_kind: ClassVar[str] = ""  # synthetic world written for data.root=demo ("cxr" | "ct"); "" = none
    label_names: list[str] = []
    # True: an item's image is a stack of scans [S, C, D, H, W] with S varying per study; batches
    # pad S with empty scans and carry scan_mask [B, S] (True = real scan).
    multi_scan: ClassVar[bool] = False
    # True: the labels are one-hot over exclusive classes (softmax in classification transfer)
    multiclass: ClassVar[bool] = False
    # Segmentation transfer trains on every positive training image and as many negatives (MGCA's SIIM rule).
    balance_segmentation: ClassVar[bool] = False

    def __init__(self, cfg: DataConfig, tokenizer: Any = None) -> None:
        if cfg.text_augment not in TEXT_AUGMENTS:
            raise ValueError(f"data.text_augment='{cfg.text_augment}' is not valid; choose one of {', '.join(TEXT_AUGMENTS)}.")
        if not 0.0 < float(cfg.text_keep) <= 1.0:
            raise ValueError(f"data.text_keep must be in (0, 1], got {cfg.text_keep}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._records: dict[str, list[Record]] = {}
        # every item not used, by build_records or by data.on_error=skip at load time (note_dropped)
        self.dropped: list[DroppedItem] = []
        self._dropped_keys: set[DroppedItem] = set()
        self.dropped_file: Path | None = None  # where write_dropped last wrote them

    # ------------------------------------------------------------------ dataset-specific
    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        """Raise :class:`DataRootError` naming the path and ``EXPECTED_LAYOUT`` if root is wrong."""
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataRootError(cls.root_message(cfg.root, "does not exist or is not a directory"))

    @classmethod
    def require(cls, cfg: DataConfig, files: tuple[str, ...] = (), dirs: tuple[str, ...] = ()) -> None:
        """Raise :class:`DataRootError` (path + ``EXPECTED_LAYOUT``) unless these files / folders exist under root."""
        root = Path(cfg.root)
        for rel in files:
            if not (root / rel).is_file():
                raise DataRootError(cls.root_message(cfg.root, f"has no {rel}"))
        for rel in dirs:
            if not (root / rel).is_dir():
                raise DataRootError(cls.root_message(cfg.root, f"has no {rel}/ folder"))

    @classmethod
    def root_message(cls, path: str | os.PathLike, problem: str) -> str:
        where = f"data.root '{path}'" if str(path) else "data.root"
        return (
            f"{where} {problem}. The {cls.__name__} expects the dataset exactly as "
            f"distributed:\n{cls.EXPECTED_LAYOUT.rstrip()}\nSet data.root=/path/to/the/download "
            f"(or omit --data to train on the synthetic demo set)."
        )

    def build_records(self, split: str) -> list[Record]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_image(self, record: Record, train: bool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_sample(self, record: Record, train: bool) -> dict[str, Any]:
        """``{"image": tensor}``, plus ``"boxes"`` ``[N, 4]`` / ``"box_labels"`` ``[N]`` / ``"mask"``
        ``[H, W]`` in the transformed image's pixels for datasets with such targets, and ``"text"`` /
        ``"labels"`` where they depend on which of the record's files was drawn (else the record's)."""
        return {"image": self.load_image(record, train)}

    def item_text(self, record: Record, train: bool) -> str:
        """The text paired with ``record`` in one draw: ``data.text_augment`` applied in training."""
        if not train:
            return record.text
        return augment_text(record.text, self.cfg.text_augment, float(self.cfg.text_keep))

    def vqa_file(self) -> Path | None:
        """Reference answers for VQA (a CSV ``image,question,answer``) if the dataset has them; None here."""
        return None

    def study_index(self, split: str) -> dict[str, int]:
        """Index of each record of ``split`` by its study id and by its image path (as stored, and relative to
        ``data.root``), so a study can be named either way."""
        index: dict[str, int] = {}
        root = Path(str(self.cfg.root))
        for i, rec in enumerate(self.records(split)):
            index.setdefault(str(rec.study_id), i)
            for path in [rec.image_path] if isinstance(rec.image_path, str) else list(rec.image_path):
                index.setdefault(str(path), i)
                try:
                    index.setdefault(str(Path(path).relative_to(root)), i)
                except ValueError:
                    pass
        return index

    # ------------------------------------------------------------------ dropped items
    def note_dropped(self, split: str, study_id: str, reason: str) -> None:
        """Record that ``study_id`` of ``split`` is not used, and why (a message naming the file or
        row); each distinct ``(split, study_id, reason)`` is kept once (see :mod:`~medvlp.datamodules.dropped`)."""
        entry = DroppedItem(str(split), str(study_id), " ".join(str(reason).split()))
        if entry not in self._dropped_keys:
            self._dropped_keys.add(entry)
            self.dropped.append(entry)

    def write_dropped(self, path: str | os.PathLike) -> Path:
        """Write :attr:`dropped` to the CSV ``path`` (``split,study_id,reason``) and remember it in
        :attr:`dropped_file`. Returns the path."""
        self.dropped_file = write_dropped(self.dropped, path)
        return self.dropped_file

    def dropped_summary(self) -> dict[str, Any]:
        """``{"count": N, "by_split": {split: n}, "file": str | None}``: the items not used so far
        (:attr:`dropped`) and the CSV :meth:`write_dropped` last wrote (None if none); for result files."""
        by_split: dict[str, int] = {}
        for entry in self.dropped:
            by_split[entry.split] = by_split.get(entry.split, 0) + 1
        return {"count": len(self.dropped), "by_split": by_split,
                "file": str(self.dropped_file) if self.dropped_file is not None else None}

    # ------------------------------------------------------------------ shared machinery
    def set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def records(self, split: str) -> list[Record]:
        """Records of ``split`` in {"train", "val", "test"}, read once and kept."""
        if split not in self._records:
            recs = self.build_records(split)
            if split == "train" and recs and float(self.cfg.label_fraction) < 1.0:
                recs = self._label_fraction(recs)
            if split == "train" and self.cfg.limit_train > 0:
                recs = recs[: self.cfg.limit_train]
            if not recs:
                raise DataError(f"{type(self).__name__}: split '{split}' of {self.cfg.root} has no usable records.")
            self._records[split] = recs
        return self._records[split]

    def split_key(self) -> str:
        """Identifies how this datamodule defines its train split (part of the fraction file's name)."""
        return f"{type(self).__name__}|{getattr(self.cfg, 'split_protocol', '')}"

    def _label_fraction(self, recs: list[Record]) -> list[Record]:
        from medvlp.cache import cache_dir
        from medvlp.datamodules import fractions

        cfg = self.cfg
        fraction, seed, sampling = float(cfg.label_fraction), int(cfg.fraction_seed), str(cfg.fraction_sampling)
        if cfg.fraction_file:
            path = Path(cfg.fraction_file)
        else:
            path = fractions.default_path(cache_dir(), cfg.name, str(cfg.root), self.split_key(), fraction, seed, sampling)
        return fractions.load_or_draw(path, recs, cfg.name, fraction, seed, sampling)

    def dataset(self, split: str) -> RecordDataset:
        return RecordDataset(self, self.records(split), train=split == "train")

    def collate(self, items: list[dict[str, Any] | None]) -> ImageTextBatch:
        import torch

        from medvlp.batch import ImageTextBatch

        kept = [it for it in items if it is not None and not isinstance(it, SkippedItem)]
        named = [it for it in items if isinstance(it, SkippedItem)]
        skipped = len(items) - len(kept)
        if not kept:
            first = f" (first: study {named[0].study_id}: {named[0].reason})" if named else ""
            raise DataError(f"Every item of a batch failed to load ({skipped} skipped{first}); check "
                            f"data.root={self.cfg.root}.")
        if self.tokenizer is None:
            raise RuntimeError("The datamodule has no tokenizer; call set_tokenizer(method.tokenizer) first.")
        texts = [it["text"] for it in kept]
        tok = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        labels = None
        if all(it["labels"] is not None for it in kept):
            labels = torch.as_tensor(np.stack([it["labels"] for it in kept]), dtype=torch.float32)
        targets: dict[str, Any] = {}
        if "boxes" in kept[0]:
            targets["boxes"] = [it["boxes"] for it in kept]
            targets["box_labels"] = [it["box_labels"] for it in kept]
        if "mask" in kept[0]:
            targets["masks"] = torch.stack([it["mask"] for it in kept])
        if "anatomy" in kept[0]:
            targets["anatomy_masks"] = torch.stack([it["anatomy"] for it in kept])
        if "anatomy_texts" in kept[0]["meta"]:  # per-anatomy reports (fVLM): {anatomy: [B texts]}, [B, A] flags
            names = list(kept[0]["meta"]["anatomy_texts"])
            targets["anatomy_texts"] = {n: [it["meta"]["anatomy_texts"][n] for it in kept] for n in names}
            targets["anatomy_abnormal"] = torch.tensor([it["meta"]["anatomy_abnormal"] for it in kept], dtype=torch.bool)
        if "description" in kept[0]["meta"]:  # EHR text before the diagnosis (MedBLIP's lists), and its cohort
            targets["descriptions"] = [str(it["meta"]["description"]) for it in kept]
            targets["meta"] = {"cohort": [str(it["meta"].get("list", "")) for it in kept]}
        images, scan_mask = stack_images([it["image"] for it in kept], self.multi_scan)
        if scan_mask is not None:
            targets["scan_mask"] = scan_mask
        return ImageTextBatch(
            images=images,
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            study_ids=[it["study_id"] for it in kept],
            texts=texts,
            labels=labels,
            skipped=skipped,
            skipped_ids=[it.study_id for it in named],
            skipped_reasons=[it.reason for it in named],
            **targets,
        )

    def _loader(self, split: str, shuffle: bool, batch_size: int, drop_last: bool = False, sampler: Any = None,
                evaluation: bool = True) -> DataLoader:
        import torch
        from torch.utils.data import DataLoader

        g = torch.Generator()
        g.manual_seed(self.cfg.seed)
        workers = self.cfg.num_workers
        dataset: Any = self.dataset(split)
        if sampler is not None:  # an EpochSampler: items are read with their own seeds
            from medvlp.resume import SeededItems

            dataset, shuffle = SeededItems(dataset), False
        loader_cls: Any = DataLoader
        collate: Any = self.collate
        extra: dict[str, Any] = {}
        if evaluation:  # a batch whose every item was skipped does not end an evaluation (training: an error)
            from medvlp.datamodules.skipping import SkippingLoader, skipping_collate

            loader_cls, collate = SkippingLoader, functools.partial(skipping_collate, self.collate)
            extra = {"dm": self, "split": split}
        return loader_cls(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.cfg.pin_memory,
            persistent_workers=self.cfg.persistent_workers and workers > 0,
            collate_fn=collate,
            generator=g,
            worker_init_fn=functools.partial(init_worker, mmap_threshold_kb=int(self.cfg.worker_mmap_threshold_kb)),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        n = len(self.records("train"))
        return self._loader("train", shuffle=True, batch_size=self.cfg.batch_size, drop_last=n > self.cfg.batch_size,
                            evaluation=False)

    def resumable_train_dataloader(self) -> DataLoader:
        """The training loader of pre-training: an :class:`~medvlp.resume.EpochSampler` (its ``sampler``)
        orders each epoch from ``(data.seed, epoch)`` and can start an epoch part-way, and every item
        draws its randomness from its own seed, so that a resumed run sees exactly the batches of an
        uninterrupted one (:mod:`medvlp.resume`)."""
        from medvlp.resume import EpochSampler

        n = len(self.records("train"))
        return self._loader("train", shuffle=False, batch_size=self.cfg.batch_size, drop_last=n > self.cfg.batch_size,
                            sampler=EpochSampler(n, seed=int(self.cfg.seed)), evaluation=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.cfg.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.cfg.eval_batch_size)

    def eval_dataloader(self, split: str) -> DataLoader:
        """A deterministic loader over any split this dataset defines (e.g. CheXpert's ``5x200``)."""
        return self._loader(split, shuffle=False, batch_size=self.cfg.eval_batch_size)

    def texts(self, split: str) -> list[str]:
        return [r.text for r in self.records(split)]

    def eval_label_names(self) -> list[str]:
        """Labels scored by zero-shot evaluation (``data.eval_labels`` or every label)."""
        names = list(self.cfg.eval_labels) or list(self.label_names)
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise DataError(f"data.eval_labels has {unknown}, not labels of {type(self).__name__}: {self.label_names}")
        return names

    def prompt_file(self) -> Path:
        from medvlp.config import config_dir

        if self.cfg.prompts:
            p = Path(self.cfg.prompts)
            if not p.is_file():
                p = config_dir() / "prompts" / self.cfg.prompts
            if not p.is_file():
                raise DataError(f"data.prompts '{self.cfg.prompts}' is not a file (nor one in {config_dir() / 'prompts'}).")
            return p
        return config_dir() / "prompts" / self.default_prompts


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def init_worker(worker_id: int, mmap_threshold_kb: int = 128) -> None:
    """DataLoader worker set-up: fix glibc's mmap threshold so that image / volume buffers are returned to
    the system when freed. With the default *dynamic* threshold, glibc raises it after the first large
    frees and then serves buffers of varying size from the heap, whose fragmentation makes a worker's
    resident memory creep up over a long run (tens of MB per few hundred CT volumes)."""
    if mmap_threshold_kb <= 0 or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_kb) * 1024)
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep the allocator's behaviour
        pass


def stable_fraction(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by ``(seed, key)``: splits by patient / study / subject that do not depend
    on file order or on the other ids present."""
    import hashlib

    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 2**32


def stack_images(images: list[Any], multi_scan: bool) -> tuple[Any, Any]:
    """``(images [B, ...], scan_mask or None)``. Multi-scan items ``[S_i, C, D, H, W]`` are padded with
    zero scans to the largest ``S`` of the batch; ``scan_mask`` ``[B, S]`` marks the real ones. A batch whose
    studies all have ``S`` scans needs no mask (None): the encoder then learns that without reading the device."""
    import torch

    if not multi_scan:
        return torch.stack(images), None
    if len({int(im.shape[0]) for im in images}) == 1:
        return torch.stack(images), None
    most = max(int(im.shape[0]) for im in images)
    out = images[0].new_zeros((len(images), most, *images[0].shape[1:]))
    mask = torch.zeros(len(images), most, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, : im.shape[0]] = im
        mask[i, : im.shape[0]] = True
    return out, mask


USE_PREPROCESSED = ("auto", "true", "false")
_UNRESOLVED = object()


class PreprocessedCacheMixin:
    """Reading the cache ``medvlp preprocess`` writes (:mod:`medvlp.datamodules.cache`), for a
    :class:`VLPDataModule` that implements the writing side (``cache_settings`` / ``cache_item``, or
    the 2D radiograph reader).

    ``data.use_preprocessed``: ``auto`` reads the cache when its manifest matches the config,
    ``true`` requires it (a DataError names the command to run), ``false`` always decodes.
    """

    def init_preprocessed(self, cfg: Any) -> None:
        mode = str(getattr(cfg, "use_preprocessed", "auto")).strip().lower()
        if mode not in USE_PREPROCESSED:
            raise ValueError(f"data.use_preprocessed='{mode}' is not valid; choose one of {list(USE_PREPROCESSED)}.")
        self.use_preprocessed = mode
        self._preprocessed: Any = _UNRESOLVED

    def preprocessed(self) -> Any:
        """The preprocessed cache this datamodule reads (``data.use_preprocessed``), or None to decode
        on the fly. Resolved once; raises DataError for ``true`` without a matching cache."""
        if self._preprocessed is _UNRESOLVED:
            self._preprocessed = open_for_training(self)
        return self._preprocessed

    def dataset(self, split: str) -> RecordDataset:
        """The split's dataset; checks first that the cache (if used) holds its files."""
        cache = self.preprocessed()
        if cache is not None:
            cache.check_coverage(self, split, self.records(split))  # type: ignore[attr-defined]
        return super().dataset(split)  # type: ignore[misc]
