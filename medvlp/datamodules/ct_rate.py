"""CT-RATE chest CT volumes + reports + 18 abnormality labels, read as distributed on Hugging Face.

Official files (``specs/datasets.md`` §8): ``dataset/{train,valid}/<split>_<p>/<split>_<p>_<s>/
<split>_<p>_<s>_<r>.nii.gz`` (v1, raw stored values), the same names under ``{train,valid}_fixed/``
(v2, int16 HU), ``radiology_text_reports/{train,validation}_reports.csv``,
``multi_abnormality_labels/{train,valid}_predicted_labels.csv`` and
``metadata/{train,validation}_metadata.csv``.

Config keys: see :class:`CTRateConfig`. Splits: ``train`` = official train minus a seeded
patient-level holdout (``data.val_fraction``), ``val`` = that holdout, ``test`` = official valid.
One record = one scan (``train_1_a``) with its reconstructions (``data.reconstructions=one``), or one
reconstruction (``all``). Reports and labels are read per reconstruction, as the CSVs give them (one
row per VolumeName): a drawn reconstruction comes with its own report.

Every volume or row left out (no usable report text, no file, unusable metadata, ...) is listed by
VolumeName with the reason in ``dm.dropped`` (and the run's ``dropped.csv``).

Volume pipeline per item (``load_image``): read -> (v1) spacing/origin/direction from the metadata
CSV -> HU = stored * RescaleSlope + RescaleIntercept (v1 only, by default) -> orientation
``data.orientation`` -> resample to ``data.spacing`` (z, y, x) mm -> HU sanity check -> window
``data.window`` to [0, 1] -> centre pad/crop to ``data.size`` -> (x - mean) / std -> ``[1, D, H, W]``.

Differences from the official code:
    * HLIP (``data/ct_rate/process.py``) applies the metadata rescale to every file it reads and
      never reorients; we rescale v1 files only (v2 ``*_fixed`` files are HU already) and reorient
      to ``data.orientation`` (set ``orientation: ""`` to keep the stored axis order).
    * HLIP builds the text with ``str(field)``, which writes ``nan`` for empty cells; empty fields
      and the placeholder ``Not given.`` are left out here, and a reconstruction with no text is
      dropped (and listed).
    * HLIP trains on all of official train and evaluates on official valid; ``val`` here is a
      patient-level holdout of train.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import (
    DataConfig,
    DataError,
    DataRootError,
    Record,
)
from medvlp.datamodules.errors import os_error
from medvlp.datamodules.volume import VolumeConfig, VolumeDataModule
from medvlp.registry import register_datamodule

if TYPE_CHECKING:  # heavy imports stay inside functions (base.py: check_root must not pay for them)
    import pandas as pd


log = logging.getLogger(__name__)

REPORTS = {"train": "radiology_text_reports/train_reports.csv", "valid": "radiology_text_reports/validation_reports.csv"}
LABEL_FILES = {"train": "multi_abnormality_labels/train_predicted_labels.csv", "valid": "multi_abnormality_labels/valid_predicted_labels.csv"}
METADATA = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
OFFICIAL_SPLIT = {"train": "train", "val": "train", "test": "valid"}

LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
UNREADABLE = ["train_1267_a_4", "train_11755_a_3", "train_11755_a_4"]  # HLIP excludes these
VERSIONS = ("auto", "v1", "v2")
RECONSTRUCTIONS = ("one", "all")
TEXTS = ("impressions+findings", "findings", "impressions", "organ")
ORGANS = ("lung", "heart", "esophagus", "aorta")
NO_ABNORMALITY = "No significant abnormalities."
PLACEHOLDERS = {"", "not given.", "not given", "nan"}
_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)$")
_HLIP_STRIP = str.maketrans("", "", "\"'()")


@dataclass
class CTRateConfig(VolumeConfig):
    """``data.*`` keys of the CT-RATE datamodule (``configs/data/ct_rate.yaml``); the volume keys
    (spacing, size, window, orientation, ...) are those of :class:`~medvlp.datamodules.volume.VolumeConfig`."""

    name: str = "ct_rate"
    batch_size: int = 16  # HLIP: 16 per GPU
    eval_batch_size: int = 16
    max_length: int = 512  # HLIP's CT-RATE text context
    version: str = "auto"  # auto: v2 (train_fixed/) where the file exists, else v1 | v1 | v2
    apply_metadata_rescale: str = "auto"  # auto: on for v1 files, off for v2 | on | off
    reconstructions: str = "one"  # one: one volume per scan (random at train) | all: every volume
    eval_reconstructions: str = ""  # val / test splits: one | all; "" = as data.reconstructions (HLIP: all)
    text: str = "impressions+findings"  # impressions+findings (HLIP) | findings | impressions | organ (HLIP organ-wise)
    organ_findings_file: str = "desc_info.json"  # text=organ: fVLM's per-organ findings {scan: {organ: str}}
    organ_impressions_file: str = "conc_info.json"  # text=organ: fVLM's per-organ impressions
    anatomy_text: str = "none"  # none | fvlm: each item also carries fVLM's per-anatomy report texts (from the two files above)
    exclude: list[str] = field(default_factory=lambda: list(UNREADABLE))  # VolumeNames left out
    val_fraction: float = bounded(0.05, ge=0, lt=1)  # patients of official train held out as the val split
    val_seed: int = bounded(0, ge=0, le=2**32 - 1)  # seed of that holdout (independent of data.seed, so runs share one val split)


def dataset_dir(root: str | os.PathLike) -> Path | None:
    """The CT-RATE ``dataset/`` folder: ``root`` itself or ``root/dataset``; None if neither."""
    root = Path(root)
    for candidate in (root, root / "dataset"):
        if (candidate / "radiology_text_reports").is_dir() or (candidate / "multi_abnormality_labels").is_dir():
            return candidate
    return None


def volume_key(name: str) -> str:
    """``train_1_a_1.nii.gz`` -> ``train_1_a_1``."""
    name = str(name).strip()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_name(name: str) -> tuple[str, int, str, int]:
    """``train_12_b_10`` -> ("train", 12, "b", 10); ValueError if it is not a CT-RATE volume name."""
    m = _NAME.match(volume_key(name))
    if m is None:
        raise ValueError(f"'{name}' is not a CT-RATE volume name (<train|valid>_<patient>_<scan>_<recon>)")
    return m.group(1), int(m.group(2)), m.group(3), int(m.group(4))


def scan_of(name: str) -> str:
    return volume_key(name).rsplit("_", 1)[0]


def patient_of(name: str) -> str:
    return volume_key(name).rsplit("_", 2)[0]


def clean_field(value: Any) -> str:
    """A report field as text; NaN, empty and the ``Not given.`` placeholder become ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text.lower() in PLACEHOLDERS else text


def report_text(findings: Any, impressions: Any, mode: str = "impressions+findings") -> str | None:
    """Training text of a CT-RATE report, or None if the requested fields are empty.

    ``impressions+findings`` follows HLIP: ``"The volume shows: <impressions> The volume looks like:
    <findings>"`` with ``"``, ``'``, ``(`` and ``)`` removed; an empty field's phrase is left out.
    """
    f, i = clean_field(findings), clean_field(impressions)
    if mode == "findings":
        return f or None
    if mode == "impressions":
        return i or None
    parts = []
    if i:
        parts.append(f"The volume shows: {_period(i)}")
    if f:
        parts.append(f"The volume looks like: {_period(f)}")
    return " ".join(parts).translate(_HLIP_STRIP) if parts else None


def _period(text: str) -> str:
    return text if text.endswith(".") else text + "."


ANATOMY_TEXTS = ("none", "fvlm")
FVLM_TEMPLATE = "{anatomy} shows no significant abnormalities."
_FVLM_STRIP = str.maketrans("", "", "\"'()")


def fvlm_anatomy_texts(findings: dict[str, Any] | None, impressions: dict[str, Any] | None,
                       anatomies: tuple[str, ...] = ORGANS) -> tuple[dict[str, str], list[bool]]:
    """fVLM's per-anatomy report of one scan (spec §3.2, the released ``caption_datasets.py``), and
    which anatomies it calls abnormal.

    For each anatomy: ``conc`` = its impression text with a final "." added if missing, or - when the
    impression does not mention it - the normal template ``"<anatomy> shows no significant
    abnormalities."``; ``desc`` = its findings text with a final "." added, or ""; text = ``conc + desc``
    with no separator, every ``"``, ``'``, ``(`` and ``)`` removed. Abnormal iff the text does not start
    with the template (the impression mentions the anatomy). Texts are used as given (no stripping).
    """
    texts, abnormal = {}, []
    for name in anatomies:
        template = FVLM_TEMPLATE.format(anatomy=name)
        parts = []
        for table in (impressions, findings):
            value = (table or {}).get(name)
            parts.append("" if value is None else _period(str(value)))
        conc = parts[0] or template
        texts[name] = (conc + parts[1]).translate(_FVLM_STRIP)
        abnormal.append(not texts[name].startswith(template))
    return texts, abnormal


def organ_texts(findings: dict[str, Any] | None, impressions: dict[str, Any] | None) -> list[str]:
    """HLIP's organ-wise supervision of one scan (spec §3.6): for lung, heart, esophagus and aorta,
    ``"The <organ> shows: <impression part> The <organ> looks like: <findings part>"``, an empty or
    missing part replaced by ``No significant abnormalities.``, ``"'()`` removed."""
    out = []
    for organ in ORGANS:
        i = clean_field((impressions or {}).get(organ)) or NO_ABNORMALITY
        f = clean_field((findings or {}).get(organ)) or NO_ABNORMALITY
        out.append(f"The {organ} shows: {_period(i)} The {organ} looks like: {_period(f)}".translate(_HLIP_STRIP))
    return out


_META_COLUMNS = ["XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient"]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


@functools.lru_cache(maxsize=65536)
def _parse_cell(text: str) -> tuple[float, ...]:
    parsed = ast.literal_eval(text.strip())
    if isinstance(parsed, (int, float)):
        parsed = [parsed]
    return tuple(float(v) for v in parsed)


def _cell(value: Any, length: int, column: str) -> tuple[float, ...]:
    """A numeric metadata cell: a number or a Python-list string such as ``"[0.7, 0.7]"``."""
    if _blank(value):
        raise ValueError(f"{column} is empty")
    values = _parse_cell(str(value))
    if len(values) != length or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{column} should hold {length} finite number(s), got {value!r}")
    return values


@functools.lru_cache(maxsize=1024)
def _direction(iop: tuple[float, ...]) -> tuple[float, ...]:
    from medvlp.datamodules.formats.nifti import direction_from_iop

    return direction_from_iop(iop)


@dataclass(frozen=True)
class VolumeSpec:
    """How to turn one volume file into HU (everything from the CSVs, resolved once)."""

    name: str
    path: str
    version: str  # v1 | v2
    slope: float = 1.0
    intercept: float = 0.0
    rescale: bool = False
    spacing_zyx: tuple[float, float, float] | None = None  # metadata spacing (v1); None = header
    origin: tuple[float, ...] | None = None
    direction: tuple[float, ...] | None = None


@register_datamodule("ct_rate")
class CTRateDataModule(VolumeDataModule):
    """CT-RATE (3D chest CT, 18 report-derived abnormality labels per scan)."""

    Config = CTRateConfig
    modality = "3d"
    default_prompts = "ct_rate.yaml"
    demo_kind = "ct"
    label_names = list(LABELS)
    EXPECTED_LAYOUT = """\
<root>/dataset/                                 (data.root may be dataset/ itself)
  train/train_1/train_1_a/train_1_a_1.nii.gz    v1 volumes (and valid/...)
  train_fixed/..., valid_fixed/...              v2 volumes, same names (optional)
  radiology_text_reports/train_reports.csv, validation_reports.csv
  multi_abnormality_labels/train_predicted_labels.csv, valid_predicted_labels.csv
  metadata/train_metadata.csv, validation_metadata.csv
"""

    def __init__(self, cfg: CTRateConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        _choice("data.version", cfg.version, VERSIONS)
        _choice("data.reconstructions", cfg.reconstructions, RECONSTRUCTIONS)
        if cfg.eval_reconstructions:
            _choice("data.eval_reconstructions", cfg.eval_reconstructions, RECONSTRUCTIONS)
        _choice("data.text", cfg.text, TEXTS)
        _choice("data.anatomy_text", cfg.anatomy_text, ANATOMY_TEXTS)
        self.rescale_mode = _rescale_mode(cfg.apply_metadata_rescale)
        if not 0.0 <= float(cfg.val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.label_names = list(LABELS)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        ds = dataset_dir(root)
        if ds is None:
            raise DataRootError(cls.root_message(cfg.root, "has neither radiology_text_reports/ nor dataset/radiology_text_reports/"))
        required = [*REPORTS.values(), *LABEL_FILES.values()]
        version = getattr(cfg, "version", "auto")
        rescale = _rescale_mode(getattr(cfg, "apply_metadata_rescale", "auto"))
        if version != "v2" or rescale == "on":
            required += list(METADATA.values())
        for rel in required:
            if not (ds / rel).is_file():
                raise DataRootError(cls.root_message(cfg.root, f"has no {rel} under {ds}"))
        folders = ["train", "valid"] if version == "v1" else ["train_fixed", "valid_fixed"] if version == "v2" else [
            "train", "valid", "train_fixed", "valid_fixed"
        ]
        if not any((ds / f).is_dir() for f in folders):
            raise DataRootError(cls.root_message(cfg.root, f"has no volume folder ({', '.join(f + '/' for f in folders)}) under {ds}"))

    @property
    def root(self) -> Path:
        ds = dataset_dir(self.cfg.root)
        if ds is None:
            self.check_root(self.cfg)
        return ds  # type: ignore[return-value]

    # ------------------------------------------------------------------ tables
    def _read_csv(self, rel: str, columns: list[str]) -> pd.DataFrame:
        """An official CSV, every cell a string (blank -> NaN), VolumeName without extension, unique."""
        from medvlp.datamodules.formats.tables import read_csv

        path = self.root / rel
        if not path.is_file():
            raise DataRootError(self.root_message(self.cfg.root, f"has no {rel}"))
        df = read_csv(path, columns)
        blank = df["VolumeName"].isna()
        if blank.any():
            raise DataError(f"{path} row {int(blank.to_numpy().argmax()) + 2} has an empty VolumeName.")
        df["VolumeName"] = df["VolumeName"].map(volume_key)
        dup = df["VolumeName"].duplicated()
        if dup.any():
            raise DataError(f"{path} lists VolumeName {df.loc[dup, 'VolumeName'].iloc[0]} more than once.")
        return df

    def reports(self, official: str) -> dict[str, tuple[Any, Any]]:
        """VolumeName -> (Findings_EN, Impressions_EN) as read (NaN for empty cells)."""
        key = f"reports:{official}"
        if key not in self._tables:
            df = self._read_csv(REPORTS[official], ["VolumeName", "Findings_EN", "Impressions_EN"])
            self._tables[key] = dict(zip(df["VolumeName"], zip(df["Findings_EN"], df["Impressions_EN"], strict=True), strict=True))
        return self._tables[key]

    def labels(self, official: str) -> dict[str, np.ndarray]:
        """VolumeName -> float32 labels (file column order), in file row order; sets ``label_names``."""
        key = f"labels:{official}"
        if key not in self._tables:
            import pandas as pd

            df = self._read_csv(LABEL_FILES[official], ["VolumeName"])
            names = [c for c in df.columns if c != "VolumeName"]
            if names != LABELS:
                log.warning("ct_rate: %s has label columns %s, not the 18 documented ones", LABEL_FILES[official], names)
            values = df[names].apply(pd.to_numeric, errors="coerce")
            bad = (values.isna() & df[names].notna()) | (values.notna() & ~values.isin([0.0, 1.0]))
            if bad.any().any():
                row = int(bad.any(axis=1).to_numpy().argmax())
                raise DataError(f"{self.root / LABEL_FILES[official]} has labels other than 0 / 1, e.g. "
                                f"{sorted(set(map(str, df[names].to_numpy()[bad.to_numpy()])))[:3]} (VolumeName {df['VolumeName'].iloc[row]}).")
            arr = np.array(values.to_numpy(dtype=np.float32), copy=True)
            self._tables[key] = dict(zip(df["VolumeName"], arr, strict=True))
            self.label_names = names
        return self._tables[key]

    def metadata(self, official: str) -> dict[str, dict[str, Any]]:
        """VolumeName -> the metadata cells this loader uses."""
        key = f"metadata:{official}"
        if key not in self._tables:
            df = self._read_csv(METADATA[official], ["VolumeName", *_META_COLUMNS])
            cols = [df[c].tolist() for c in _META_COLUMNS]
            self._tables[key] = {
                n: dict(zip(_META_COLUMNS, cells, strict=True)) for n, *cells in zip(df["VolumeName"], *cols, strict=True)
            }
        return self._tables[key]

    def volume_files(self, official: str) -> dict[str, dict[str, str]]:
        """{"v1": {name: path}, "v2": {name: path}} found by walking ``<split>/`` and ``<split>_fixed/``."""
        key = f"files:{official}"
        if key not in self._tables:
            found: dict[str, dict[str, str]] = {}
            for version, folder in (("v1", official), ("v2", f"{official}_fixed")):
                index: dict[str, str] = {}
                top = self.root / folder
                if top.is_dir():
                    for dirpath, _, files in os.walk(top):
                        for f in files:
                            if not (f.endswith(".nii.gz") or f.endswith(".nii")):
                                continue
                            name = volume_key(f)
                            if name in index:
                                raise DataError(f"Volume {name} appears twice under {top}: {index[name]} and {os.path.join(dirpath, f)}.")
                            index[name] = os.path.join(dirpath, f)
                found[version] = index
            self._tables[key] = found
        return self._tables[key]

    def holdout_patients(self) -> set[str]:
        """Patients of official train held out as ``val`` (seeded by ``data.val_seed``)."""
        if "holdout" not in self._tables:
            excluded = {volume_key(n) for n in self.cfg.exclude}
            names = [n for n in self.labels("train") if n not in excluded]
            patients = sorted({patient_of(n) for n in names}, key=lambda p: int(p.rsplit("_", 1)[1]))
            n_val = int(round(float(self.cfg.val_fraction) * len(patients)))
            if self.cfg.val_fraction > 0 and len(patients) > 1:
                n_val = min(max(n_val, 1), len(patients) - 1)
            order = np.random.default_rng(int(self.cfg.val_seed)).permutation(len(patients))
            self._tables["holdout"] = {patients[i] for i in order[:n_val]}
        return self._tables["holdout"]

    def _volume_spec(self, name: str, official: str) -> VolumeSpec:
        """Resolve file, version and (v1) metadata geometry/rescale of a volume; DataError if impossible."""
        files = self.volume_files(official)
        want = self.cfg.version
        if want == "v2" or (want == "auto" and name in files["v2"]):
            version, path = "v2", files["v2"].get(name)
        else:
            version, path = "v1", files["v1"].get(name)
        if path is None:
            folder = f"{official}_fixed" if version == "v2" else official
            raise DataError(
                f"Volume {name} is listed in {LABEL_FILES[official]} but no {name}.nii.gz exists under "
                f"{self.root / folder} (data.version={want})."
            )
        rescale = self.rescale_mode == "on" or (self.rescale_mode == "auto" and version == "v1")
        spec: dict[str, Any] = {"name": name, "path": path, "version": version, "rescale": rescale}
        if version == "v1" or rescale:
            row = self.metadata(official).get(name)
            if row is None:
                raise DataError(f"Volume {name} has no row in {self.root / METADATA[official]} (needed for its spacing and HU rescale).")
            try:
                if rescale:
                    spec["slope"] = _cell(row["RescaleSlope"], 1, "RescaleSlope")[0]
                    spec["intercept"] = _cell(row["RescaleIntercept"], 1, "RescaleIntercept")[0]
                    if spec["slope"] == 0:
                        raise ValueError(f"RescaleSlope is 0 (every voxel would get the intercept {spec['intercept']:g})")
                if version == "v1":
                    x, y = _cell(row["XYSpacing"], 2, "XYSpacing")
                    (z,) = _cell(row["ZSpacing"], 1, "ZSpacing")
                    if min(x, y, z) <= 0:
                        raise ValueError(f"spacing must be > 0 mm, got XYSpacing {row['XYSpacing']!r}, ZSpacing {row['ZSpacing']!r}")
                    spec["spacing_zyx"] = (z, y, x)
                    if not _blank(row["ImagePositionPatient"]):
                        spec["origin"] = _cell(row["ImagePositionPatient"], 3, "ImagePositionPatient")
                    if not _blank(row["ImageOrientationPatient"]):
                        spec["direction"] = _direction(_cell(row["ImageOrientationPatient"], 6, "ImageOrientationPatient"))
            except (ValueError, SyntaxError, TypeError) as err:
                raise DataError(f"{self.root / METADATA[official]}, volume {name}: {err}") from err
        return VolumeSpec(**spec)

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        """Records of ``split``: one per scan (``data.reconstructions=one``; its reconstructions as a list
        of paths) or one per reconstruction (``all``). Reports and labels are per reconstruction, as the
        CSVs give them (one row per VolumeName): each reconstruction keeps its own text and labels, and
        a draw of one reconstruction pairs it with its own report (``meta["texts"]``, ``meta["volume_labels"]``).

        A volume whose row, file or metadata is unusable is an error (``data.on_error=raise``) or is
        skipped; a reconstruction whose report has no usable text (empty or ``Not given.``) is left
        out. Either way it is listed by VolumeName in :attr:`dropped` with the reason.
        """
        if split not in OFFICIAL_SPLIT:
            raise ValueError(f"Unknown split '{split}'; expected one of {list(OFFICIAL_SPLIT)}.")
        official = OFFICIAL_SPLIT[split]
        labels = self.labels(official)
        reports = self.reports(official)
        excluded = {volume_key(n) for n in self.cfg.exclude}
        problems: list[tuple[str, str]] = []  # (VolumeName, what is wrong)

        names = [n for n in labels if n not in excluded]
        bad_names = [n for n in names if not _NAME.match(n) or not n.startswith(official + "_")]
        problems += [(n, f"{LABEL_FILES[official]} row '{n}' is not a {official} volume name") for n in bad_names]
        names = [n for n in names if n not in set(bad_names)]
        if split in ("train", "val"):
            holdout = self.holdout_patients()
            names = [n for n in names if (patient_of(n) in holdout) == (split == "val")]
        files = self.volume_files(official)
        listed = set(labels)
        for version, index in files.items():
            for n in sorted(set(index) - listed - excluded):
                problems.append((n, f"volume file {index[n]} ({version}) has no row in {LABEL_FILES[official]}"))

        specs: dict[str, VolumeSpec] = {}
        for n in names:
            if n not in reports:
                problems.append((n, f"volume {n} has no row in {REPORTS[official]}"))
                continue
            try:
                specs[n] = self._volume_spec(n, official)
            except DataError as err:
                problems.append((n, str(err)))
        if problems:
            summary = "; ".join(p for _, p in problems[:5]) + (f"; ... ({len(problems)} problems in all)" if len(problems) > 5 else "")
            if self.cfg.on_error != "skip":
                raise DataError(
                    f"CT-RATE {split} ({self.root}): {summary}. Fix the download, list broken volumes in "
                    f"data.exclude, or set data.on_error=skip to skip (and list) them."
                )
            for n, problem in problems:
                self.note_dropped(split, n, problem)
            log.warning("ct_rate %s: skipped %d volumes/rows (listed in dm.dropped / dropped.csv): %s", split,
                        len(problems), summary)

        scans: dict[str, list[str]] = {}
        for n in sorted(specs, key=parse_name):
            scans.setdefault(scan_of(n), []).append(n)
        records: list[Record] = []
        no_text: list[str] = []
        organ = self.organ_annotations() if self.cfg.text == "organ" or self.cfg.anatomy_text == "fvlm" else None
        by_anatomy = self.cfg.anatomy_text == "fvlm"
        unmentioned = 0
        mode = self.cfg.reconstructions if split == "train" or not self.cfg.eval_reconstructions else self.cfg.eval_reconstructions
        for scan, vols in scans.items():
            extra: dict[str, Any] = {}
            if by_anatomy:  # fVLM's per-anatomy texts are per scan; a scan in neither file is normal everywhere
                unmentioned += scan not in organ[0] and scan not in organ[1]
                extra["anatomy_texts"], extra["anatomy_abnormal"] = fvlm_anatomy_texts(organ[0].get(scan), organ[1].get(scan))
            if self.cfg.text == "organ":  # HLIP's organ-wise text, from fVLM's per-scan files
                if scan not in organ[0] and scan not in organ[1]:
                    for v in vols:
                        self.note_dropped(split, v, f"scan {scan} has no entry in data.organ_findings_file / "
                                                    f"data.organ_impressions_file (data.text=organ)")
                    no_text += vols
                    continue
                extra["organ_texts"] = organ_texts(organ[0].get(scan), organ[1].get(scan))
                texts = {v: " ".join(extra["organ_texts"]) for v in vols}
            else:
                texts = {}
                for v in vols:
                    text = report_text(*reports[v], self.cfg.text)
                    if text is None:
                        no_text.append(v)
                        self.note_dropped(split, v, f"{REPORTS[official]} row {v}.nii.gz: no usable {self.cfg.text} text "
                                                    f"(Findings_EN / Impressions_EN empty or 'Not given.')")
                    else:
                        texts[v] = text
            kept = [v for v in vols if v in texts]
            if not kept:
                continue
            vol_specs = [specs[v] for v in kept]
            meta = {"patient": patient_of(kept[0]), "split": split, **extra}
            if mode == "one":
                meta.update(volumes=vol_specs, texts=[texts[v] for v in kept], volume_labels=[labels[v].copy() for v in kept])
                records.append(Record(scan, [s.path for s in vol_specs], texts[kept[0]], labels[kept[0]].copy(), meta))
            else:
                for v, s in zip(kept, vol_specs, strict=True):
                    records.append(Record(scan, s.path, texts[v], labels[v].copy(), {**meta, "volumes": [s]}))
        if unmentioned:
            log.info("ct_rate %s: %d scans have no entry in %s or %s; fVLM's code (and data.anatomy_text=fvlm) reads "
                     "them as normal in every anatomy.", split, unmentioned, self.cfg.organ_findings_file,
                     self.cfg.organ_impressions_file)
        if no_text:
            shown = ", ".join(no_text[:5]) + (f", ... ({len(no_text)} in all)" if len(no_text) > 5 else "")
            log.warning("ct_rate %s: left out %d reconstruction(s) whose %s text is empty or 'Not given.' (listed in "
                        "dm.dropped / dropped.csv): %s", split, len(no_text), self.cfg.text, shown)
        log.info("ct_rate %s: %d records from %d scans", split, len(records), len({r.study_id for r in records}))
        return records

    def picked(self, record: Record, path: str, train: bool) -> dict[str, Any]:
        """The report (and labels) of the reconstruction drawn for ``record``: each reconstruction is
        paired with its own row of the reports CSV."""
        if not isinstance(record.image_path, list) or "texts" not in record.meta:
            return {}
        i = record.image_path.index(path)
        if i == 0:
            return {}
        import dataclasses

        one = dataclasses.replace(record, text=record.meta["texts"][i])
        return {"text": self.item_text(one, train), "labels": record.meta["volume_labels"][i]}

    def organ_annotations(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """fVLM's per-organ findings and impressions ``({scan: {organ: text}}, ...)`` for ``data.text=organ`` and
        ``data.anatomy_text=fvlm``."""
        out = []
        for key in ("organ_findings_file", "organ_impressions_file"):
            path = Path(getattr(self.cfg, key))
            path = path if path.is_absolute() else Path(self.cfg.root) / path
            try:
                table = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                need = "data.text=organ" if self.cfg.text == "organ" else "data.anatomy_text=fvlm"
                raise DataError(f"{need} needs data.{key} ({path} does not exist): fVLM's per-organ "
                                f"report file {{scan: {{lung|heart|esophagus|aorta: text}}}}.") from None
            except OSError as err:
                raise (os_error(path, err) or DataError(f"data.{key}: {path} could not be read: {err}")) from err
            except ValueError as err:
                raise DataError(f"data.{key}: {path} is not readable JSON: {err}") from err
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise DataError(f"data.{key}: {path} must map each scan (e.g. train_1_a) to {{organ: text}}.")
            for scan, organs in table.items():
                bad = {o: v for o, v in organs.items() if not isinstance(v, str)}
                if bad:
                    raise DataError(f"data.{key}: {path}, scan {scan}: {bad} - each organ's text must be a string.")
            out.append({volume_key(k): v for k, v in table.items()})
        return out[0], out[1]

    def item_text(self, record: Record, train: bool) -> str:
        """Organ-wise text: the four organ strings shuffled in every training draw (HLIP)."""
        parts = record.meta.get("organ_texts")
        if not train or not parts:
            return super().item_text(record, train)
        import torch

        return " ".join(parts[i] for i in torch.randperm(len(parts)).tolist())

    def volume(self, spec: VolumeSpec) -> np.ndarray:
        """Windowed, resampled, cropped volume ``[D, H, W]`` in ``[0, 1]`` (:meth:`load_volume`)."""
        return self.load_volume(spec.path, spec)

    def hu_image(self, path: str, source: Any) -> Any:
        """The volume in HU with its true geometry: read -> (v1) spacing / origin / direction from the
        metadata -> rescale (v1 by default) or a cast to float."""
        from medvlp.datamodules.formats import nifti

        spec: VolumeSpec = source
        img = nifti.read_image(spec.path, header_geometry=spec.spacing_zyx is None)
        if spec.spacing_zyx is not None or spec.origin is not None or spec.direction is not None:
            nifti.set_geometry(img, spec.spacing_zyx, spec.origin, spec.direction)
        return nifti.rescale(img, spec.slope, spec.intercept) if spec.rescale else nifti.rescale(img)

    def fix_anatomy_geometry(self, img: Any, source: Any, path: str = "") -> Any:
        """A mask stored without geometry (spacing 1, origin 0, as the v1 volumes are) gets its volume's:
        from the metadata for v1, from the volume file's header for v2."""
        import SimpleITK as sitk

        from medvlp.datamodules.formats import nifti

        spec: VolumeSpec = source
        if tuple(img.GetSpacing()) != (1.0, 1.0, 1.0) or any(img.GetOrigin()):
            return img
        if spec.spacing_zyx is not None:
            nifti.set_geometry(img, spec.spacing_zyx, spec.origin, spec.direction)
            return img
        reader = sitk.ImageFileReader()
        reader.SetFileName(spec.path)
        reader.ReadImageInformation()
        img.SetSpacing(reader.GetSpacing())
        img.SetOrigin(reader.GetOrigin())
        img.SetDirection(reader.GetDirection())
        return img

    # ------------------------------------------------------------------ preprocessed cache (medvlp preprocess)
    cache_keys: ClassVar[tuple[str, ...]] = (*VolumeDataModule.cache_keys, "version", "apply_metadata_rescale")

    def volume_settings(self) -> dict[str, Any]:
        return {**super().volume_settings(), "version": self.cfg.version, "apply_metadata_rescale": self.rescale_mode}

    def cache_source(self, record: Record) -> VolumeSpec:
        spec = next((v for v in record.meta["volumes"] if v.path == record.image_path), None)
        if spec is None:
            raise DataError(f"{record.image_path} is not a volume of scan {record.study_id}.")
        return spec


def _rescale_mode(value: Any) -> str:
    text = str(value).strip().lower()
    mapping = {"auto": "auto", "on": "on", "true": "on", "1": "on", "yes": "on", "off": "off", "false": "off", "0": "off", "no": "off"}
    if text not in mapping:
        raise ValueError(f"data.apply_metadata_rescale='{value}' is not valid; choose auto, on (true) or off (false).")
    return mapping[text]


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key}='{value}' is not valid; choose one of {', '.join(options)}.")
