"""Multi-series brain-MRI (and head-CT) studies with reports, in HLIP's study-JSON layout.

Files (``specs/datasets.md`` §12.4; HLIP's BrainMRI220K / HeadCT240K loaders): one JSON index per
split, ``{"<study>": {"series": {"<series>": {"num_slices": D, "view": "axial"|"sagittal"|"coronal"}},
"report_length": n, "report": [sentence, ...]}}``, and one tensor per series at
``<root>/<study>/<series>/img.pt`` - ``(D, H, W)`` uint8-range values (divided by ``data.scale``),
through-plane axis first. An optional ``data.labels_file`` (``study,<label>,...`` with 0/1 cells;
the synthetic world writes ``labels.csv``) attaches labels for zero-shot evaluation.

Per series (HLIP, ``specs/methods/hlip.md`` §3.3): ``/ scale`` -> zero-pad ``H, W`` to a square ->
bilinear resize to ``data.resize`` -> resize ``D`` to ``data.num_slices`` (``nearest-exact``; at
evaluation ``data.eval_num_slices`` when set, e.g. 144) -> centre crop ``data.image_size`` ->
``(x - mean) / std``. A study is the stack ``[S, 1, D, H, W]`` of its series.

Scans per study (``data.scan_sampling``, §3.5):

* ``repeat`` (HLIP): in training the series list is shuffled, repeated when shorter than
  ``data.num_scans`` and cut to exactly ``num_scans``, so every study of a batch has the same ``S``;
* ``pad``: in training the shuffled list is cut to at most ``num_scans`` (0 = all); batches pad ``S``
  and carry ``scan_mask`` ``[B, S]``.

At evaluation every series is used in index order (at most ``data.eval_max_scans`` when > 0), and
batches are padded with ``scan_mask``. Text (§3.6): ``data.text_prefix`` + the report sentences -
shuffled in training (``data.report_mode=report``), or one random sentence (``sentence``);
evaluation keeps the index order. Studies with an empty report are skipped and counted.

Checked when the index is read: malformed JSON / entries (the file and study are named), listed
series without ``img.pt`` (an error, or with ``data.on_error=skip`` dropped and counted), studies
without any series, and study folders under the root that no index lists (counted, reported).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import (
    DataConfig,
    DataError,
    DataRootError,
    Record,
    VLPDataModule,
    stable_fraction,
)
from medvlp.datamodules.errors import os_error
from medvlp.registry import register_datamodule

log = logging.getLogger(__name__)

SCAN_SAMPLING = ("repeat", "pad")
REPORT_MODES = ("report", "sentence")
SPLIT_FILES = {"train": "train_file", "val": "val_file", "test": "test_file"}


@dataclass
class BrainMRIConfig(DataConfig):
    """``data.*`` keys of the study-JSON datamodules (``configs/data/brain_mri.yaml``, ``head_ct.yaml``)."""

    name: str = "brain_mri"
    train_file: str = "train.json"  # study index per split, relative to data.root (or absolute)
    val_file: str = "valid.json"  # the test studies when test_file is ""; absent: drawn from train
    test_file: str = ""  # "" = val_file's studies test, and data.val_fraction of the train studies validate
    val_fraction: float = bounded(0.05, ge=0, lt=1)
    labels_file: str = "labels.csv"  # optional study,<label>,... CSV (0/1); absent file = no labels
    text_prefix: str = "This MRI study shows: "
    report_mode: str = "report"  # report (all sentences, shuffled in training) | sentence (one, in training)
    scale: float = bounded(255.0, gt=0)  # stored values / scale -> [0, 1]
    num_slices: int = bounded(48, gt=0)  # through-plane size after resizing (training)
    eval_num_slices: int = bounded(0, ge=0)  # at evaluation; 0 = num_slices (HLIP evaluates at 144)
    slice_mode: str = "nearest-exact"  # interpolation of the through-plane resize
    resize: int = bounded(256, gt=0)  # in-plane size after padding to a square
    image_size: int = bounded(224, gt=0)  # centre crop
    mean: float = 0.449
    std: float = bounded(0.226, gt=0)
    num_scans: int = bounded(10, ge=0)  # scans per study in training (repeat: exactly; pad: at most, 0 = all)
    scan_sampling: str = "repeat"  # repeat (HLIP: shuffle, repeat, truncate) | pad (scan_mask in the batch)
    eval_max_scans: int = bounded(0, ge=0)  # > 0: at most this many series per study at evaluation
    batch_size: int = 8
    eval_batch_size: int = 8
    max_length: int = 256


@register_datamodule("brain_mri")
class BrainMRIDataModule(VLPDataModule):
    """Brain-MRI studies (several series each) with report sentences, in HLIP's layout."""

    Config = BrainMRIConfig
    modality = "3d"
    multi_scan = True
    demo_kind = "brain_mri"
    default_prompts = "brain_mri.yaml"
    EXPECTED_LAYOUT = """\
  <root>/train.json, valid.json        {"<study>": {"series": {"<series>": {"num_slices": D, "view": ...}},
                                                     "report_length": n, "report": [sentence, ...]}}
  <root>/<study>/<series>/img.pt       tensor (D, H, W), uint8-range values, through-plane axis first
  <root>/labels.csv (optional)         study,<label>,... (0/1)
"""

    def __init__(self, cfg: BrainMRIConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        if cfg.scan_sampling not in SCAN_SAMPLING:
            raise ValueError(f"data.scan_sampling='{cfg.scan_sampling}' is not valid; choose one of {list(SCAN_SAMPLING)}.")
        if cfg.report_mode not in REPORT_MODES:
            raise ValueError(f"data.report_mode='{cfg.report_mode}' is not valid; choose one of {list(REPORT_MODES)}.")
        for key in ("num_slices", "resize", "image_size"):
            if int(getattr(cfg, key)) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(cfg, key)}.")
        if int(cfg.image_size) > int(cfg.resize):
            raise ValueError(f"data.image_size={cfg.image_size} must not exceed data.resize={cfg.resize}.")
        if cfg.scan_sampling == "repeat" and int(cfg.num_scans) < 1:
            raise ValueError("data.scan_sampling=repeat needs data.num_scans >= 1 (the fixed number of scans per study).")
        if min(int(cfg.num_scans), int(cfg.eval_max_scans), int(cfg.eval_num_slices)) < 0:
            raise ValueError("data.num_scans, data.eval_max_scans and data.eval_num_slices must be >= 0.")
        if float(cfg.scale) <= 0 or float(cfg.std) <= 0 or not 0.0 <= float(cfg.val_fraction) < 1.0:
            raise ValueError(f"data.scale and data.std must be > 0 and data.val_fraction in [0, 1), got "
                             f"{cfg.scale}, {cfg.std}, {cfg.val_fraction}.")
        if cfg.slice_mode not in ("nearest", "nearest-exact", "linear"):
            raise ValueError(f"data.slice_mode='{cfg.slice_mode}': choose nearest, nearest-exact or linear.")
        self.counts: dict[str, int] = {}
        self._labels: dict[str, np.ndarray] | None = None
        self.label_names = self._label_header()

    # ------------------------------------------------------------------ files
    def _path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else Path(self.cfg.root) / p

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        train = Path(cfg.train_file)
        if not (train if train.is_absolute() else Path(cfg.root) / train).is_file():
            raise DataRootError(cls.root_message(cfg.root, f"has no study index {cfg.train_file}"))

    def _label_header(self) -> list[str]:
        path = self._path(self.cfg.labels_file) if self.cfg.labels_file else None
        if path is None or not path.is_file():
            return []
        from medvlp.datamodules.formats.tables import read_header

        header = [h.strip() for h in read_header(path)]
        if not header or header[0] != "study" or len(header) < 2:
            raise DataError(f"{path}: the first line must be 'study,<label>,...', got {','.join(header)!r}.")
        return [h.strip() for h in header[1:]]

    def labels_by_study(self) -> dict[str, np.ndarray]:
        """``{study id: float32 [K]}`` from ``data.labels_file`` (empty when there is none)."""
        if self._labels is None:
            self._labels = {}
            if self.label_names:
                from medvlp.datamodules.formats.tables import read_csv

                path = self._path(self.cfg.labels_file)
                df = read_csv(path, ["study", *self.label_names], strings=False, dtype={"study": str})
                try:
                    values = df[self.label_names].to_numpy(np.float32)
                except (TypeError, ValueError) as err:
                    raise DataError(f"The labels {path} hold a value that is not a number ({err}).") from err
                self._labels = {str(s): v for s, v in zip(df["study"], values, strict=True)}
        return self._labels

    def read_index(self, name: str) -> dict[str, Any]:
        """The study index ``name`` (a JSON object keyed by study id), checked entry by entry."""
        path = self._path(name)
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"Study index {path} does not exist.") from None
        except OSError as err:
            raise (os_error(path, err) or DataError(f"Study index {path} could not be read: {err}")) from err
        except ValueError as err:
            raise DataError(f"Study index {path} is not readable JSON: {err}") from err
        if not isinstance(index, dict):
            raise DataError(f"Study index {path} must be a JSON object keyed by study id, got a {type(index).__name__}.")
        for study, entry in index.items():
            series = entry.get("series") if isinstance(entry, dict) else None
            report = entry.get("report") if isinstance(entry, dict) else None
            if not isinstance(series, dict) or not isinstance(report, list) or not all(isinstance(s, str) for s in report):
                raise DataError(f"{path}: study {study!r} must be {{'series': {{name: {{...}}}}, 'report': [sentence, ...]}}, "
                                f"got {json.dumps(entry)[:200]}.")
        return index

    def _split_studies(self, split: str) -> tuple[str, dict[str, Any]]:
        """The index file and studies of ``split``. ``test``: ``data.test_file``, else ``data.val_file``;
        ``val``: ``data.val_file`` when ``test_file`` is set, else ``data.val_fraction`` of the train
        studies (by a stable hash of the study id); with neither file, ``test`` is another
        ``val_fraction`` of them. No split validates on its test studies."""
        cfg = self.cfg
        has_val_file = self._path(cfg.val_file).is_file() if cfg.val_file else False
        test_file = cfg.test_file or (cfg.val_file if has_val_file else "")
        val_file = cfg.val_file if cfg.test_file and has_val_file else ""
        if split == "test" and test_file:
            return test_file, self.read_index(test_file)
        if split == "val" and val_file:
            return val_file, self.read_index(val_file)
        train = self.read_index(cfg.train_file)
        parts = self._held_out(train, (["val"] if not val_file else []) + ([] if test_file else ["test"]))
        if split == "train":
            kept = set().union(*parts.values()) if parts else set()
            return cfg.train_file, {s: e for s, e in train.items() if s not in kept}
        return cfg.train_file, {s: e for s, e in train.items() if s in parts[split]}

    def _held_out(self, train: dict[str, Any], splits: list[str]) -> dict[str, set[str]]:
        """Studies of the train index drawn as ``splits`` (``val`` then ``test``): those whose stable hash
        falls in ``[k * f, (k + 1) * f)`` for ``f = data.val_fraction``, at least one each (the lowest
        remaining hash) while two or more studies stay for training."""
        frac, seed = float(self.cfg.val_fraction), int(self.cfg.seed)
        u = {s: stable_fraction(seed, s) for s in train}
        out: dict[str, set[str]] = {}
        for k, name in enumerate(splits):
            free = sorted((v, s) for s, v in u.items() if not any(s in o for o in out.values()))
            pick = {s for v, s in free if k * frac <= v < (k + 1) * frac}
            if not pick and frac > 0 and len(free) > 2:
                pick = {free[0][1]}
            out[name] = pick
        return out

    # ------------------------------------------------------------------ records
    def build_records(self, split: str) -> list[Record]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split '{split}'; expected train, val or test.")
        name, index = self._split_studies(split)
        labels = self.labels_by_study()
        missing, empty_report, no_series, unlabeled, records = [], [], [], [], []
        for study, entry in index.items():
            sentences = [s.strip() for s in entry["report"] if s and s.strip()]
            if not sentences:
                empty_report.append(study)
                continue
            paths = []
            for series in entry["series"]:
                f = Path(self.cfg.root) / study / series / "img.pt"
                (paths if f.is_file() else missing).append(str(f))
            if not paths:
                no_series.append(study)
                continue
            lab = labels.get(str(study)) if self.label_names else None
            if self.label_names and lab is None:
                unlabeled.append(study)
            records.append(Record(str(study), paths, self.join(sentences), lab,
                                  {"sentences": sentences, "series": list(entry["series"])}))
        where = f"{self._path(name)} ({split})"
        if missing and self.cfg.on_error != "skip":
            raise DataError(f"{where}: {len(missing)} listed series have no img.pt, e.g. {missing[0]}. Check data.root, "
                            f"or set data.on_error=skip to drop (and count) them.")
        for f in missing:  # the study keeps its other series
            self.note_dropped(split, Path(f).parent.parent.name, f"series {Path(f).parent.name}: {f} does not exist "
                                                                 f"(the study keeps its other series)")
        for study in empty_report:
            self.note_dropped(split, study, f"{self._path(name)}: study {study} has an empty report")
        for study in no_series:
            self.note_dropped(split, study, f"{self._path(name)}: study {study} has no series with an img.pt")
        for key, items, what in (("missing_series", missing, "listed series without img.pt (dropped)"),
                                 ("empty_reports", empty_report, "studies with an empty report (skipped)"),
                                 ("studies_without_series", no_series, "studies without a readable series (skipped)"),
                                 ("unlabeled_studies", unlabeled, f"studies without a row in {self.cfg.labels_file}")):
            if items:
                self.counts[f"{split}_{key}"] = len(items)
                log.warning("brain_mri %s: %d %s; first: %s", where, len(items), what, items[0])
        if unlabeled:  # partially labelled: unknown labels are NaN
            nan = np.full(len(self.label_names), np.nan, np.float32)
            records = [r if r.labels is not None else _with_labels(r, nan) for r in records]
        if split == "train":
            self._count_unlisted(self.read_index(self.cfg.train_file))
        return records

    def _count_unlisted(self, train_index: dict[str, Any]) -> None:
        """Count study folders under the root that no split's index lists (volumes without a report)."""
        listed = set(train_index)
        for key in ("val_file", "test_file"):
            f = getattr(self.cfg, key)
            if f and self._path(f).is_file():
                listed.update(self.read_index(f))
        unlisted = [e.name for e in os.scandir(self.cfg.root) if e.is_dir() and e.name not in listed
                    and not e.name.startswith(".") and e.name != "demo_truth"]
        if unlisted:
            self.counts["unlisted_study_folders"] = len(unlisted)
            log.warning("brain_mri: %d study folders under %s are in no index (no report; unused), e.g. %s",
                        len(unlisted), self.cfg.root, unlisted[0])

    # ------------------------------------------------------------------ text
    def join(self, sentences: list[str]) -> str:
        return (self.cfg.text_prefix + " ".join(sentences)).strip()

    def item_text(self, record: Record, train: bool) -> str:
        sentences = record.meta.get("sentences")
        if not train or not sentences:
            return record.text
        import torch

        if self.cfg.report_mode == "sentence":
            return self.join([sentences[int(torch.randint(len(sentences), ()).item())]])
        return self.join([sentences[i] for i in torch.randperm(len(sentences)).tolist()])

    # ------------------------------------------------------------------ pixels
    def scan_order(self, n: int, train: bool) -> list[int]:
        """Indices of the series a draw uses (see the module docstring)."""
        import torch

        cfg = self.cfg
        k = int(cfg.num_scans)
        if not train:
            m = int(cfg.eval_max_scans)
            return list(range(min(n, m) if m > 0 else n))
        order = torch.randperm(n).tolist()
        if cfg.scan_sampling == "repeat":
            return (order * math.ceil(k / n))[:k]
        return order[:k] if k > 0 else order

    def load_series(self, path: str, train: bool) -> Any:
        """One series as ``[1, num_slices, image_size, image_size]``."""
        from medvlp.datamodules.pub_brain5 import read_series_tensor
        from medvlp.datamodules.transforms import square_resize_crop

        cfg = self.cfg
        t = read_series_tensor(path)
        slices = int(cfg.num_slices) if train or not int(cfg.eval_num_slices) else int(cfg.eval_num_slices)
        t = square_resize_crop(t.float() / float(cfg.scale), slices, int(cfg.resize), int(cfg.image_size), cfg.slice_mode)
        return ((t - float(cfg.mean)) / float(cfg.std))[None].contiguous()

    def load_image(self, record: Record, train: bool) -> Any:
        import torch

        order = self.scan_order(len(record.image_path), train)
        loaded: dict[int, Any] = {}
        for i in order:
            if i not in loaded:
                loaded[i] = self.load_series(record.image_path[i], train)
        return torch.stack([loaded[i] for i in order])


@dataclass
class HeadCTConfig(BrainMRIConfig):
    """``data.*`` keys of head-CT studies in the same layout (``configs/data/head_ct.yaml``)."""

    name: str = "head_ct"
    text_prefix: str = "This CT study shows: "
    window: str = ""  # the HU window the uint8 series were made with (recorded; HLIP does not publish it)


@register_datamodule("head_ct")
class HeadCTDataModule(BrainMRIDataModule):
    """Head-CT studies (several series each) in HLIP's study-JSON layout (HeadCT240K-style)."""

    Config = HeadCTConfig
    demo_kind = ""
    default_prompts = ""


def _with_labels(record: Record, labels: np.ndarray) -> Record:
    import dataclasses

    return dataclasses.replace(record, labels=labels)


__all__ = ["BrainMRIConfig", "BrainMRIDataModule", "HeadCTConfig", "HeadCTDataModule"]
