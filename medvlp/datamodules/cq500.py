"""CQ500 head CT (Qure.ai), read as distributed: DICOM series per scan plus the three radiologists' reads.

Layout (``specs/datasets.md`` §10): each ``CQ500-CT-<n>.zip`` extracts to
``CQ500-CT-<n>/CQ500CT<n> CQ500CT<n>/Unknown Study/<series description>/CT*.dcm`` (spaces in the
names; the inner folder name differs from the ``name`` in ``reads.csv``). ``reads.csv`` at the root:
``name, Category`` and 14 findings for each of three readers (``R1:ICH`` ... ``R3:MidlineShift``);
the label of a finding is the majority vote of the three readers.

Scans are found by either folder name (``CQ500-CT-<n>`` or ``CQ500CT<n> CQ500CT<n>``), so a tree
extracted without its outer folder reads too. Each series folder is read with
:func:`~medvlp.datamodules.formats.dicom_series.read_series` (slices ordered by position, missing /
duplicated slices and inconsistent spacing named). ``data.series`` picks the series of a scan:
``thinnest`` (smallest slice thickness; the first by name on ties), ``all`` (one drawn at random in
training, the first at evaluation) or a case-insensitive substring of the series folder name (e.g.
``plain``; a scan without a match is an error under ``data.on_error=raise``).

CQ500 is an evaluation set (no reports, no official split): every scan is in ``test``; ``train``
and ``val`` are empty. The HU sanity check of chest CT does not apply to heads (off by default).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.volume import VolumeConfig, VolumeDataModule
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

READS = "reads.csv"
FINDINGS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
            "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift"]
READERS = ("R1", "R2", "R3")
_OUTER = re.compile(r"^CQ500-CT-(\d+)$")
_INNER = re.compile(r"^CQ500CT(\d+) CQ500CT\d+$")


@dataclass
class CQ500Config(VolumeConfig):
    """``data.*`` keys of the CQ500 datamodule (``configs/data/cq500.yaml``)."""

    name: str = "cq500"
    series: str = "thinnest"  # thinnest | all | a substring of the series folder name (case-insensitive)
    spacing_tolerance: float = bounded(0.1, gt=0)  # relative deviation of a slice step from the median that is an error
    hu_sanity_check: bool = False  # the chest-CT air/lung check does not apply to heads
    spacing: list[float] = bounded(default_factory=lambda: [5.0, 1.0, 1.0], gt=0, each=True)
    size: list[int] = bounded(default_factory=lambda: [32, 224, 224], gt=0, each=True)
    window: list[float] = field(default_factory=lambda: [0.0, 80.0])  # brain window (centre 40, width 80)
    batch_size: int = 8
    eval_batch_size: int = 8


@register_datamodule("cq500")
class CQ500DataModule(VolumeDataModule):
    """CQ500 head CT scans with the majority read of 14 findings (evaluation only)."""

    Config = CQ500Config
    label_names = list(FINDINGS)
    EXPECTED_LAYOUT = """\
  <root>/reads.csv                                            name, Category, R1:ICH, ..., R3:MidlineShift
  <root>/CQ500-CT-<n>/CQ500CT<n> CQ500CT<n>/Unknown Study/<series>/CT000000.dcm ...   (the zips, extracted)
"""

    def __init__(self, cfg: CQ500Config, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if not str(cfg.series).strip():
            raise ValueError("data.series must be 'thinnest', 'all' or a substring of the series folder names.")
        self.counts: dict[str, int] = {}
        self._scans: dict[str, list[str]] | None = None

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        cls.require(cfg, files=(READS,))
        zips = list(Path(cfg.root).glob("CQ500-CT-*.zip"))
        if zips and not any(p.is_dir() for p in Path(cfg.root).iterdir() if _OUTER.match(p.name) or _INNER.match(p.name)):
            raise DataRootError(cls.root_message(cfg.root, f"holds {len(zips)} CQ500-CT-*.zip files but no extracted scan "
                                                           f"folders; unzip them in place"))

    # ------------------------------------------------------------------ layout
    def scans(self) -> dict[str, list[str]]:
        """``{"CQ500-CT-<n>": [series folders, sorted by name]}`` of every scan under the root."""
        if self._scans is None:
            found: dict[str, list[str]] = {}
            for dirpath, _, filenames in os.walk(self.cfg.root):
                if not any(f.lower().endswith(".dcm") for f in filenames):
                    continue
                parts = Path(dirpath).relative_to(self.cfg.root).parts
                n = next((m.group(1) for p in parts for m in [_OUTER.match(p) or _INNER.match(p)] if m), None)
                if n is None:
                    continue
                found.setdefault(f"CQ500-CT-{int(n)}", []).append(dirpath)
            self._scans = {k: sorted(v) for k, v in found.items()}
        return self._scans

    def reads(self) -> dict[str, np.ndarray]:
        """``{name: majority label per finding}`` from ``reads.csv``."""
        import pandas as pd

        from medvlp.datamodules.formats.tables import missing_columns_message, read_csv

        path = Path(self.cfg.root) / READS
        df = read_csv(path, strings=False)
        columns = ["name"] + [f"{r}:{f}" for r in READERS for f in FINDINGS]
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(missing_columns_message(path, missing[:4], list(df.columns)).rstrip(".")
                            + f"{' ...' if len(missing) > 4 else ''}; expected name, Category and R1..R3 x "
                              f"{len(FINDINGS)} findings.")
        reads = df[columns[1:]].apply(pd.to_numeric, errors="coerce")
        bad = (reads.isna() & df[columns[1:]].notna()) | (reads.notna() & ~reads.isin([0, 1]))
        if bad.any().any() or reads.isna().any().any():
            row = int((bad | reads.isna()).any(axis=1).to_numpy().argmax())
            raise DataError(f"{path} row {row + 2} ({df['name'].iloc[row]}): every R1..R3 finding must be 0 or 1, "
                            f"got {sorted(map(str, df[columns[1:]].iloc[row][(bad | reads.isna()).iloc[row]]))[:3]}.")
        df[columns[1:]] = reads
        votes = np.stack([df[[f"{r}:{f}" for f in FINDINGS]].to_numpy(dtype=np.float32) for r in READERS])
        majority = (votes.sum(axis=0) >= 2).astype(np.float32)
        return {str(n).strip(): row for n, row in zip(df["name"], majority, strict=True)}

    def _pick(self, name: str, folders: list[str]) -> list[str]:
        mode = str(self.cfg.series).strip()
        if mode == "all":
            return folders
        if mode == "thinnest":
            from medvlp.datamodules.formats.dicom_series import dicom_files, read_header

            def thickness(folder: str) -> float:
                first = read_header(dicom_files(folder)[0])
                return first.thickness if first.thickness is not None else float("inf")

            return [min(folders, key=lambda f: (thickness(f), Path(f).name))]
        picked = [f for f in folders if mode.lower() in Path(f).name.lower()]
        if not picked:
            raise DataError(f"CQ500 scan {name} has no series matching data.series='{mode}' "
                            f"(its series: {', '.join(Path(f).name for f in folders)}).")
        return picked

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split '{split}'; expected train, val or test.")
        if split != "test":
            return []  # evaluation set: every scan is in test
        labels, scans = self.reads(), self.scans()
        problems: list[str] = []
        dropped: list[tuple[str, str]] = []
        records: list[Record] = []
        for name in sorted(labels, key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else 0):
            folders = scans.get(name)
            if not folders:
                problems.append(f"{name} is in {READS} but no extracted scan folder ({name}/ or "
                                f"CQ500CT<n> CQ500CT<n>/) under {self.cfg.root} holds its DICOMs")
                dropped.append((name, problems[-1]))
                continue
            try:
                chosen = self._pick(name, folders)
            except DataError as err:
                problems.append(str(err))
                dropped.append((name, problems[-1]))
                continue
            records.append(Record(name, chosen if len(chosen) > 1 else chosen[0], "", labels[name].copy(),
                                  {"series": [Path(f).name for f in chosen]}))
        unlisted = sorted(set(scans) - set(labels))
        if unlisted:
            problems.append(f"{len(unlisted)} scan folders have no row in {READS} (first: {unlisted[0]})")
            dropped += [(u, f"scan folder(s) {', '.join(scans[u])} have no row in {READS}") for u in unlisted]
        if problems:
            self.counts[split] = len(problems)
            text = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems in all)" if len(problems) > 5 else "")
            if self.cfg.on_error != "skip":
                raise DataError(f"CQ500 ({self.cfg.root}): {text}. Set data.on_error=skip to skip (and count) them.")
            for name, why in dropped:
                self.note_dropped(split, name, why)
            log.warning("cq500: skipped %d scans/rows: %s", len(problems), text)
        return records

    def hu_image(self, path: str, source: Any) -> Any:
        from medvlp.datamodules.formats.dicom_series import read_series

        return read_series(path, float(self.cfg.spacing_tolerance))

    def volume_settings(self) -> dict[str, Any]:
        return {**super().volume_settings(), "spacing_tolerance": float(self.cfg.spacing_tolerance)}


__all__ = ["CQ500Config", "CQ500DataModule", "FINDINGS"]
