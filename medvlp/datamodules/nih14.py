"""NIH ChestX-ray14: 112,120 frontal PNGs with 14 text-mined labels and 984 boxes, read as the NIH
Clinical Center (Box folder ``ChestXray-NIHCC``) and its Kaggle mirror distribute it.

Official files (``specs/datasets.md`` §7): ``Data_Entry_2017_v2020.csv`` (or the original
``Data_Entry_2017.csv``), ``BBox_List_2017.csv``, ``train_val_list.txt`` / ``test_list.txt`` and the
PNGs, either flat in ``images/`` (the ``images_0NN.tar.gz`` archives) or nested as Kaggle's
``images_0NN/images/``. Images are found by walking ``data.root`` (any nesting); two files with
the same name are an error.

Config keys: see :class:`NIH14Config`. No reports: every record's text is ``""``.

Tables:
    * ``Data_Entry``: the header's bracketed names hold commas (``OriginalImage[Width,Height]``), so
      pandas sees 11 columns (12 with the 2017 file's trailing comma, ``Unnamed: 11``). Only the
      first 7 are used, by their exact pandas names, or by position when a re-export renamed them.
    * ``Finding Labels``: ``|``-separated; multi-hot over ``label_names`` (the 14 labels, spelled
      as in the file: ``Effusion``, ``Pleural_Thickening``, ...); ``No Finding`` = all zero. An
      unknown label is an error (no silent spelling mismatch).
    * ``BBox_List_2017.csv`` (``Bbox [x,y,w,h]`` split into ``Bbox [x``, ``y``, ``w``, ``h]`` + 3
      empty columns): boxes become ``Record.boxes`` float32 ``[N, 4]`` ``(x1, y1, x2, y2) = (x, y,
      x + w, y + h)`` in the pixels of the 1024 x 1024 PNG, and ``Record.box_labels`` index
      ``box_label_names`` (the 8 box classes; the file's ``Infiltrate`` is ``Infiltration``).
      Records without boxes get ``boxes = None``; their samples carry an empty ``[0, 4]`` box
      tensor so that every batch has the same keys. ``data.boxes_only=true`` keeps only the images
      with boxes (a detection dataset: every record then has boxes).

Splits (``data.split_protocol``):
    * ``official`` (default): ``test`` = ``test_list.txt``; ``train_val_list.txt`` is split by
      patient: ``data.val_fraction`` of its patients (seeded by ``data.val_seed``) form ``val``.
    * ``lists``: ``train.txt`` / ``val.txt`` / ``test.txt`` (one image name per line, e.g. the
      MRM / BenchX lists) from ``data.split_dir`` (default: ``data.root``).
    * ``random``: a seeded patient-level split of the selected images (after ``data.views`` and
      ``data.boxes_only``) into ``data.test_fraction`` / ``data.val_fraction`` / rest; with
      ``boxes_only`` this splits the 880 box images into a detection train / val / test.

Differences from published code: none of the seed methods uses NIH; BenchX (``MRM`` lists) resizes
to 224 x 224 ignoring the aspect ratio, here the longest side is resized and the image padded
(:class:`~medvlp.datamodules.transforms.CXRTransform`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
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
    import torch

log = logging.getLogger(__name__)

DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_FILE = "BBox_List_2017.csv"
OFFICIAL_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
]  # fmt: skip
NO_FINDING = "No Finding"
BOX_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
SPELLINGS = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}  # BBox file / re-exports
ENTRY_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
BBOX_COLUMNS = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
SPLIT_PROTOCOLS = ("official", "lists", "random")
SPLITS = ("train", "val", "test")
IMAGE_NAME = re.compile(r"^\d{8}_\d{3}\.png$")


@dataclass
class NIH14Config(RadiographConfig):
    """``data.*`` keys of the NIH ChestX-ray14 datamodule (``configs/data/nih14.yaml``)."""

    name: str = "nih14"
    data_entry: str = "auto"  # auto: Data_Entry_2017_v2020.csv, else Data_Entry_2017.csv; or a file under root
    views: list[str] = field(default_factory=lambda: ["PA", "AP"])  # View Position kept; [] = every view
    split_protocol: str = "official"  # official | lists | random (see NIH14DataModule)
    split_dir: str = ""  # lists: folder holding train.txt / val.txt / test.txt; "" = data.root
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # official / random: share of patients held out as val
    test_fraction: float = bounded(0.2, ge=0, lt=1)  # random: share of patients in test
    val_seed: int = bounded(0, ge=0, le=2**32 - 1)  # seed of the patient holdouts (independent of data.seed)
    boxes_only: bool = False  # keep only the images listed in BBox_List_2017.csv


def pick_columns(df: pd.DataFrame, names: list[str], path: Path) -> pd.DataFrame:
    """The columns ``names`` of ``df`` by exact name, else the first ``len(names)`` by position.

    The positional fallback is taken only when the first column holds image names
    (``00000001_000.png``); otherwise DataError naming the file, the missing and the found columns.
    """
    if all(n in df.columns for n in names):
        return df[names].copy()
    missing = [n for n in names if n not in df.columns]
    first = df.iloc[:, 0].dropna().astype(str) if df.shape[1] else None
    if df.shape[1] >= len(names) and first is not None and len(first) and first.map(lambda s: bool(IMAGE_NAME.match(s.strip()))).all():
        log.warning("nih14: %s lacks the column(s) %s; using the first %d columns by position", path, missing, len(names))
        out = df.iloc[:, : len(names)].copy()
        out.columns = names
        return out
    raise DataError(f"{path} lacks the column(s) {missing}; found {list(df.columns)}.")


def multi_hot(findings: str, path: Path, image: str) -> np.ndarray:
    """``"Effusion|Infiltration"`` -> float32 [14] over ``LABELS``; ``No Finding`` -> zeros."""
    out = np.zeros(len(LABELS), dtype=np.float32)
    for token in str(findings).split("|"):
        token = SPELLINGS.get(token.strip(), token.strip())
        if token == NO_FINDING:
            continue
        if token not in LABELS:
            raise DataError(f"{path}: image {image} has the finding '{token}', which is none of {LABELS} or '{NO_FINDING}'.")
        out[LABELS.index(token)] = 1.0
    return out


def read_list(path: Path) -> list[str]:
    """Image names of a split list (first field of each non-empty line, basename)."""
    from medvlp.datamodules.formats.tables import read_text

    text = read_text(path, "Split list")
    names = []
    for line in text.splitlines():
        fields = line.replace(",", " ").split()
        if fields:
            names.append(fields[0].replace("\\", "/").rsplit("/", 1)[-1])
    return names


def patient_of(image: str) -> str:
    """``00000001_000.png`` -> ``00000001`` (the 8-digit patient id, zeros kept)."""
    return image.split("_", 1)[0]


@register_datamodule("nih14")
class NIH14DataModule(RadiographDataModule):
    """NIH ChestX-ray14 (2D chest X-ray, 14 multi-hot labels, boxes for 880 images, no text)."""

    Config = NIH14Config
    modality = "2d"
    default_prompts = "nih14.yaml"
    demo_kind = "nih14"  # data.root=demo: the synthetic world of demo/downstream.py
    label_names = list(LABELS)
    box_label_names = list(BOX_LABELS)
    EXPECTED_LAYOUT = """\
<root>/                                  the ChestXray-NIHCC download (or its Kaggle mirror)
  Data_Entry_2017_v2020.csv              (or Data_Entry_2017.csv)
  BBox_List_2017.csv                     (needed for data.boxes_only)
  train_val_list.txt  test_list.txt      (data.split_protocol=official)
  images/00000001_000.png ...            (or Kaggle: images_001/images/00000001_000.png ...)
"""

    def __init__(self, cfg: NIH14Config, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        check_choice("data.split_protocol", cfg.split_protocol, SPLIT_PROTOCOLS)
        vf, tf = float(cfg.val_fraction), float(cfg.test_fraction)
        if not 0.0 <= vf < 1.0 or not 0.0 <= tf < 1.0 or (cfg.split_protocol == "random" and vf + tf >= 1.0):
            raise ValueError(
                f"data.val_fraction={vf} / data.test_fraction={tf} are not valid: each must be in [0, 1) "
                f"and, with split_protocol=random, their sum below 1."
            )
        self.label_names = list(LABELS)
        self.box_label_names = list(BOX_LABELS)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def data_entry_path(cls, cfg: DataConfig) -> Path | None:
        root = Path(cfg.root)
        choice = getattr(cfg, "data_entry", "auto")
        names = DATA_ENTRY_FILES if choice == "auto" else (choice,)
        return next((root / n for n in names if (root / n).is_file()), None)

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        if cls.data_entry_path(cfg) is None:
            choice = getattr(cfg, "data_entry", "auto")
            wanted = " nor ".join(DATA_ENTRY_FILES) if choice == "auto" else f"{choice} (data.data_entry)"
            raise DataRootError(cls.root_message(cfg.root, f"has no {wanted}"))
        protocol = getattr(cfg, "split_protocol", "official")
        if protocol == "official":
            for name in OFFICIAL_LISTS.values():
                if not (root / name).is_file():
                    raise DataRootError(cls.root_message(cfg.root, f"has no {name} (data.split_protocol=official)"))
        elif protocol == "lists":
            folder = Path(getattr(cfg, "split_dir", "") or root)
            for name in SPLIT_FILES.values():
                if not (folder / name).is_file():
                    raise DataRootError(cls.root_message(cfg.root, f"is fine, but {folder / name} does not exist (data.split_protocol=lists, data.split_dir)"))
        if getattr(cfg, "boxes_only", False) and not (root / BBOX_FILE).is_file():
            raise DataRootError(cls.root_message(cfg.root, f"has no {BBOX_FILE} (data.boxes_only=true)"))
        if not any(p.is_dir() and p.name.startswith("images") for p in root.iterdir()):
            raise DataRootError(cls.root_message(cfg.root, "has no images/ (nor images_0NN/) folder"))

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    def split_key(self) -> str:
        """Everything that defines the train split (names the label-fraction file)."""
        c = self.cfg
        key = f"{type(self).__name__}|{c.split_protocol}|views={sorted(str(v) for v in c.views)}|boxes_only={bool(c.boxes_only)}"
        if c.split_protocol == "lists":
            return key + f"|{os.path.abspath(c.split_dir or c.root)}"
        return key + f"|val={float(c.val_fraction):g}|test={float(c.test_fraction):g}@{c.val_seed}"

    # ------------------------------------------------------------------ tables
    def entries(self) -> pd.DataFrame:
        """Data_Entry: image, labels (float32 [14] each), patient_id, follow_up, age, gender, view."""
        if "entries" not in self._tables:
            path = self.data_entry_path(self.cfg)
            if path is None:
                self.check_root(self.cfg)
            df = pick_columns(read_table(path, index_col=False), ENTRY_COLUMNS, path)
            df["Image Index"] = df["Image Index"].str.strip()
            if df["Image Index"].isna().any():
                raise DataError(f"{path} row {int(np.flatnonzero(df['Image Index'].isna())[0]) + 2} has no Image Index.")
            dup = df["Image Index"].duplicated()
            if dup.any():
                raise DataError(f"{path} lists {df.loc[dup, 'Image Index'].iloc[0]} more than once.")
            uniques = df["Finding Labels"].fillna(NO_FINDING).drop_duplicates()
            first_image = df.loc[uniques.index, "Image Index"]  # parse each distinct string once
            codes = {s: multi_hot(s, path, img) for s, img in zip(uniques, first_image, strict=True)}
            out = df.rename(columns={
                "Image Index": "image", "Follow-up #": "follow_up", "Patient Age": "age", "Patient Gender": "gender",
                "View Position": "view",
            })  # fmt: skip
            out["labels"] = df["Finding Labels"].fillna(NO_FINDING).map(codes)
            out["patient_id"] = out["image"].map(patient_of)
            self._tables["entries"] = out.set_index("image", drop=False)
        return self._tables["entries"]

    def boxes(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """image -> (float32 [N, 4] x1, y1, x2, y2; int64 [N] into ``box_label_names``); {} without the file."""
        if "boxes" not in self._tables:
            import pandas as pd

            path = self.root / BBOX_FILE
            out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            if not path.is_file():
                log.info("nih14: no %s under %s; records carry no boxes", BBOX_FILE, self.root)
            else:
                df = pick_columns(read_table(path, index_col=False), BBOX_COLUMNS, path)
                xywh = df[BBOX_COLUMNS[2:]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
                bad = np.flatnonzero(np.isnan(xywh).any(axis=1) | (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0))
                if len(bad):
                    i = int(bad[0])
                    raise DataError(f"{path} row {i + 2} ({df['Image Index'].iat[i]}) has the box {df[BBOX_COLUMNS[2:]].iloc[i].tolist()}; expected numbers x, y, w > 0, h > 0.")
                names = [SPELLINGS.get(str(v).strip(), str(v).strip()) for v in df["Finding Label"]]
                unknown = sorted({n for n in names if n not in BOX_LABELS})
                if unknown:
                    raise DataError(f"{path} has box labels {unknown}, none of {BOX_LABELS} (Infiltrate = Infiltration).")
                grouped: dict[str, list[int]] = {}
                for i, img in enumerate(df["Image Index"].astype(str).str.strip()):
                    grouped.setdefault(img, []).append(i)
                for img, rows in grouped.items():
                    b = xywh[rows]
                    xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1).astype(np.float32)
                    out[img] = (xyxy, np.array([BOX_LABELS.index(names[r]) for r in rows], dtype=np.int64))
            self._tables["boxes"] = out
        return self._tables["boxes"]

    def image_files(self) -> dict[str, str]:
        """image name -> path, by walking ``data.root`` (``images/`` or ``images_0NN/images/``)."""
        if "files" not in self._tables:
            index: dict[str, str] = {}
            for dirpath, dirnames, files in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in files:
                    if IMAGE_NAME.match(f):
                        path = os.path.join(dirpath, f)
                        if f in index:
                            raise DataError(
                                f"Image {f} exists twice under {self.root}: {index[f]} and {path}. Keep one copy "
                                f"(e.g. either images/ or the Kaggle images_0NN/images/ folders)."
                            )
                        index[f] = path
            self._tables["files"] = index
        return self._tables["files"]

    def split_names(self, split: str) -> list[str] | None:
        """Image names of ``split`` from the lists (None for ``random``, which splits after filtering)."""
        protocol = self.cfg.split_protocol
        if protocol == "lists":
            folder = Path(self.cfg.split_dir or self.root)
            return read_list(folder / SPLIT_FILES[split])
        if protocol == "random":
            return None
        if split == "test":
            return read_list(self.root / OFFICIAL_LISTS["test"])
        names = read_list(self.root / OFFICIAL_LISTS["train_val"])
        test = set(read_list(self.root / OFFICIAL_LISTS["test"]))
        overlap = [n for n in names if n in test]
        if overlap:
            raise DataError(f"{OFFICIAL_LISTS['train_val']} and {OFFICIAL_LISTS['test']} share {len(overlap)} images (first: {overlap[0]}).")
        held = self.holdout(sorted({patient_of(n) for n in names}), float(self.cfg.val_fraction), 0)
        return [n for n in names if (patient_of(n) in held) == (split == "val")]

    def holdout(self, patients: list[str], fraction: float, offset: int) -> set[str]:
        """``round(fraction * len(patients))`` patients (at least 1 if fraction > 0, never all), drawn
        from a ``default_rng(data.val_seed)`` permutation starting at position ``offset``."""
        n = int(round(fraction * len(patients)))
        if fraction > 0 and len(patients) > 1:
            n = max(0, min(max(n, 1), len(patients) - 1 - offset))
        order = np.random.default_rng(int(self.cfg.val_seed)).permutation(len(patients))
        return {patients[i] for i in order[offset : offset + n]}

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        if split not in SPLITS:
            raise ValueError(f"Unknown split '{split}'; expected one of {list(SPLITS)}.")
        self.check_root(self.cfg)
        entries = self.entries()
        names = self.split_names(split)
        if names is None:
            df = entries
        else:
            unknown = [n for n in names if n not in entries.index]
            if unknown:
                raise DataError(
                    f"The {split} list names {len(unknown)} image(s) missing from {self.data_entry_path(self.cfg)} "
                    f"(first: {unknown[0]})."
                )
            df = entries.loc[names]
        views = [str(v) for v in self.cfg.views]
        if views:
            df = df[df["view"].isin(views)]
        boxes = self.boxes()
        if self.cfg.boxes_only:
            df = df[df["image"].isin(boxes)]
        if names is None:  # random: patient-level split of what is left
            patients = sorted(set(df["patient_id"]))
            test = self.holdout(patients, float(self.cfg.test_fraction), 0)
            n_test = len(test)
            val = self.holdout(patients, float(self.cfg.val_fraction), n_test) if self.cfg.val_fraction > 0 else set()
            part = {"test": test, "val": val}.get(split)
            keep = df["patient_id"].isin(part) if part is not None else ~df["patient_id"].isin(test | val)
            df = df[keep]
        files = self.image_files()
        records: list[Record] = []
        missing: list[str] = []
        for image, lab, pid, fu, age, sex, view in zip(
            df["image"], df["labels"], df["patient_id"], df["follow_up"], df["age"], df["gender"], df["view"], strict=True
        ):
            path = files.get(image)
            if path is None:
                missing.append(image)
                continue
            meta = {"image_index": image, "patient_id": pid, "follow_up": str(fu), "age": str(age), "gender": str(sex),
                    "view": str(view), "split": split, "has_boxes": image in boxes}  # fmt: skip
            rec = Record(image.removesuffix(".png"), path, "", lab.copy(), meta)
            if image in boxes:
                rec.boxes, rec.box_labels = boxes[image][0].copy(), boxes[image][1].copy()
            records.append(rec)
        if missing:
            msg = (f"{len(missing)} image(s) of the {split} split are not under {self.root} (first: {missing[0]}); "
                   f"searched every folder for <8 digits>_<3 digits>.png")  # fmt: skip
            if self.cfg.on_error != "skip":
                raise DataError(msg + ". Set data.on_error=skip to skip (and count) them.")
            for image in missing:
                self.note_dropped(split, image.removesuffix(".png"), f"{image} (listed in the {split} split) is not "
                                                                      f"under {self.root}")
            log.warning("nih14 %s: skipped %s", split, msg)
        if self.cfg.boxes_only and not records:
            raise DataError(
                f"nih14: no image of the {split} split has boxes in {BBOX_FILE} (data.split_protocol="
                f"{self.cfg.split_protocol}); use data.split_protocol=random to split the box images themselves."
            )
        log.info("nih14 %s: %d records (%d with boxes)", split, len(records), sum(r.boxes is not None for r in records))
        return records

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        gray = read_gray(record.image_path)
        if record.boxes is not None and len(record.boxes):
            h, w = gray.shape
            outside = (record.boxes[:, 0] >= w) | (record.boxes[:, 1] >= h)
            if outside.any():
                raise DataError(
                    f"A box of {record.image_path} starts at {record.boxes[outside][0, :2].tolist()}, outside the "
                    f"{w} x {h} image: {BBOX_FILE} is in the pixels of the original 1024 x 1024 PNGs, so a resized "
                    f"copy of the images cannot be used with boxes."
                )
        return gray

    def load_sample(self, record: Record, train: bool) -> dict[str, Any]:
        """Image plus ``boxes`` ``[N, 4]`` / ``box_labels`` ``[N]`` in the transformed image's pixels
        (``[0, 4]`` / ``[0]`` for an image without boxes, so every batch has the same keys)."""
        if record.boxes is None:
            record = dataclasses.replace(record, boxes=np.zeros((0, 4), np.float32), box_labels=np.zeros(0, np.int64))
        return super().load_sample(record, train)

    def load_image(self, record: Record, train: bool) -> torch.Tensor:
        return self.load_sample(record, train)["image"]
