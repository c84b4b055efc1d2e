"""SIIM-ACR Pneumothorax Segmentation (Kaggle 2019), read as distributed in stage 1 or stage 2.

Official files (``specs/datasets.md`` §4):

* stage 1: ``train-rle.csv`` (header ``ImageId, EncodedPixels`` with a leading space, values often
  with a leading space too: ``, -1``) and ``dicom-images-train/<study>/<series>/<SOPInstanceUID>.dcm``;
* stage 2: ``stage_2_train.csv`` (``ImageId,EncodedPixels``; stage-1 train + test labels) and the
  DICOMs. Kaggle's stage-2 download holds the new test set flat in ``stage_2_images/``; the labelled
  images are the stage-1 train and test DICOMs. Copies differ in where they put them, so in stage 2
  every ``.dcm`` under ``data.root`` is indexed.

DICOMs are found by walking the tree and keyed by file stem (= ImageId = SOPInstanceUID); two
files with the same stem are an error. ``EncodedPixels`` is the relative, column-major RLE of
§4.3 (decoded by :mod:`~medvlp.datamodules.formats.rle` at the DICOM's Rows x Columns); ``-1``
means no pneumothorax; an image with several rows gets the union of their masks.

Config keys: see :class:`SIIMConfig` (``configs/data/siim_pneumothorax.yaml``).

One record per image with the label ``Pneumothorax`` (1 when any row has an RLE). ``data.task``:
``segmentation`` (default) adds ``Record.mask`` (the union mask); ``classification`` returns the
label only.

Splits: the unique ImageIds (sorted) are split 70/15/15 as MGCA does (30 % held out, then halved
into test and val, ``random_state=data.split_seed``, MGCA: 0), before missing DICOMs are dropped.
With ``data.balance_train`` the train split keeps every positive image and as many negatives,
drawn without replacement with ``data.balance_seed`` (MGCA's segmentation dataset; seed 42).

Item accounting: ImageIds of the CSV without a DICOM, unreadable DICOMs and malformed RLE values
raise a DataError naming the file, or are skipped and counted with ``data.on_error=skip``
(``self.counts``). DICOMs without a CSV row are counted and logged, never an error: they carry
no label (stage-1 ``dicom-images-train`` holds a few such files, and stage 2 holds the test set).

Differences from the official code (MGCA ``mgca/preprocess/siim.py``,
``mgca/datasets/segmentation_dataset.py``):
    * MGCA splits the CSV's **rows**, so an image with several annotations can land in two splits
      with partial masks; here the split is by **image** (the union mask goes to one split).
    * MGCA compares values with ``" -1"`` in preprocessing and ``"-1"`` in the dataset (so with the
      spaced original file every image counts as positive there); here values are stripped.
    * MGCA hard-codes 1024 x 1024 masks and a path prefix of 105 characters; here masks follow the
      DICOM's Rows/Columns and paths come from walking ``data.root``.
    * Images are letterboxed by :class:`~medvlp.datamodules.transforms.CXRTransform` (MGCA pads to
      a square and resizes too); the train affine replaces ``ShiftScaleRotate``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.radiograph import RadiographConfig, RadiographDataModule, check_choice, read_table
from medvlp.datamodules.rsna import mgca_split
from medvlp.registry import register_datamodule

if TYPE_CHECKING:  # heavy imports stay inside functions (base.py: check_root must not pay for them)
    import pandas as pd

log = logging.getLogger(__name__)

STAGE1_CSV = "train-rle.csv"
STAGE1_DIR = "dicom-images-train"
STAGE2_CSV = "stage_2_train.csv"
STAGE2_DIR = "stage_2_images"
EMPTY = "-1"
LAYOUTS = ("auto", "stage1", "stage2")
TASKS = ("classification", "segmentation")
SPLITS = ("train", "val", "test")
VOI = ("auto", "none")
_RLE = r"-1|[0-9]+(?: [0-9]+)*"  # after whitespace normalisation


@dataclass
class SIIMConfig(RadiographConfig):
    """``data.*`` keys of the SIIM-ACR Pneumothorax datamodule (``configs/data/siim_pneumothorax.yaml``)."""

    name: str = "siim_pneumothorax"
    task: str = "segmentation"  # segmentation (label + union mask) | classification (label only)
    layout: str = "auto"  # auto (stage2 when stage_2_train.csv exists, else stage1) | stage1 | stage2
    split_seed: int = bounded(0, ge=0, le=2**32 - 1)  # random_state of the 70/15/15 image split (MGCA: 0)
    balance_train: bool = True  # train: all positives + as many negatives (MGCA segmentation)
    balance_seed: int = bounded(42, ge=0, le=2**32 - 1)  # seed of the negatives drawn by balance_train (MGCA: np.random.seed(42))
    voi: str = "auto"  # DICOM VOI LUT / window: auto (apply when present) | none


@dataclass(frozen=True)
class RleMask:
    """Picklable ``Record.mask``: the union of an image's RLE rows, decoded at ``(height, width)``."""

    rles: tuple[str, ...] = ()
    image_id: str = ""
    source: str = ""  # the CSV, for error messages

    def __call__(self, height: int, width: int) -> np.ndarray:
        from medvlp.datamodules.formats.rle import rle_union

        try:
            return rle_union(list(self.rles), height, width)
        except DataError as err:
            raise DataError(f"ImageId {self.image_id} in {self.source}: {err}") from err


def index_dicoms(folder: Path) -> dict[str, str]:
    """``{file stem: path}`` of every ``.dcm`` below ``folder`` (walked recursively).

    Raises:
        DataError: when two files share a stem (naming both).
    """
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            if not name.lower().endswith(".dcm"):
                continue
            stem, path = name[:-4], os.path.join(dirpath, name)
            if stem in found:
                raise DataError(
                    f"Two DICOMs under {folder} have the same ImageId {stem}: {found[stem]} and {path}. "
                    f"Remove the duplicate copy (images are matched to {STAGE1_CSV}/{STAGE2_CSV} by file name)."
                )
            found[stem] = path
    return found


def read_rle_table(path: Path) -> pd.DataFrame:
    """The RLE CSV with normalised column names (``" EncodedPixels"`` -> ``EncodedPixels``) and
    stripped values (``" -1"`` -> ``-1``); blank ids / values stay NaN."""
    df = read_table(path)
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("ImageId", "EncodedPixels") if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; found {list(df.columns)} "
                        f"(expected the header 'ImageId, EncodedPixels').")
    df = df[["ImageId", "EncodedPixels"]].copy()
    df["ImageId"] = df["ImageId"].str.strip().replace("", np.nan)
    df["EncodedPixels"] = df["EncodedPixels"].str.split().str.join(" ").replace("", np.nan)
    return df


@register_datamodule("siim_pneumothorax")
class SIIMPneumothoraxDataModule(RadiographDataModule):
    """SIIM-ACR Pneumothorax (stage 1 or stage 2 layout): pneumothorax label and union RLE mask.

    See the module docstring for layouts, splits, item accounting and the differences from MGCA.
    """

    Config = SIIMConfig
    modality = "2d"
    default_prompts = "cxr.yaml"
    balance_segmentation = True  # MGCA balances SIIM's training images
    demo_kind = "siim"  # data.root=demo: the synthetic world of demo/downstream.py
    label_names = ["Pneumothorax"]
    EXPECTED_LAYOUT = """\
<root>/                                    the Kaggle siim-acr-pneumothorax-segmentation data, either
  train-rle.csv                            stage 1: 'ImageId, EncodedPixels' (leading spaces kept as shipped)
  dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
or
  stage_2_train.csv                        stage 2: 'ImageId,EncodedPixels'
  stage_2_images/<ImageId>.dcm             (every .dcm under root is indexed, e.g. dicom-images-train/ too)
"""

    def __init__(self, cfg: SIIMConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        check_choice("data.task", cfg.task, TASKS)
        check_choice("data.layout", cfg.layout, LAYOUTS)
        check_choice("data.voi", cfg.voi, VOI)
        self.label_names = list(type(self).label_names)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def detect_layout(cls, cfg: DataConfig) -> str:
        """``stage1`` or ``stage2`` (``data.layout``, or what ``data.root`` holds for ``auto``)."""
        root, layout = Path(cfg.root), getattr(cfg, "layout", "auto")
        if layout == "auto":
            if (root / STAGE2_CSV).is_file():
                return "stage2"
            if (root / STAGE1_CSV).is_file():
                return "stage1"
            raise DataRootError(cls.root_message(cfg.root, f"has neither {STAGE1_CSV} (stage 1) nor {STAGE2_CSV} (stage 2)"))
        return layout

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        layout = cls.detect_layout(cfg)
        csv = STAGE1_CSV if layout == "stage1" else STAGE2_CSV
        if not (root / csv).is_file():
            raise DataRootError(cls.root_message(cfg.root, f"has no {csv} (data.layout={layout})"))
        if layout == "stage1" and not (root / STAGE1_DIR).is_dir():
            raise DataRootError(cls.root_message(cfg.root, f"has no {STAGE1_DIR}/ folder (data.layout=stage1)"))

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    @property
    def layout(self) -> str:
        return self.detect_layout(self.cfg)

    @property
    def csv_path(self) -> Path:
        return self.root / (STAGE1_CSV if self.layout == "stage1" else STAGE2_CSV)

    # ------------------------------------------------------------------ tables
    def images(self) -> pd.DataFrame:
        """One row per ImageId (sorted): ``image_id``, ``rles`` (tuple of RLE strings, ``-1`` rows
        removed), ``target`` (0/1), ``n_rows``, ``error`` (a malformed-value message or None)."""
        if "images" in self._tables:
            return self._tables["images"]
        import pandas as pd

        path = self.csv_path
        df = read_rle_table(path)
        if df["ImageId"].isna().any():
            raise DataError(f"{path} line {int(df['ImageId'].isna().to_numpy().argmax()) + 2} has no ImageId.")
        valid = df["EncodedPixels"].fillna("").str.fullmatch(_RLE)
        pairs = df["EncodedPixels"].fillna("").str.count(" ") % 2 == 1  # an even number of values
        ok = valid & ((df["EncodedPixels"] == EMPTY) | pairs)
        groups: dict[str, dict[str, Any]] = {}
        for image_id, rle, good, line in zip(df["ImageId"], df["EncodedPixels"], ok, range(2, len(df) + 2), strict=True):
            g = groups.setdefault(image_id, {"rles": [], "n_rows": 0, "error": None})
            g["n_rows"] += 1
            if not good and g["error"] is None:
                g["error"] = (f"{path} line {line}: ImageId {image_id} has EncodedPixels {rle!r}; expected '-1' or "
                              f"integer (gap, length) pairs")
            elif good and rle != EMPTY:
                g["rles"].append(rle)
        ids = sorted(groups)
        table = pd.DataFrame({
            "image_id": ids,
            "rles": [tuple(groups[i]["rles"]) for i in ids],
            "n_rows": [groups[i]["n_rows"] for i in ids],
            "error": [groups[i]["error"] for i in ids],
        })
        table["target"] = [int(len(r) > 0) for r in table["rles"]]
        self._tables["images"] = table
        log.info("siim_pneumothorax: %s has %d rows for %d images (%d with pneumothorax)", path.name, len(df),
                 len(table), int(table["target"].sum()))
        return table

    def split_indices(self) -> dict[str, np.ndarray]:
        """Row indices of :meth:`images` per split (70/15/15 by image; train balanced if asked)."""
        key = f"split:{self.cfg.split_seed}:{self.cfg.balance_train}:{self.cfg.balance_seed}"
        if key in self._tables:
            return self._tables[key]
        table = self.images()
        try:
            parts = mgca_split(len(table), 0.15 * 2, int(self.cfg.split_seed))
        except ValueError as err:
            raise DataError(f"{self.csv_path}: {len(table)} images are too few for a 70/15/15 split ({err}).") from err
        if self.cfg.balance_train:
            train = parts["train"]
            target = table["target"].to_numpy()[train]
            pos, neg = train[target == 1], train[target == 0]
            if len(neg) > len(pos):
                keep = np.random.RandomState(int(self.cfg.balance_seed)).choice(neg, size=len(pos), replace=False)
                chosen = set(keep.tolist()) | set(pos.tolist())
                parts["train"] = np.array([i for i in train if i in chosen], dtype=np.int64)
        self._tables[key] = parts
        return parts

    def dicoms(self) -> dict[str, str]:
        """ImageId -> path of the DICOMs (stage 1: under ``dicom-images-train/``; stage 2: under root)."""
        if "dicoms" not in self._tables:
            folder = self.root / STAGE1_DIR if self.layout == "stage1" else self.root
            self._tables["dicoms"] = index_dicoms(folder)
        return self._tables["dicoms"]

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        check_choice("split", split, SPLITS)
        self.check_root(self.cfg)
        table = self.images()
        rows = table.iloc[self.split_indices()[split]]
        dicoms = self.dicoms()
        if "unlisted" not in self._tables:
            unlisted = sorted(set(dicoms) - set(table["image_id"]))
            self._tables["unlisted"] = unlisted
            if unlisted:  # expected in stage 2 (the test set sits under root); unusual in stage 1
                level = logging.WARNING if self.layout == "stage1" else logging.INFO
                log.log(level, "siim_pneumothorax: %d DICOMs have no row in %s and are ignored (no label; first: %s)",
                        len(unlisted), self.csv_path.name, dicoms[unlisted[0]])
        self.counts["unlisted_dicoms"] = len(self._tables["unlisted"])
        bad = rows[rows["error"].notna()]
        self.drop_items("bad_rle", list(bad["image_id"]),
                        f"{len(bad)} {split} images with a malformed EncodedPixels value (first: "
                        f"{bad['error'].iloc[0] if len(bad) else ''})", split,
                        dict(zip(bad["image_id"], map(str, bad["error"]), strict=True)))
        rows = rows[rows["error"].isna()]
        missing = [i for i in rows["image_id"] if i not in dicoms]
        where = self.root / STAGE1_DIR if self.layout == "stage1" else self.root
        self.drop_items("missing_dicom", missing,
                        f"{len(missing)} of {len(rows)} {split} images listed in {self.csv_path} have no DICOM "
                        f"'<ImageId>.dcm' under {where} (first: {missing[0] + '.dcm' if missing else ''})", split,
                        {m: f"no {m}.dcm under {where} (listed in {self.csv_path})" for m in missing})
        source = str(self.csv_path)
        records: list[Record] = []
        for image_id, rles, target, n_rows in zip(rows["image_id"], rows["rles"], rows["target"], rows["n_rows"], strict=True):
            path = dicoms.get(image_id)
            if path is None:
                continue
            meta = {"image_id": image_id, "n_rows": int(n_rows), "split": split}
            rec = Record(image_id, path, "", np.array([float(target)], dtype=np.float32), meta)
            if self.cfg.task == "segmentation":
                rec.mask = RleMask(tuple(rles), image_id, source)
            records.append(rec)
        log.info("siim_pneumothorax %s: %d images, %d with pneumothorax", split, len(records),
                 sum(int(r.labels[0]) for r in records))
        return records

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        from medvlp.datamodules.formats.dicom import read_dicom

        return read_dicom(record.image_path, voi=self.cfg.voi)
