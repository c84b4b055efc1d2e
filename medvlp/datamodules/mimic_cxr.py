"""MIMIC-CXR-JPG images + MIMIC-CXR free-text reports, read as PhysioNet distributes them.

Official files (``specs/datasets.md`` §1): the JPG tree ``files/pXX/p<subject>/s<study>/<dicom>.jpg``,
``mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}.csv(.gz)``, the optional v2.1.0
``mimic-cxr-2.1.0-test-set-labeled.csv``, and the reports ``files/pXX/p<subject>/s<study>.txt`` from
``mimic-cxr-reports.zip`` (under ``data.root`` or a separate ``data.reports_root``).

Config keys: see :class:`MimicCXRConfig`. Splits: ``train`` / ``val`` / ``test`` are the official
``train`` / ``validate`` / ``test`` (patient-disjoint).

Differences from the official code (MGCA ``mgca/preprocess/mimic_cxr.py``,
``mgca/datasets/pretrain_dataset.py``):
    * MGCA merges ``validate`` and ``test`` into one ``valid`` split; we keep the three official splits.
    * Reports are sectioned on the fly (no ``mimic_cxr_sectioned.csv``); the hand-listed special
      studies of the MIT-LCP parser are kept (MGCA drops them).
    * Images are resized straight to ``image_size`` (no 256 resize + 224 crop); see
      :class:`~medvlp.datamodules.transforms.CXRTransform`.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.formats.reports import get_sectioner, mgca_text
from medvlp.datamodules.radiograph import (
    RadiographConfig,
    RadiographDataModule,
    check_choice,
    read_gray,
    read_table,
)
from medvlp.registry import register_datamodule

if TYPE_CHECKING:  # heavy imports stay inside functions (base.py: check_root must not pay for them)
    import pandas as pd

log = logging.getLogger(__name__)

METADATA = "mimic-cxr-2.0.0-metadata.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
NEGBIO = "mimic-cxr-2.0.0-negbio.csv"
TEST_SET_LABELED = "mimic-cxr-2.1.0-test-set-labeled.csv"

# The 14 labels in the order of the label files' columns (alphabetical; the README lists them in
# another order). The order actually used is read from the label file.
LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]
OFFICIAL_SPLIT = {"train": "train", "val": "validate", "test": "test"}
IMAGES_PER_STUDY = ("all", "one")
LABEL_SOURCES = ("auto", "chexpert", "negbio", "test_set")
UNCERTAIN = {"ignore": np.nan, "zero": 0.0, "one": 1.0}


@dataclass
class MimicCXRConfig(RadiographConfig):
    """``data.*`` keys of the MIMIC-CXR datamodule (``configs/data/mimic_cxr.yaml``)."""

    name: str = "mimic_cxr"
    reports_root: str = ""  # folder holding files/pXX/p<subject>/s<study>.txt; "" = data.root
    views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # ViewPosition kept; [] = every view
    sections: list[str] = field(default_factory=lambda: ["impression", "findings"])  # joined in order
    sectioner: str = "mimic"  # mimic (MIT-LCP rules) | chexzero | package.module:function
    min_tokens: int = bounded(3, ge=0)  # studies whose text has fewer \w+ tokens are dropped (MGCA)
    images_per_study: str = "all"  # all: one sample per image (MGCA) | one: one per study
    label_source: str = "auto"  # auto | chexpert | negbio | test_set (see MimicCXRDataModule)
    uncertain: str = "ignore"  # policy for -1 labels: ignore (NaN) | zero | one


def find_csv(root: Path, name: str) -> Path | None:
    """``root/name.gz`` (as distributed) or ``root/name`` (decompressed), whichever exists."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


def read_table_header(path: Path) -> list[str]:
    """Column names of a CSV (reads one line)."""
    from medvlp.datamodules.formats.tables import read_header

    return read_header(path)


def _strip_prefix(ids: pd.Series, prefix: str) -> pd.Series:
    """``s50414267`` / ``50414267`` / `` 50414267.0`` -> ``50414267`` (derived CSVs add prefixes)."""
    s = ids.astype(str).str.strip().str.removeprefix(prefix)
    return s.str.replace(r"\.0$", "", regex=True)


@register_datamodule("mimic_cxr")
class MimicCXRDataModule(RadiographDataModule):
    """MIMIC-CXR-JPG + reports (2D chest X-ray, 14 CheXpert labels per study).

    Label policy: values are 1 / 0 / NaN (blank = not mentioned); ``-1`` (uncertain) becomes NaN,
    0 or 1 according to ``data.uncertain``. Studies without a label row get all-NaN labels.
    ``data.label_source``: ``auto`` uses the radiologist labels of ``mimic-cxr-2.1.0-test-set-labeled
    .csv`` for the test split when that file exists and CheXpert labels otherwise; ``chexpert`` /
    ``negbio`` use that labeller for every split; ``test_set`` requires the v2.1.0 file for test.
    """

    Config = MimicCXRConfig
    modality = "2d"
    default_prompts = "cxr.yaml"
    demo_kind = "cxr"
    label_names = list(LABELS)
    EXPECTED_LAYOUT = """\
<root>/                                    e.g. physionet.org/files/mimic-cxr-jpg/2.0.0
  files/p10/p10000032/s50414267/<dicom_id>.jpg
  mimic-cxr-2.0.0-metadata.csv.gz          (.csv accepted too)
  mimic-cxr-2.0.0-split.csv.gz
  mimic-cxr-2.0.0-chexpert.csv.gz
  mimic-cxr-2.0.0-negbio.csv.gz
  mimic-cxr-2.1.0-test-set-labeled.csv     (v2.1.0, optional)
<reports_root or root>/files/p10/p10000032/s50414267.txt   (from mimic-cxr-reports.zip)
"""

    def __init__(self, cfg: MimicCXRConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        check_choice("data.images_per_study", cfg.images_per_study, IMAGES_PER_STUDY)
        check_choice("data.label_source", cfg.label_source, LABEL_SOURCES)
        check_choice("data.uncertain", cfg.uncertain, tuple(UNCERTAIN))
        if not list(cfg.sections):
            raise ValueError("data.sections is empty; use e.g. [impression, findings].")
        self.sectioner = get_sectioner(cfg.sectioner)
        self.label_names = list(LABELS)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        if not (root / "files").is_dir():
            raise DataRootError(cls.root_message(cfg.root, "has no files/ folder"))
        source = getattr(cfg, "label_source", "auto")
        required = [METADATA, SPLIT, NEGBIO if source == "negbio" else CHEXPERT]
        for name in required:
            if find_csv(root, name) is None:
                raise DataRootError(cls.root_message(cfg.root, f"has no {name}.gz (nor {name})"))
        if source == "test_set" and find_csv(root, TEST_SET_LABELED) is None:
            raise DataRootError(cls.root_message(cfg.root, f"has no {TEST_SET_LABELED} (data.label_source=test_set)"))
        reports_root = getattr(cfg, "reports_root", "")
        if reports_root and not Path(reports_root).is_dir():
            raise DataRootError(
                cls.root_message(cfg.root, f"is fine, but data.reports_root '{reports_root}' is not a directory")
            )

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    def reports_dir(self) -> str:
        """The folder holding ``pXX/p<subject>/s<study>.txt`` (looked up once)."""
        if "reports_dir" not in self._tables:
            base = Path(self.cfg.reports_root) if self.cfg.reports_root else self.root
            self._tables["reports_dir"] = str(base / "files" if (base / "files").is_dir() else base)
        return self._tables["reports_dir"]

    def report_path(self, subject_id: str, study_id: str) -> str:
        return os.path.join(self.reports_dir(), f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}.txt")

    def image_path(self, subject_id: str, study_id: str, dicom_id: str) -> str:
        return os.path.join(str(self.cfg.root), "files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}", f"{dicom_id}.jpg")

    def _csv(self, name: str) -> Path:
        path = find_csv(self.root, name)
        if path is None:
            raise DataRootError(self.root_message(self.cfg.root, f"has no {name}.gz (nor {name})"))
        return path

    # ------------------------------------------------------------------ tables
    def images(self) -> pd.DataFrame:
        """Frontal (``data.views``) images with their split: dicom_id, subject_id, study_id, view, split."""
        if "images" in self._tables:
            return self._tables["images"]
        meta_path, split_path = self._csv(METADATA), self._csv(SPLIT)
        meta = read_table(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
        meta = meta[["dicom_id", "subject_id", "study_id", "ViewPosition"]].rename(columns={"ViewPosition": "view"})
        views = [str(v) for v in self.cfg.views]
        if views:
            meta = meta[meta["view"].isin(views)]  # blank ViewPosition (NaN) never matches
        split = read_table(split_path, ["dicom_id", "split"])[["dicom_id", "split"]]
        if split["dicom_id"].duplicated().any():
            dup = split.loc[split["dicom_id"].duplicated(), "dicom_id"].iloc[0]
            raise DataError(f"{split_path} lists dicom_id {dup} more than once.")
        df = meta.merge(split, on="dicom_id", how="left")
        unsplit = int(df["split"].isna().sum())
        if unsplit:
            log.info("mimic_cxr: %d images of %s have no row in %s and are ignored", unsplit, meta_path.name, split_path.name)
            df = df[df["split"].notna()]
        df["subject_id"] = _strip_prefix(df["subject_id"], "p")
        df["study_id"] = _strip_prefix(df["study_id"], "s")
        rank = {v: i for i, v in enumerate(views)}
        df["_rank"] = df["view"].map(rank).fillna(len(rank))
        df = df.sort_values(["subject_id", "study_id", "_rank", "dicom_id"], kind="stable").drop(columns="_rank")
        self._tables["images"] = df.reset_index(drop=True)
        return self._tables["images"]

    def label_file(self, split: str) -> Path:
        """The label CSV used for ``split`` under ``data.label_source``."""
        source = self.cfg.label_source
        if source == "negbio":
            return self._csv(NEGBIO)
        if split == "test" and source in ("auto", "test_set"):
            path = find_csv(self.root, TEST_SET_LABELED)
            if path is None and source == "test_set":
                raise DataRootError(self.root_message(self.cfg.root, f"has no {TEST_SET_LABELED} (data.label_source=test_set)"))
            if path is not None:
                header = read_table_header(path)
                missing = [c for c in ["study_id", *LABELS] if c not in header]
                if not missing:
                    return path
                if source == "test_set":
                    raise DataError(f"{path} lacks the column(s) {missing}; found {header}.")
                log.warning("mimic_cxr: %s lacks %s; the test split uses CheXpert labels instead", path, missing)
        return self._csv(CHEXPERT)

    def _label_order(self) -> list[str]:
        """``label_names`` = the label columns in the order of the CheXpert (or NegBio) file."""
        path = self._csv(NEGBIO if self.cfg.label_source == "negbio" else CHEXPERT)
        names = [c for c in read_table_header(path) if c not in ("subject_id", "study_id")]
        if sorted(names) != sorted(LABELS):
            raise DataError(f"{path} should hold the 14 CheXpert labels after subject_id, study_id; found {names}.")
        self.label_names = names
        return names

    def labels(self, split: str) -> dict[str, np.ndarray]:
        """study_id -> float32 labels in ``label_names`` order (1 / 0 / NaN after ``data.uncertain``)."""
        import pandas as pd

        path = self.label_file(split)
        key = f"labels:{path}"
        if key not in self._tables:
            df = read_table(path, ["study_id"])
            names = self._label_order()
            df["study_id"] = _strip_prefix(df["study_id"], "s")
            if df["study_id"].duplicated().any():
                raise DataError(f"{path} lists study {df.loc[df['study_id'].duplicated(), 'study_id'].iloc[0]} twice.")
            raw = df[names]
            values = raw.apply(pd.to_numeric, errors="coerce")
            bad = (values.isna() & raw.notna()) | (values.notna() & ~values.isin([1.0, 0.0, -1.0]))
            if bad.any().any():
                examples = sorted({str(v) for v in raw.to_numpy()[bad.to_numpy()]})[:5]
                raise DataError(f"{path} has label values {examples}; expected 1.0, 0.0, -1.0 or blank.")
            arr = np.array(values.to_numpy(dtype=np.float32), copy=True)  # pandas may hand out a read-only view
            arr[arr == -1.0] = UNCERTAIN[self.cfg.uncertain]
            self._tables[key] = pd.DataFrame({"study_id": df["study_id"], "labels": list(arr)})
        table = self._tables[key]
        return dict(zip(table["study_id"], table["labels"], strict=True))

    def study_text(self, subject_id: str, study_id: str) -> str | None:
        """Pre-training text of a study (None = too short); DataError if the report is missing."""
        from medvlp.datamodules.formats.tables import read_text

        path = self.report_path(subject_id, study_id)
        if not os.path.isfile(path):
            raise DataError(
                f"Report {path} does not exist. Reports come from mimic-cxr-reports.zip (MIMIC-CXR project); "
                f"unzip it and set data.reports_root to the folder holding its files/ (current: "
                f"'{self.cfg.reports_root or self.cfg.root}')."
            )
        raw = read_text(path, "Report")  # strict UTF-8: an undecodable byte is an error, not a silent U+FFFD
        return mgca_text(self.sectioner(raw), min_tokens=int(self.cfg.min_tokens), names=list(self.cfg.sections))

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in OFFICIAL_SPLIT:
            raise ValueError(f"Unknown split '{split}'; expected one of {list(OFFICIAL_SPLIT)}.")
        self.check_root(self.cfg)
        df = self.images()
        df = df[df["split"] == OFFICIAL_SPLIT[split]]
        labels = self.labels(split)
        n_labels = len(self.label_names)
        records: list[Record] = []
        n_studies = dropped_text = missing_reports = 0
        first_missing: DataError | None = None
        short = f"shorter than data.min_tokens={self.cfg.min_tokens} tokens"
        rows = zip(df["subject_id"], df["study_id"], df["dicom_id"], df["view"], strict=True)
        # df is sorted by subject, study: consecutive rows of one study form a group (fast on 370k rows)
        for (subject_id, study_id), group in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
            images = [(dicom_id, view) for _, _, dicom_id, view in group]
            n_studies += 1
            try:
                text = self.study_text(subject_id, study_id)
            except DataError as err:
                if self.cfg.on_error != "skip":
                    raise
                missing_reports += 1
                first_missing = first_missing or err
                self.note_dropped(split, study_id, str(err))
                continue
            if text is None:
                dropped_text += 1
                self.note_dropped(split, study_id, f"report {self.report_path(subject_id, study_id)}: the "
                                                   f"{'+'.join(self.cfg.sections)} text is empty or {short} (as MGCA)")
                continue
            lab = labels.get(study_id)
            lab = np.full(n_labels, np.nan, dtype=np.float32) if lab is None else lab.copy()
            paths = [self.image_path(subject_id, study_id, dicom_id) for dicom_id, _ in images]
            meta = {"subject_id": subject_id, "split": split}
            if self.cfg.images_per_study == "one":
                meta.update(dicom_ids=[d for d, _ in images], views=[v for _, v in images])
                records.append(Record(study_id, paths, text, lab, meta))
            else:
                for path, (dicom_id, view) in zip(paths, images, strict=True):
                    records.append(Record(study_id, path, text, lab, {**meta, "dicom_id": dicom_id, "view": view}))
        if dropped_text:
            log.info(
                "mimic_cxr %s: dropped %d of %d studies whose %s text has fewer than %d tokens (sectioner %s; "
                "listed in dm.dropped / dropped.csv)",
                split, dropped_text, n_studies, "+".join(self.cfg.sections), self.cfg.min_tokens, self.cfg.sectioner,
            )
        if missing_reports:
            log.warning("mimic_cxr %s: skipped %d studies without a readable report (first: %s)", split, missing_reports, first_missing)
        log.info("mimic_cxr %s: %d records from %d studies", split, len(records), n_studies - dropped_text - missing_reports)
        return records

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        import torch

        path = record.image_path
        if isinstance(path, list):
            index = int(torch.randint(len(path), ()).item()) if train and len(path) > 1 else 0
            path = path[index]
        return read_gray(path, draft_size=self.read_size)
