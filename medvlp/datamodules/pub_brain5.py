"""Pub-Brain-5, HLIP's brain-MRI zero-shot benchmark: studies of several series, five classes.

Files (``specs/datasets.md`` §12): HLIP's study lists ``pub_brain_5.csv`` (18,343 studies) and
``pub_brain_5_gt.csv`` (8,944) with columns ``study,Normal,Stroke,Glioma,Meningioma,Metastasis``
(one-hot), where ``study`` is an absolute path under ``/data/pub_brain_5``; that prefix
(``data.path_prefix``) is rewritten to ``data.root``. Each study folder holds one ``.pt`` tensor per
series (``D, H, W`` in [0, 1], RPI, ``D`` = the through-plane axis); a few are 4-D (DWI pairs),
of which the first volume (``[..., 0]``) is kept, as HLIP does.

Per series (HLIP's evaluation pipeline): pad ``H, W`` to a square (centred, zeros), bilinear resize
to ``data.resize`` (256), nearest resize of ``D`` to ``data.num_slices`` (144), centre crop
``data.image_size`` (224), ``(x - mean) / std``. A study is the stack of its series
``[S, 1, D, H, W]``; batches pad ``S`` and carry ``scan_mask`` (``VLPDataModule.multi_scan``).
``data.max_scans`` > 0 keeps at most that many series (a random subset in training, the first ones
by name at evaluation).

Empty study folders are skipped (as HLIP does), counted and reported; a listed folder that does
not exist is an error under ``data.on_error=raise``. Every study is in the ``test`` split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record, VLPDataModule
from medvlp.datamodules.errors import os_error
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

CLASSES = ["Normal", "Stroke", "Glioma", "Meningioma", "Metastasis"]
LISTS = {"all": "pub_brain_5.csv", "gt": "pub_brain_5_gt.csv"}


@dataclass
class PubBrain5Config(DataConfig):
    """``data.*`` keys of the Pub-Brain-5 datamodule (``configs/data/pub_brain5.yaml``)."""

    name: str = "pub_brain5"
    subset: str = "all"  # all (pub_brain_5.csv) | gt (pub_brain_5_gt.csv)
    list_file: str = ""  # the study list; "" = <root>/<the subset's file>
    path_prefix: str = "/data/pub_brain_5"  # prefix of the listed study paths, replaced by data.root
    num_slices: int = bounded(144, gt=0)  # through-plane size after nearest resizing (HLIP at test time)
    resize: int = bounded(256, gt=0)  # in-plane size after padding to a square
    image_size: int = bounded(224, gt=0)  # centre crop
    mean: float = 0.449
    std: float = bounded(0.226, gt=0)
    max_scans: int = bounded(0, ge=0)  # > 0: at most this many series per study
    batch_size: int = 4
    eval_batch_size: int = 4
    max_length: int = 64


@register_datamodule("pub_brain5")
class PubBrain5DataModule(VLPDataModule):
    """Pub-Brain-5 studies (several MRI series each) with one-hot diagnoses (evaluation)."""

    Config = PubBrain5Config
    modality = "3d"
    multi_scan = True
    label_names = list(CLASSES)
    EXPECTED_LAYOUT = """\
  <root>/pub_brain_5.csv, pub_brain_5_gt.csv      study,Normal,Stroke,Glioma,Meningioma,Metastasis
  <root>/<source>/.../<study>/<series>.pt         float (D, H, W) in [0, 1] (or 4-D: [..., 0] is used)
"""

    def __init__(self, cfg: PubBrain5Config, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if cfg.subset not in LISTS:
            raise ValueError(f"data.subset='{cfg.subset}' is not valid; choose one of {list(LISTS)}.")
        for key in ("num_slices", "resize", "image_size"):
            if int(getattr(cfg, key)) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(cfg, key)}.")
        if int(cfg.image_size) > int(cfg.resize):
            raise ValueError(f"data.image_size={cfg.image_size} must not exceed data.resize={cfg.resize}.")
        self.counts: dict[str, int] = {}

    @classmethod
    def list_path(cls, cfg: Any) -> Path:
        return Path(cfg.list_file) if cfg.list_file else Path(cfg.root) / LISTS[cfg.subset]

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        if not cls.list_path(cfg).is_file():
            raise DataRootError(cls.root_message(cfg.root, f"has no study list {cls.list_path(cfg)}"))

    def study_folder(self, listed: str) -> Path:
        prefix = str(self.cfg.path_prefix).rstrip("/")
        listed = str(listed).strip()
        if prefix and (listed == prefix or listed.startswith(prefix + "/")):
            return Path(self.cfg.root) / listed[len(prefix) :].lstrip("/")
        path = Path(listed)
        return path if path.is_absolute() else Path(self.cfg.root) / path

    def build_records(self, split: str) -> list[Record]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split '{split}'; expected train, val or test.")
        if split != "test":
            return []
        from medvlp.datamodules.formats.tables import read_csv

        path = self.list_path(self.cfg)
        df = read_csv(path, ["study", *CLASSES], strings=False, dtype={"study": str})
        problems, empty, records = [], [], []
        for row in df.itertuples(index=False):
            folder = self.study_folder(row.study)
            if not folder.is_dir():
                problems.append(f"study {row.study} -> {folder} does not exist")
                self.note_dropped(split, str(row.study), f"{folder} (listed in {path}) does not exist")
                continue
            series = sorted(str(p) for p in folder.iterdir() if p.suffix == ".pt")
            if not series:
                empty.append(str(folder))
                self.note_dropped(split, str(row.study), f"{folder} holds no .pt series (skipped, as HLIP does)")
                continue
            labels = np.asarray([float(getattr(row, c)) for c in CLASSES], np.float32)
            records.append(Record(folder.name, series, "", labels, {"study": str(row.study)}))
        if empty:
            self.counts["empty_studies"] = len(empty)
            log.warning("pub_brain5: skipped %d listed study folders without .pt series (as HLIP does; first: %s)",
                        len(empty), empty[0])
        if problems:
            self.counts["missing_studies"] = len(problems)
            text = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            if self.cfg.on_error != "skip":
                raise DataError(f"Pub-Brain-5 ({path}): {text}. Check data.root / data.path_prefix, or set "
                                f"data.on_error=skip to skip (and count) them.")
            log.warning("pub_brain5: skipped %d studies: %s", len(problems), text)
        return records

    # ------------------------------------------------------------------ pixels
    def load_series(self, path: str) -> Any:
        """One series as ``[1, num_slices, image_size, image_size]`` (HLIP's evaluation pipeline)."""
        from medvlp.datamodules.transforms import square_resize_crop

        cfg = self.cfg
        t = read_series_tensor(path)
        t = square_resize_crop(t, int(cfg.num_slices), int(cfg.resize), int(cfg.image_size), "nearest")
        return ((t - float(cfg.mean)) / float(cfg.std))[None].contiguous()

    def load_image(self, record: Record, train: bool) -> Any:
        import torch

        paths = list(record.image_path)
        k = int(self.cfg.max_scans)
        if 0 < k < len(paths):
            if train:
                keep = sorted(torch.randperm(len(paths))[:k].tolist())
                paths = [paths[i] for i in keep]
            else:
                paths = paths[:k]
        return torch.stack([self.load_series(p) for p in paths])


def read_series_tensor(path: str) -> Any:
    """A ``.pt`` series as a ``(D, H, W)`` tensor; of a 4-D one (e.g. a DWI pair) the first volume of the
    last axis, as HLIP keeps. A DataError names the file when it is not such a tensor."""
    import torch

    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        named = os_error(path, err) if isinstance(err, OSError) else None
        raise (named or DataError(f"{path} is not a readable tensor file ({type(err).__name__}: {err}).")) from err
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{path} holds a {type(t).__name__}, not a tensor (D, H, W).")
    if t.ndim == 4:
        t = t[..., 0]
    if t.ndim != 3 or min(t.shape) < 1:
        raise DataError(f"{path}: tensor of shape {tuple(t.shape)}; expected (D, H, W) or (D, H, W, k).")
    if t.is_floating_point() or t.is_complex():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            first = tuple(int(i) for i in torch.nonzero(~finite)[0])
            raise DataError(f"{path}: {int((~finite).sum())} non-finite value(s) (NaN or inf; the first at (d, h, w) = "
                            f"{first}); expected finite intensities. Re-export the series.")
    return t


__all__ = ["PubBrain5Config", "PubBrain5DataModule", "CLASSES", "read_series_tensor"]
