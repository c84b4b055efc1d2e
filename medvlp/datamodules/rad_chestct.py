"""Rad-ChestCT (Duke, public 3,630-volume subset on Zenodo 6406114), read as distributed.

Files (``specs/datasets.md`` §9): one ``<NoteAcc_DEID>.npz`` per volume anywhere under ``data.root``
(searched recursively; archives are often unpacked into sub-folders), ``Summary_3630.csv``
(``MRN_DEID, NoteAcc_DEID, Set_Assigned, Subset_Assigned``), the abnormality x location label
files ``img{train,valid,test}_Abnormality_and_Location_Labels.csv`` (columns ``NoteAcc_DEID`` and
``<abnormality>*<location>``, 0/1 floats) and, optionally, HLIP's ``rad_chestct_labels.csv`` (the 15
CT-RATE classes).

Volumes: key ``ct``, int16 ``(slices, rows, cols)`` in HU clipped to [-1000, 1000], 0.8 mm
isotropic (implied: nothing in the file says so), slices from superior to inferior. The reader
gives them that geometry (z axis pointing inferior), so ``data.orientation`` / ``data.spacing``
then work as for CT-RATE (:mod:`medvlp.datamodules.volume`).

Labels (``data.labels``):

* ``ct_rate`` (default) - the 15 CT-RATE classes HLIP evaluates zero-shot: from
  ``data.labels_file`` (default ``<root>/rad_chestct_labels.csv``) when it exists, else derived from
  the abnormality x location files with HLIP's mapping (``calcification`` feeds both the coronary
  and the arterial wall calcification classes, so those two columns are identical);
* ``abnormality`` - the 84 abnormalities, each the maximum over its locations.

Splits: ``train`` = ``Set_Assigned`` starting with ``imgtrain``, ``val`` = ``imgvalid``, ``test`` =
``imgtest``. There are no reports: records carry an empty text (zero-shot evaluation; prompts from
``configs/prompts/ct_rate.yaml``).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.errors import os_error
from medvlp.datamodules.volume import VolumeConfig, VolumeDataModule
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

SUMMARY = "Summary_3630.csv"
ABNORMALITY_FILES = {"train": "imgtrain_Abnormality_and_Location_Labels.csv",
                     "val": "imgvalid_Abnormality_and_Location_Labels.csv",
                     "test": "imgtest_Abnormality_and_Location_Labels.csv"}
HLIP_LABELS_FILE = "rad_chestct_labels.csv"
SET_PREFIX = {"train": "imgtrain", "val": "imgvalid", "test": "imgtest"}
SPACING_MM = 0.8
# HLIP's mapping of Rad-ChestCT abnormalities to the CT-RATE classes it evaluates, in its column order.
CT_RATE_CLASSES: list[tuple[str, str]] = [
    ("Emphysema", "emphysema"), ("Atelectasis", "atelectasis"), ("Lung nodule", "nodule"),
    ("Lung opacity", "opacity"), ("Pulmonary fibrotic sequela", "fibrosis"), ("Pleural effusion", "pleural_effusion"),
    ("Peribronchial thickening", "bronchial_wall_thickening"), ("Consolidation", "consolidation"),
    ("Bronchiectasis", "bronchiectasis"), ("Interlobular septal thickening", "septal_thickening"),
    ("Cardiomegaly", "cardiomegaly"), ("Pericardial effusion", "pericardial_effusion"), ("Hiatal hernia", "hernia"),
    ("Coronary artery wall calcification", "calcification"), ("Arterial wall calcification", "calcification"),
]
LABEL_SOURCES = ("ct_rate", "abnormality")
_ID = re.compile(r"^(trn|val|tst)\d{5}$")


@dataclass
class RadChestCTConfig(VolumeConfig):
    """``data.*`` keys of the Rad-ChestCT datamodule (``configs/data/rad_chestct.yaml``)."""

    name: str = "rad_chestct"
    labels: str = "ct_rate"  # ct_rate (HLIP's 15 classes) | abnormality (84, max over locations)
    labels_file: str = ""  # the 15-class CSV; "" = <root>/rad_chestct_labels.csv if present, else derived
    batch_size: int = 16
    eval_batch_size: int = 16


@register_datamodule("rad_chestct")
class RadChestCTDataModule(VolumeDataModule):
    """Rad-ChestCT volumes with abnormality labels (no reports): zero-shot evaluation of CT models."""

    Config = RadChestCTConfig
    default_prompts = "ct_rate.yaml"
    EXPECTED_LAYOUT = """\
  <root>/Summary_3630.csv                                  MRN_DEID, NoteAcc_DEID, Set_Assigned, Subset_Assigned
  <root>/imgtrain_Abnormality_and_Location_Labels.csv      NoteAcc_DEID, <abnormality>*<location>, ...
  <root>/imgvalid_Abnormality_and_Location_Labels.csv
  <root>/imgtest_Abnormality_and_Location_Labels.csv
  <root>/rad_chestct_labels.csv                            (optional: HLIP's 15-class labels)
  <root>/**/<NoteAcc_DEID>.npz                             key 'ct': int16 HU (slices, rows, cols), 0.8 mm
"""

    def __init__(self, cfg: RadChestCTConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if cfg.labels not in LABEL_SOURCES:
            raise ValueError(f"data.labels='{cfg.labels}' is not valid; choose one of {list(LABEL_SOURCES)}.")
        self._tables: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.label_names = [c for c, _ in CT_RATE_CLASSES] if cfg.labels == "ct_rate" else []

    # ------------------------------------------------------------------ layout
    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        for rel in (SUMMARY, *ABNORMALITY_FILES.values()):
            if not (root / rel).is_file():
                if rel != SUMMARY and getattr(cfg, "labels", "ct_rate") == "ct_rate" and cls._labels_path(cfg).is_file():
                    continue  # the 15-class file replaces the abnormality files
                raise DataRootError(cls.root_message(cfg.root, f"has no {rel}"))

    @staticmethod
    def _labels_path(cfg: Any) -> Path:
        return Path(cfg.labels_file) if getattr(cfg, "labels_file", "") else Path(cfg.root) / HLIP_LABELS_FILE

    def _csv(self, path: Path, required: list[str]) -> Any:
        from medvlp.datamodules.formats.tables import read_csv

        return read_csv(path, required, strings=False, dtype={"NoteAcc_DEID": str, "MRN_DEID": str})

    def summary(self) -> Any:
        if "summary" not in self._tables:
            self._tables["summary"] = self._csv(Path(self.cfg.root) / SUMMARY,
                                                ["NoteAcc_DEID", "MRN_DEID", "Set_Assigned"])
        return self._tables["summary"]

    def volume_files(self) -> dict[str, str]:
        """``{NoteAcc_DEID: path}`` of every ``*.npz`` under the root; a duplicated id is an error."""
        if "files" not in self._tables:
            files: dict[str, str] = {}
            dupes: list[str] = []
            for dirpath, _, names in os.walk(self.cfg.root):
                for n in names:
                    if n.endswith(".npz"):
                        key = n[:-4]
                        if key in files:
                            dupes.append(f"{files[key]} and {os.path.join(dirpath, n)}")
                        files[key] = os.path.join(dirpath, n)
            if dupes:
                raise DataError(f"Rad-ChestCT: {len(dupes)} volume ids occur twice under {self.cfg.root} "
                                f"(first: {dupes[0]}); keep one copy of each.")
            self._tables["files"] = files
        return self._tables["files"]

    def label_table(self) -> dict[str, np.ndarray]:
        """``{NoteAcc_DEID: float32 labels}`` in ``label_names`` order (every split)."""
        if "labels" in self._tables:
            return self._tables["labels"]
        cfg = self.cfg
        table: dict[str, np.ndarray] = {}
        path = self._labels_path(cfg)
        if cfg.labels == "ct_rate" and path.is_file():
            names = [c for c, _ in CT_RATE_CLASSES]
            df = self._csv(path, ["NoteAcc_DEID", *names])
            values = df[names].to_numpy(dtype=np.float32)
            for acc, row in zip(df["NoteAcc_DEID"].astype(str), values, strict=True):
                table[acc] = row.copy()
        else:
            frames = [self._csv(Path(cfg.root) / f, ["NoteAcc_DEID"]) for f in ABNORMALITY_FILES.values()]
            abnormalities: list[str] = []
            for df in frames:
                for col in df.columns[1:]:
                    name = str(col).split("*")[0]
                    if name not in abnormalities:
                        abnormalities.append(name)
            abnormalities.sort()
            if cfg.labels == "abnormality":
                self.label_names = abnormalities
            for df in frames:
                cols = {a: [c for c in df.columns[1:] if str(c).split("*")[0] == a] for a in abnormalities}
                values = df[list(df.columns[1:])].astype(float)
                per = {a: (values[c].max(axis=1).to_numpy() if c else np.zeros(len(df))) for a, c in cols.items()}
                for i, acc in enumerate(df["NoteAcc_DEID"].astype(str)):
                    if cfg.labels == "abnormality":
                        table[acc] = np.asarray([per[a][i] for a in abnormalities], np.float32)
                    else:
                        table[acc] = np.asarray([per.get(src, np.zeros(len(df)))[i] for _, src in CT_RATE_CLASSES],
                                                np.float32)
        self._tables["labels"] = table
        return table

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in SET_PREFIX:
            raise ValueError(f"Unknown split '{split}'; expected one of {list(SET_PREFIX)}.")
        summary = self.summary()
        rows = summary[summary["Set_Assigned"].astype(str).str.startswith(SET_PREFIX[split])]
        files, labels = self.volume_files(), self.label_table()
        problems: list[str] = []
        dropped: list[tuple[str, str]] = []
        records: list[Record] = []
        for acc, mrn in zip(rows["NoteAcc_DEID"].astype(str), rows["MRN_DEID"].astype(str), strict=True):
            if not _ID.match(acc):
                dropped.append((acc, f"{SUMMARY} row '{acc}' is not a NoteAcc_DEID (trn|val|tst + 5 digits)"))
            elif acc not in files:
                dropped.append((acc, f"{acc} is listed in {SUMMARY} but no {acc}.npz exists under {self.cfg.root}"))
            elif acc not in labels:
                dropped.append((acc, f"{acc} has no label row"))
            else:
                records.append(Record(acc, files[acc], "", labels[acc].copy(), {"patient": mrn, "split": split}))
        problems += [why for _, why in dropped]
        listed = set(summary["NoteAcc_DEID"].astype(str))
        unlisted = sorted(set(files) - listed)
        if unlisted and split == "train":
            problems.append(f"{len(unlisted)} .npz files have no row in {SUMMARY} (first: {files[unlisted[0]]})")
            dropped += [(u, f"{files[u]} has no row in {SUMMARY}") for u in unlisted]
        if problems:
            self.counts[split] = len(problems)
            text = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems in all)" if len(problems) > 5 else "")
            if self.cfg.on_error != "skip":
                raise DataError(f"Rad-ChestCT {split} ({self.cfg.root}): {text}. Set data.on_error=skip to skip (and "
                                f"count) them.")
            for acc, why in dropped:
                self.note_dropped(split, acc, why)
            log.warning("rad_chestct %s: skipped %d volumes/rows: %s", split, len(problems), text)
        log.info("rad_chestct %s: %d volumes", split, len(records))
        return records

    def hu_image(self, path: str, source: Any) -> Any:
        """The ``ct`` array as an image: 0.8 mm isotropic, rows toward posterior, columns toward the
        patient's left, slices from superior to inferior (so the z direction is -1)."""
        import SimpleITK as sitk

        try:
            with np.load(path, allow_pickle=False) as npz:
                if "ct" not in npz.files:
                    raise DataError(f"{path} has no array 'ct' (keys: {npz.files}); a Rad-ChestCT .npz holds 'ct'.")
                ct = npz["ct"]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            named = os_error(path, err) if isinstance(err, OSError) else None
            raise (named or DataError(f"{path} is not a readable .npz ({type(err).__name__}: {err}); re-download it.")) from err
        if ct.ndim != 3:
            raise DataError(f"{path}: 'ct' has shape {ct.shape}; expected (slices, rows, cols).")
        if ct.dtype != np.int16:  # Rad-ChestCT stores int16 HU; anything else must convert exactly
            from medvlp.datamodules.formats.nifti import check_finite

            check_finite(ct, path)
            lo, hi = float(ct.min()), float(ct.max())
            if lo < -32768 or hi > 32767 or (ct.dtype.kind == "f" and not np.array_equal(ct, np.rint(ct))):
                raise DataError(f"{path}: 'ct' is {ct.dtype} with values from {lo:g} to {hi:g}; expected whole HU "
                                f"numbers in the int16 range (Rad-ChestCT stores int16 HU).")
        img = sitk.GetImageFromArray(np.ascontiguousarray(ct).astype(np.int16, copy=False))
        img.SetSpacing((SPACING_MM, SPACING_MM, SPACING_MM))
        img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
        return img

    def volume_settings(self) -> dict[str, Any]:
        return {**super().volume_settings(), "implied_spacing_mm": SPACING_MM, "slice_order": "superior_to_inferior"}

    def fix_anatomy_geometry(self, img: Any, source: Any, path: str = "") -> Any:
        """An anatomy map segmented from the ``.npz`` array (the same array shape; a conversion to NIfTI
        for TotalSegmentator keeps no trustworthy geometry) gets the volume's implied geometry: 0.8 mm,
        slices from superior to inferior. A map of another shape is a clear error."""
        import SimpleITK as sitk

        shape = npz_shape(path) if path else None
        got = tuple(sitk.GetArrayViewFromImage(img).shape)
        if shape is not None and got != shape:
            raise DataError(f"The anatomy mask of {path} has shape {got} (slices, rows, cols); its 'ct' array has "
                            f"{shape}. Segment the .npz array itself (as a NIfTI of the same shape).")
        img.SetSpacing((SPACING_MM, SPACING_MM, SPACING_MM))
        img.SetOrigin((0.0, 0.0, 0.0))
        img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
        return img


def npz_shape(path: str) -> tuple[int, ...] | None:
    """The shape of the ``ct`` array of a Rad-ChestCT ``.npz`` from its header alone (None if unreadable)."""
    try:
        with zipfile.ZipFile(path) as z, z.open("ct.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(int(v) for v in reader(f)[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


__all__ = ["RadChestCTConfig", "RadChestCTDataModule", "CT_RATE_CLASSES"]
