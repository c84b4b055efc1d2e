"""Brain MRI volumes with EHR text and a dementia diagnosis, in MedBLIP's list format (ADNI, NACC,
OASIS-1/2, AIBL, MIRIAD).

Files (``specs/datasets.md`` §13.2): one list per cohort and split, ``<list_dir>/<name>.csv`` (e.g.
``ADNI-train.csv``) - despite the extension **tab-separated, no header, exactly two fields**:
``<image path>\\t<text>``. Relative image paths are resolved against ``data.image_root`` (default:
the root). The text is demographic / clinical sentences ending, when known, with ``The diagnosis is
<LABEL>.``; labels map to ``CN`` (CN, NC, Control, control, Nondemented), ``MCI`` and ``AD`` (AD,
Dementia, Demented). OASIS-2's ``Converted`` and rows without the sentence have no label (NaN);
they are counted. Any other spelling is an error naming the list and line.

Records keep the whole text (``Record.text``) plus ``meta["description"]`` (before ``The diagnosis
is``) and ``meta["answer"]`` (the normalised label word), which MedBLIP's losses use.

Volumes (MedBLIP's ``dataset.py``, spec §3.2, the default): SimpleITK array ``(z, y, x)`` ->
global min-max to [0, 1] -> trilinear resize (``align_corners=True``) so the longest side is
``data.size`` (each axis ``floor(size * n / max)``) -> centred zero padding to ``size``^3. Options:
``data.orientation`` (e.g. ``RAS``; official: none) and ``data.clip_percentiles`` (e.g. [0.5, 99.5]).

Splits: ``train`` / ``val`` = the ``data.train_lists`` rows split **by subject** (``data.val_fraction``,
seeded hash of the subject id that ``data.subject_pattern`` finds in the image path, so visits of one
subject never straddle the split); ``test`` = the ``data.test_lists`` rows.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import (
    DataConfig,
    DataError,
    DataRootError,
    MemoryLRUMixin,
    Record,
    VLPDataModule,
    stable_fraction,
)
from medvlp.datamodules.errors import check_readable
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

CLASSES = ["CN", "MCI", "AD"]
SYNONYMS = {"cn": "CN", "nc": "CN", "control": "CN", "nondemented": "CN", "mci": "MCI", "ad": "AD",
            "dementia": "AD", "demented": "AD"}
UNMAPPED = {"converted"}  # OASIS-2: no MedBLIP mapping
PHRASE = "The diagnosis is "


@dataclass
class MedBLIPMRIConfig(DataConfig):
    """``data.*`` keys of the MedBLIP list datamodule (``configs/data/medblip_mri.yaml``)."""

    name: str = "medblip_mri"
    list_dir: str = ""  # folder of the <name>.csv lists; "" = <root>/local_data if it exists, else <root>
    image_root: str = ""  # base of relative image paths; "" = <root>
    train_lists: list[str] = field(default_factory=lambda: ["ADNI-train", "NACC-train", "OASIS2-train"])
    test_lists: list[str] = field(default_factory=lambda: ["ADNI-test"])
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # of the train subjects
    split_seed: int = bounded(0, ge=0, le=2**32 - 1)
    subject_pattern: str = r"(\d{3}_S_\d{4}|OAS\d_\d{4}|sub-[A-Za-z0-9]+)"  # ADNI PTID, OASIS, BIDS; else the parent folder
    size: int = bounded(224, gt=0)
    orientation: str = ""  # "" = the stored axes (official); e.g. RAS
    clip_percentiles: list[float] = bounded(default_factory=list, ge=0, le=100, each=True)  # [] (official) or [low, high] before min-max
    batch_size: int = 4
    eval_batch_size: int = 4
    max_length: int = 256
    # the text of an item (input_ids, retrieval): full (the list's text, diagnosis sentence included) |
    # description (the EHR part only, what MedBLIP contrasts with the image)
    text: Literal["full", "description"] = "full"
    image_only: bool = False  # the image-only ablation (spec §3.3): every EHR description is empty
    cache_size: int = bounded(0, ge=0)  # finished volumes kept in memory per process (0 = none; none is random)
    vqa_file: str = ""  # reference answers for medvlp vqa / the vqa task: CSV image,question,answer (relative to root)


def parse_text(text: str) -> tuple[str, str]:
    """``(description, answer word)``: the text before ``The diagnosis is `` and the word up to the next
    period ("" when the sentence is absent)."""
    i = text.find(PHRASE)
    if i < 0:
        return text, ""
    rest = text[i + len(PHRASE) :]
    return text[:i], rest.split(".", 1)[0].strip()


@register_datamodule("medblip_mri")
class MedBLIPMRIDataModule(MemoryLRUMixin, VLPDataModule):
    """MedBLIP-format brain MRI lists: volume + EHR text + CN / MCI / AD."""

    Config = MedBLIPMRIConfig
    modality = "3d"
    multiclass = True
    demo_kind = "adni"  # data.root=demo: the synthetic ADNI-style cohort (demo/adni.py)
    label_names = list(CLASSES)
    EXPECTED_LAYOUT = """\
  <root>/local_data/ADNI-train.csv, ADNI-test.csv, ...   (or directly under <root>)
      no header, tab-separated: <image path>\\t<text ending with 'The diagnosis is <LABEL>.'>
  <image paths>                                           NIfTI / MGZ volumes (relative to data.image_root)
"""

    def __init__(self, cfg: MedBLIPMRIConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if int(cfg.size) < 1 or not 0 <= float(cfg.val_fraction) < 1:
            raise ValueError(f"data.size must be >= 1 and data.val_fraction in [0, 1); got {cfg.size}, {cfg.val_fraction}.")
        if list(cfg.clip_percentiles) and (len(cfg.clip_percentiles) != 2
                                           or not 0 <= cfg.clip_percentiles[0] < cfg.clip_percentiles[1] <= 100):
            raise ValueError(f"data.clip_percentiles must be [] or [low, high] within [0, 100], got {list(cfg.clip_percentiles)}.")
        self._pattern = re.compile(cfg.subject_pattern)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.counts: dict[str, int] = {}

    @classmethod
    def list_dir(cls, cfg: Any) -> Path:
        if cfg.list_dir:
            return Path(cfg.list_dir)
        local = Path(cfg.root) / "local_data"
        return local if local.is_dir() else Path(cfg.root)

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        folder = cls.list_dir(cfg)
        for name in [*cfg.train_lists, *cfg.test_lists]:  # type: ignore[attr-defined]
            if not (folder / f"{name}.csv").is_file():
                raise DataRootError(cls.root_message(cfg.root, f"has no list {folder / (name + '.csv')}"))

    def read_list(self, name: str) -> list[Record]:
        path = self.list_dir(self.cfg) / f"{name}.csv"
        base = Path(self.cfg.image_root or self.cfg.root)
        records: list[Record] = []
        from medvlp.datamodules.formats.tables import read_text

        lines = read_text(path, "List").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{path}, line {n}: {len(fields)} tab-separated fields; a MedBLIP list row is "
                                f"'<image path>\\t<text>' (a tab inside the text breaks the format).")
            image, text = fields[0].strip(), fields[1].strip()
            description, answer = parse_text(text)
            if self.cfg.image_only:
                description = ""
            key = answer.lower()
            labels = np.full(len(CLASSES), np.nan, np.float32)
            if key in SYNONYMS:
                labels[:] = 0
                labels[CLASSES.index(SYNONYMS[key])] = 1
            elif key in UNMAPPED or not answer:
                reason = "unmapped_diagnosis" if answer else "no_diagnosis"
                self.counts[reason] = self.counts.get(reason, 0) + 1
            else:
                raise DataError(f"{path}, line {n}: diagnosis '{answer}' is not one of the known spellings "
                                f"({', '.join(sorted(SYNONYMS))}, or Converted).")
            full = Path(image) if Path(image).is_absolute() else base / image
            m = self._pattern.search(str(full))
            subject = m.group(1) if m else full.parent.name
            records.append(Record(f"{name}:{n}", str(full), text, labels,
                                  {"list": name, "subject": subject, "description": description,
                                   "answer": SYNONYMS.get(key, answer)}))
        return records

    def build_records(self, split: str) -> list[Record]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split '{split}'; expected train, val or test.")
        names = self.cfg.test_lists if split == "test" else self.cfg.train_lists
        records = [r for name in names for r in self.read_list(str(name))]
        if split != "test":
            records = [r for r in records if self.split_of(r.meta["subject"]) == split]
        missing = [r.image_path for r in records if not Path(r.image_path).is_file()]
        if missing:
            self.counts[f"missing_{split}"] = len(missing)
            msg = f"{len(missing)} {split} volumes listed in the lists do not exist (first: {missing[0]})"
            if self.cfg.on_error != "skip":
                raise DataError(msg + "; check data.image_root, or set data.on_error=skip to skip (and count) them.")
            for r in records:
                if not Path(r.image_path).is_file():
                    self.note_dropped(split, r.study_id, f"{r.image_path} (listed in {r.meta['list']}.csv) does not exist")
            log.warning("medblip_mri: skipped %s", msg)
            records = [r for r in records if Path(r.image_path).is_file()]
        if self.counts.get("unmapped_diagnosis") or self.counts.get("no_diagnosis"):
            log.info("medblip_mri: rows without a usable diagnosis so far: %s",
                     {k: v for k, v in self.counts.items() if "diagnosis" in k})
        return records

    def vqa_file(self) -> Path | None:
        """``data.vqa_file`` (relative to ``data.root``), or None; a named file that does not exist is an error."""
        if not self.cfg.vqa_file:
            return None
        path = Path(self.cfg.vqa_file)
        path = path if path.is_absolute() else Path(self.cfg.root) / path
        if not path.is_file():
            raise DataError(f"data.vqa_file: {path} does not exist (a CSV with the columns image,question,answer).")
        return path

    def item_text(self, record: Record, train: bool) -> str:
        """``data.text``: the list's whole text, or its EHR description only."""
        if self.cfg.text == "description":
            return str(record.meta["description"])
        return super().item_text(record, train)

    def split_of(self, subject: str) -> str:
        return "val" if stable_fraction(int(self.cfg.split_seed), subject) < float(self.cfg.val_fraction) else "train"

    def load_image(self, record: Record, train: bool) -> Any:
        """``[1, size, size, size]``: min-max, aspect-keeping trilinear resize, centred zero padding (the same
        tensor every time: kept in the in-memory LRU when ``data.cache_size`` > 0)."""
        cached = self._recall(str(record.image_path))
        if cached is not None:
            return cached.clone()
        return self._remember(str(record.image_path), self._read_volume(record)).clone()

    def _read_volume(self, record: Record) -> Any:
        import SimpleITK as sitk
        import torch
        import torch.nn.functional as F

        from medvlp.datamodules.formats import nifti

        cfg = self.cfg
        path = str(record.image_path)
        if path.endswith((".nii", ".nii.gz")):  # checked: permission, truncation, NaN voxels (ITK reads them as 0)
            img = nifti.read_image(path, header_geometry=False)  # sizes in voxels: the spacing is not used
        else:
            check_readable(path)
            try:
                img = sitk.ReadImage(path)
            except RuntimeError as err:
                raise DataError(f"{path} cannot be read as a volume: {str(err).strip().splitlines()[-1]}") from err
        if cfg.orientation:
            img = nifti.orient(img, cfg.orientation)
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        if arr.ndim != 3:
            raise DataError(f"{record.image_path}: a {arr.ndim}-D image; expected a 3-D volume.")
        nifti.check_finite(arr, path)
        if list(cfg.clip_percentiles):
            lo, hi = np.percentile(arr, [float(v) for v in cfg.clip_percentiles])
            arr = np.clip(arr, lo, hi)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            raise DataError(f"{record.image_path}: constant volume (min = max = {lo}); min-max normalisation is undefined.")
        t = torch.from_numpy((arr - lo) / (hi - lo))
        size = int(cfg.size)
        new, offsets = resize_geometry(arr.shape, size)
        t = F.interpolate(t[None, None], size=new, mode="trilinear", align_corners=True)[0, 0]
        pads = []
        for n, before in zip(reversed(new), reversed(offsets), strict=True):  # F.pad order: last axis first
            pads += [before, size - n - before]
        return F.pad(t, pads)[None].contiguous()


def resize_geometry(shape: tuple[int, ...], size: int) -> tuple[list[int], list[int]]:
    """MedBLIP's resize: ``(new size per axis = floor(size * n / max), centred offset = floor((size - n') / 2))``."""
    new = [max(1, math.floor(size * int(n) / max(shape))) for n in shape]
    return new, [(size - n) // 2 for n in new]


__all__ = ["MedBLIPMRIConfig", "MedBLIPMRIDataModule", "CLASSES", "parse_text", "resize_geometry"]
