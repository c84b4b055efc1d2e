"""COVIDx (COVID-Net) chest radiographs with COVID-19 / pneumonia / normal (or positive / negative)
labels, read as distributed on Kaggle (CXR-2 / -3 / -4) or in the COVID-Net GitHub repository.

Official files (``specs/datasets.md`` §6): the images in ``train/``, ``test/`` (and ``val/`` from
CXR-3 on), with header-less, space-separated label files, one image per line:
``<patient id> <filename> <class> <data source>``:

* Kaggle: ``train.txt``, ``test.txt`` (and ``val.txt``), binary ``positive`` / ``negative``;
* GitHub: ``labels/train_COVIDx9A.txt`` / ``labels/test_COVIDx9A.txt`` (and 8A, 9B, ...; also
  accepted at the root), 3-class ``normal`` / ``pneumonia`` / ``COVID-19`` for the A files; the
  oldest (``train_COVIDx.txt``, ``_COVIDx2``) have 3 fields (no data source).

Lines are parsed from the right (``rsplit``): a line whose last token is a class has 3 fields, any
other 4, so a patient id with spaces (``COVID 1 COVID(1).png COVID-19 sirm``, 5 tokens) stays whole.
The class vocabulary is detected from the files in use and exposed as ``label_names``
(``[normal, pneumonia, COVID-19]`` or ``[negative, positive]``, in that order; unknown classes are
appended, sorted); mixing both vocabularies is an error. ``Record.labels`` is the one-hot float32
vector over ``label_names``; ``meta["class"]`` / ``meta["class_index"]`` name it.

Config keys: see :class:`COVIDxConfig`. No reports: every record's text is ``""``.

Splits: ``train`` / ``test`` are the files' train / test; ``val`` is ``val.txt`` when the release
has one, else (MGCA) a share ``data.val_fraction`` (0.2) of train, drawn like scikit-learn's
``train_test_split(train, train_size=1 - val_fraction, random_state=data.val_seed)``.

Images: 8-bit gray or RGB JPG / PNG with mixed extensions (``.png``, ``.jpg``, ``.jpeg``, ``.JPG``)
and 16-bit PNGs (BIMCV), decoded by :func:`~medvlp.datamodules.radiograph.read_gray`, which scales
16-bit data by its maximum instead of clipping it to white.

Differences from the official code (MGCA ``mgca/preprocess/covidx.py``,
``mgca/datasets/classification_dataset.py``):
    * MGCA reads the files with ``pd.read_csv(sep=" ")``, which fails on (or shifts) lines whose
      patient id holds a space; lines are split from the right here.
    * MGCA's label is one integer (``normal`` 0, ``pneumonia`` 1, anything else 2); here a one-hot
      vector over the detected vocabulary, whose index order matches MGCA's for 9A files.
    * MGCA's ``data_pct`` train subsampling is not done here (label fractions are a shared concern).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.radiograph import RadiographConfig, RadiographDataModule, read_gray, shuffle_split
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

KAGGLE_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
VOCABULARIES = (("normal", "pneumonia", "COVID-19"), ("negative", "positive"))
CLASS_TOKENS = {c for v in VOCABULARIES for c in v}
SPLITS = ("train", "val", "test")
_LEGACY = re.compile(r"^train_(COVIDx\w*)\.txt$")


@dataclass
class COVIDxConfig(RadiographConfig):
    """``data.*`` keys of the COVIDx datamodule (``configs/data/covidx.yaml``)."""

    name: str = "covidx"
    version: str = "auto"  # auto | kaggle (train.txt, ...) | a label-file version: COVIDx9A, 9A, COVIDx, ...
    val_fraction: float = bounded(0.2, ge=0, lt=1)  # share of train held out as val when the release has no val file (MGCA: 0.2)
    val_seed: int = bounded(0, ge=0, le=2**32 - 1)  # seed of that holdout (MGCA: random_state=0)


def parse_line(line: str, path: Path, lineno: int) -> tuple[str, str, str, str] | None:
    """``(patient_id, filename, class, source)`` of one label-file line; None for a blank line.

    A line whose last token is a known class has 3 fields (no data source); any other line has 4.
    Splitting from the right keeps spaces inside the patient id.
    """
    text = line.strip()
    if not text:
        return None
    tokens = text.split()
    if tokens[-1] in CLASS_TOKENS and len(tokens) >= 3:
        pid, filename, cls = text.rsplit(maxsplit=2)
        return pid, filename, cls, ""
    if len(tokens) < 4:
        raise DataError(
            f"{path} line {lineno}: '{text}' has {len(tokens)} fields; expected '<patient id> <filename> <class> "
            f"<data source>' (or 3 fields ending in one of {sorted(CLASS_TOKENS)})."
        )
    pid, filename, cls, source = text.rsplit(maxsplit=3)
    return pid, filename, cls, source


def read_label_file(path: Path) -> list[tuple[str, str, str, str]]:
    """Every line of a COVIDx label file, parsed by :func:`parse_line`."""
    from medvlp.datamodules.formats.tables import read_text

    lines = read_text(path, "Label file").splitlines()
    rows = [parse_line(line, path, i + 1) for i, line in enumerate(lines)]
    return [r for r in rows if r is not None]


def vocabulary(classes: set[str], files: list[Path]) -> list[str]:
    """``label_names`` for the classes found in ``files`` (module docstring)."""
    used = [v for v in VOCABULARIES if classes & set(v)]
    if len(used) > 1:
        raise DataError(
            f"The label files {[str(f) for f in files]} mix the class vocabularies {[list(v) for v in used]}; "
            f"use the train and test files of one COVIDx version (data.version)."
        )
    names = list(used[0]) if used else []
    extra = sorted(classes - set(names))
    if extra:
        log.warning("covidx: classes %s are not in the known vocabularies %s; appended to label_names", extra, VOCABULARIES)
    return names + extra


def legacy_versions(root: Path) -> dict[str, Path]:
    """``{"COVIDx9A": folder, ...}`` of the ``train_<version>.txt`` files in ``labels/`` or the root."""
    found: dict[str, Path] = {}
    for folder in (root / "labels", root):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                m = _LEGACY.match(p.name)
                if m and m.group(1) not in found:
                    found[m.group(1)] = folder
    return found


@register_datamodule("covidx")
class COVIDxDataModule(RadiographDataModule):
    """COVIDx CXR-2/3/4 (Kaggle) or a ``*_COVIDx<N>.txt`` release (2D chest X-ray, one class per image)."""

    Config = COVIDxConfig
    modality = "2d"
    default_prompts = ""  # no zero-shot prompt set for COVIDx classes (fine-tuning only, as in MGCA)
    demo_kind = "covidx"  # data.root=demo: the synthetic world of demo/downstream.py
    multiclass = True  # one-hot over exclusive classes
    label_names: list[str] = []
    EXPECTED_LAYOUT = """\
<root>/                                  Kaggle andyczhao/covidx-cxr2 (CXR-2/3/4) or a COVID-Net data folder
  train.txt  test.txt  [val.txt]         '<patient id> <filename> <class> <data source>', no header
  (or labels/train_COVIDx9A.txt  labels/test_COVIDx9A.txt, ...: set data.version if several)
  train/<filename>  test/<filename>  [val/<filename>]
"""

    def __init__(self, cfg: COVIDxConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if not 0.0 < float(cfg.val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1) (MGCA: 0.2), got {cfg.val_fraction}.")
        self._tables: dict[str, Any] = {}
        self.label_names = []
        if Path(cfg.root).is_dir():  # label_names are known once the files are read
            try:
                self.label_names = self.vocabulary()
            except DataError:
                pass  # reported by build_records / check_root, with the file named

    # ------------------------------------------------------------------ layout
    @classmethod
    def label_files(cls, cfg: DataConfig) -> dict[str, Path | None]:
        """``{"train": path, "val": path or None, "test": path}`` of ``data.version``; DataRootError if absent."""
        root = Path(cfg.root)
        version = str(getattr(cfg, "version", "auto"))
        if version == "kaggle" or (version == "auto" and (root / KAGGLE_FILES["train"]).is_file()):
            files = {s: root / n for s, n in KAGGLE_FILES.items()}
            label = "the Kaggle release"
        else:
            legacy = legacy_versions(root)
            if version == "auto":
                if len(legacy) != 1:
                    problem = (f"has several label-file versions {sorted(legacy)}; set data.version to one of them" if legacy
                               else "has neither train.txt nor labels/train_COVIDx<N>.txt")  # fmt: skip
                    raise DataRootError(cls.root_message(cfg.root, problem))
                version = next(iter(legacy))
            elif not version.startswith("COVIDx"):
                version = f"COVIDx{version}"
            if version not in legacy:
                raise DataRootError(cls.root_message(cfg.root, f"has no train_{version}.txt in labels/ or at the root (found: {sorted(legacy) or 'none'})"))
            folder = legacy[version]
            files = {s: folder / f"{s}_{version}.txt" for s in SPLITS}
            label = f"version {version}"
        for split in ("train", "test"):
            if not files[split].is_file():
                raise DataRootError(cls.root_message(cfg.root, f"has no {files[split].name} ({label})"))
        out: dict[str, Path | None] = dict(files)
        if not files["val"].is_file():
            out["val"] = None
        return out

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        files = cls.label_files(cfg)
        root = Path(cfg.root)
        for split, path in files.items():
            if path is not None and not (root / split).is_dir():
                raise DataRootError(cls.root_message(cfg.root, f"has {path.name} but no {split}/ image folder"))

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    def split_key(self) -> str:
        """Everything that defines the train split (names the label-fraction file)."""
        files = self.label_files(self.cfg)
        key = f"{type(self).__name__}|{files['train'].name}"
        if files["val"] is not None:
            return key + f"|{files['val'].name}"
        return key + f"|val={float(self.cfg.val_fraction):g}@{self.cfg.val_seed}"

    # ------------------------------------------------------------------ tables
    def rows(self, official: str) -> list[tuple[str, str, str, str]]:
        """Parsed lines of the ``official`` (train / val / test) label file ([] for a missing val file)."""
        key = f"rows:{official}"
        if key not in self._tables:
            path = self.label_files(self.cfg)[official]
            rows = read_label_file(path) if path is not None else []
            names = [r[1] for r in rows]
            if len(set(names)) < len(names):
                log.warning("covidx: %s lists %d file names more than once", path, len(names) - len(set(names)))
            self._tables[key] = rows
        return self._tables[key]

    def vocabulary(self) -> list[str]:
        """Class names of the label files in use (module docstring)."""
        if "vocab" not in self._tables:
            files = [p for p in self.label_files(self.cfg).values() if p is not None]
            classes = {r[2] for s in SPLITS for r in self.rows(s)}
            self._tables["vocab"] = vocabulary(classes, files)
        return self._tables["vocab"]

    def split_rows(self, split: str) -> tuple[list[tuple[str, str, str, str]], str]:
        """Rows of ``split`` and the image folder they live in."""
        if split == "test":
            return self.rows("test"), "test"
        if self.label_files(self.cfg)["val"] is not None:
            return self.rows(split), split
        rows = self.rows("train")
        n = len(rows)
        n_train = math.floor((1.0 - float(self.cfg.val_fraction)) * n)  # sklearn: train_size given, test = rest
        try:
            train_idx, val_idx = shuffle_split(n, n - n_train, int(self.cfg.val_seed))
        except ValueError as err:
            raise DataError(f"covidx: cannot hold out data.val_fraction={self.cfg.val_fraction} of {n} train rows ({err}).") from err
        idx = train_idx if split == "train" else val_idx
        return [rows[i] for i in idx], "train"

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in SPLITS:
            raise ValueError(f"Unknown split '{split}'; expected one of {list(SPLITS)}.")
        self.check_root(self.cfg)
        self.label_names = self.vocabulary()
        rows, folder = self.split_rows(split)
        eye = np.eye(len(self.label_names), dtype=np.float32)
        base = os.path.join(str(self.root), folder)
        records = []
        for pid, filename, cls, source in rows:
            k = self.label_names.index(cls)
            meta = {"patient_id": pid, "file": filename, "class": cls, "class_index": k, "source": source, "split": split}
            records.append(Record(f"{folder}/{filename}", os.path.join(base, filename), "", eye[k].copy(), meta))
        log.info("covidx %s: %d records from %s/ (classes %s)", split, len(records), folder, self.label_names)
        return records

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        return read_gray(record.image_path, draft_size=self.read_size)
