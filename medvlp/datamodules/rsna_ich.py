"""RSNA Intracranial Hemorrhage Detection (Kaggle 2019), read as distributed, as head CT volumes.

Files (``specs/datasets.md`` §11): ``stage_2_train.csv`` (``ID,Label``; six rows per image,
``ID_<hex>_<subtype>`` with subtype in ``epidural, intraparenchymal, intraventricular,
subarachnoid, subdural, any``), ``stage_2_train/ID_<hex>.dcm`` (flat, one slice per file, UIDs
de-identified as ``ID_...`` strings). ``stage_2_test/`` has no labels and is not read.

Volumes are rebuilt from slices: every file's header (StudyInstanceUID, SeriesInstanceUID, position)
is read once into an index kept in ``<cache_dir()>/index/`` (keyed by the root; ``data.index_workers``
processes), and the slices of each series form one record, ordered by position with the checks of
:mod:`~medvlp.datamodules.formats.dicom_series`. A series' label for each subtype is the maximum
over its slices. Slices whose values wrapped (``BitsStored`` 12, unsigned, intercept > -100) get the
widely used correction (``read_series(fix_wrapped_12bit=True)``).

CSV handling: exact duplicate rows (a few images are listed twice) are dropped before pivoting; an
image whose six rows disagree, or that lacks a subtype, is an error (named); ``data.exclude``
leaves out images (default: ``ID_6431af929``, whose pixel data is corrupt). A series with an
excluded or unlabelled slice is dropped, and the drops are counted.

Splits: the labelled set is split by StudyInstanceUID with a seeded hash (``data.val_fraction``,
``data.test_fraction``; deterministic, independent of file order), because the competition's test
labels are not distributed. ``data.test_fraction=1`` (with ``val_fraction=0``) makes the whole labelled set the
test split: HLIP scores zero-shot on every study (hlip.md 7.4; its protocol preset sets it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, Record, stable_fraction
from medvlp.datamodules.volume import VolumeConfig, VolumeDataModule
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train.csv"
TRAIN_DIR = "stage_2_train"
SUBTYPES = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
CORRUPT = ["ID_6431af929"]
INDEX_VERSION = 1


@dataclass
class RSNAICHConfig(VolumeConfig):
    """``data.*`` keys of the RSNA haemorrhage datamodule (``configs/data/rsna_ich.yaml``)."""

    name: str = "rsna_ich"
    exclude: list[str] = field(default_factory=lambda: list(CORRUPT))  # image ids left out
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # of the studies
    test_fraction: float = bounded(0.1, ge=0, le=1)  # 1: every study is a test study (zero-shot on the full set)
    split_seed: int = bounded(0, ge=0, le=2**32 - 1)
    index_workers: int = bounded(0, ge=0)  # processes reading the DICOM headers once (0 = data.num_workers or the CPU count)
    spacing_tolerance: float = bounded(0.1, gt=0)
    hu_sanity_check: bool = False  # the chest-CT air/lung check does not apply to heads
    spacing: list[float] = bounded(default_factory=lambda: [5.0, 1.0, 1.0], gt=0, each=True)
    size: list[int] = bounded(default_factory=lambda: [32, 224, 224], gt=0, each=True)
    window: list[float] = field(default_factory=lambda: [0.0, 80.0])
    batch_size: int = 8
    eval_batch_size: int = 8


def read_labels(path: Path, exclude: set[str]) -> tuple[dict[str, np.ndarray], int]:
    """``({image id: float32 [6] in SUBTYPES order}, duplicate rows dropped)`` from ``stage_2_train.csv``."""

    from medvlp.datamodules.formats.tables import read_csv

    df = read_csv(path, strings=False, dtype={"ID": str})
    if list(df.columns[:2]) != ["ID", "Label"]:
        raise DataError(f"{path}: expected the header ID,Label, got {list(df.columns)}.")
    n = len(df)
    df = df.drop_duplicates()
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        bad = df["ID"][parts[1].isna()].iloc[0] if parts.shape[1] == 2 else df["ID"].iloc[0]
        raise DataError(f"{path}: ID '{bad}' is not ID_<hex>_<subtype>.")
    df = df.assign(image=parts[0], subtype=parts[1])
    unknown = sorted(set(df["subtype"]) - set(SUBTYPES))
    if unknown:
        raise DataError(f"{path}: unknown subtype(s) {unknown}; expected {SUBTYPES}.")
    clash = df.duplicated(["image", "subtype"], keep=False)
    if clash.any():
        raise DataError(f"{path}: image {df['image'][clash].iloc[0]} has conflicting labels for one subtype.")
    wide = df.pivot(index="image", columns="subtype", values="Label").reindex(columns=SUBTYPES)
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        raise DataError(f"{path}: image {wide.index[incomplete][0]} lacks some of the six subtype rows.")
    wide = wide[SUBTYPES].astype(np.float32)
    return {k: v for k, v in zip(wide.index, wide.to_numpy(), strict=True) if k not in exclude}, n - len(df)


def _header_row(path: str) -> list[Any]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                                                         "ImagePositionPatient", "SOPInstanceUID"])
        ipp = ds.get("ImagePositionPatient")
        return [Path(path).stem, str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                float(ipp[2]) if ipp is not None else None, ""]
    except Exception as err:  # noqa: BLE001 - recorded in the index, applied per data.on_error later
        return [Path(path).stem, "", "", None, f"{type(err).__name__}: {err}"]


@register_datamodule("rsna_ich")
class RSNAICHDataModule(VolumeDataModule):
    """RSNA intracranial haemorrhage slices regrouped into head CT series, six labels per series."""

    Config = RSNAICHConfig
    label_names = list(SUBTYPES)
    EXPECTED_LAYOUT = """\
  <root>/stage_2_train.csv                 ID,Label  (ID_<hex>_<subtype>, six rows per image)
  <root>/stage_2_train/ID_<hex>.dcm ...    one axial slice per file (flat)
"""

    def __init__(self, cfg: RSNAICHConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        val, test = float(cfg.val_fraction), float(cfg.test_fraction)
        if not (0 <= val and 0 <= test and (val + test < 1 or (test == 1 and val == 0))):
            raise ValueError(f"data.val_fraction and data.test_fraction must be >= 0 with a sum < 1 (or test_fraction=1 "
                             f"and val_fraction=0: every study tests), got {cfg.val_fraction} and {cfg.test_fraction}.")
        self.counts: dict[str, int] = {}
        self._series: dict[str, dict[str, Any]] | None = None

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        cls.require(cfg, files=(LABELS_CSV,), dirs=(TRAIN_DIR,))

    # ------------------------------------------------------------------ header index
    def index_path(self) -> Path:
        from medvlp.cache import cache_dir

        key = hashlib.sha1(os.path.abspath(str(self.cfg.root)).encode()).hexdigest()[:12]
        return cache_dir() / "index" / f"rsna_ich-{key}-v{INDEX_VERSION}.jsonl"

    def header_index(self) -> list[list[Any]]:
        """``[image id, study uid, series uid, z, error]`` for every DICOM of ``stage_2_train/``, read
        once (``data.index_workers`` processes) and kept in :meth:`index_path`; rebuilt when the set of
        files changes."""
        folder = Path(self.cfg.root) / TRAIN_DIR
        files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".dcm")
        path = self.index_path()
        stems = sorted(Path(f).stem for f in files)
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            if sorted(r[0] for r in rows) == stems:
                return rows
        workers = int(self.cfg.index_workers or self.cfg.num_workers or os.cpu_count() or 1)
        log.info("rsna_ich: reading %d DICOM headers once (%d processes) into %s", len(files), workers, path)
        if workers > 1 and len(files) > 256:
            import multiprocessing as mp

            with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None).Pool(workers) as pool:
                rows = pool.map(_header_row, files, chunksize=256)
        else:
            rows = [_header_row(f) for f in files]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)
        return rows

    def series(self) -> dict[str, dict[str, Any]]:
        """``{series uid: {"study", "slices" (paths), "labels" [6]}}`` of the usable series."""
        if self._series is not None:
            return self._series
        root = Path(self.cfg.root)
        labels, dupes = read_labels(root / LABELS_CSV, set(self.cfg.exclude))
        self.counts["duplicate_csv_rows"] = dupes
        groups: dict[str, dict[str, Any]] = {}
        bad: dict[str, str] = {}
        unreadable = []
        excluded = set(self.cfg.exclude)
        dropped: list[tuple[str, str]] = []  # (image or series id, why)
        for image, study, series, _z, error in self.header_index():
            if error and image in excluded:
                continue  # a known corrupt file, left out on purpose
            if error:
                unreadable.append(f"{root / TRAIN_DIR / image}.dcm: {error}")
                dropped.append((image, unreadable[-1]))
                continue
            g = groups.setdefault(series, {"study": study, "slices": [], "images": []})
            g["slices"].append(str(root / TRAIN_DIR / f"{image}.dcm"))
            g["images"].append(image)
            if image in excluded:
                bad[series] = f"slice {image} is in data.exclude"
            elif image not in labels:
                bad[series] = f"slice {image} has no rows in {LABELS_CSV}"
        problems = unreadable + [f"series {s}: {why}" for s, why in bad.items()]
        if problems:
            self.counts["dropped"] = len(problems)
            text = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            if self.cfg.on_error != "skip":
                raise DataError(f"RSNA haemorrhage ({root}): {text}. Set data.on_error=skip to skip (and count) them.")
            dropped += [(s, f"series {s}: {why}") for s, why in bad.items()]
            for item, why in dropped:  # before the split is drawn (by study): listed under "all"
                self.note_dropped("all", item, why)
            log.warning("rsna_ich: dropped %d series / files: %s", len(problems), text)
        out = {}
        for uid, g in groups.items():
            if uid in bad:
                continue
            g["labels"] = np.max(np.stack([labels[i] for i in g["images"]]), axis=0)
            out[uid] = g
        self._series = out
        return out

    def split_of(self, study: str) -> str:
        cfg = self.cfg
        u, test = stable_fraction(int(cfg.split_seed), study), float(cfg.test_fraction)
        if u < test or test >= 1:
            return "test"
        return "val" if u < test + float(cfg.val_fraction) else "train"

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split '{split}'; expected train, val or test.")
        root = Path(self.cfg.root) / TRAIN_DIR
        records = []
        for uid, g in sorted(self.series().items()):
            if self.split_of(g["study"]) == split:
                records.append(Record(uid, f"{root}#{uid}", "", g["labels"].copy(),
                                      {"study": g["study"], "slices": list(g["slices"])}))
        return records

    def cache_source(self, record: Record) -> list[str]:
        return record.meta["slices"]

    def hu_image(self, path: str, source: Any) -> Any:
        from medvlp.datamodules.formats.dicom_series import read_series

        return read_series(list(source), float(self.cfg.spacing_tolerance), fix_wrapped_12bit=True)

    def volume_settings(self) -> dict[str, Any]:
        return {**super().volume_settings(), "spacing_tolerance": float(self.cfg.spacing_tolerance),
                "fix_wrapped_12bit": True}


__all__ = ["RSNAICHConfig", "RSNAICHDataModule", "SUBTYPES", "read_labels"]
