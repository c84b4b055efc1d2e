"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2), read as Kaggle distributes it.

Official files (``specs/datasets.md`` §3): ``stage_2_train_labels.csv`` (one row per box, blank
coordinates for negative images, coordinates in pixels of the 1024 x 1024 image),
``stage_2_detailed_class_info.csv`` (the same multiplicity, duplicated per box) and the flat folder
``stage_2_train_images/<patientId>.dcm`` (8-bit Secondary Captures, often JPEG Baseline compressed,
decoded by :func:`~medvlp.datamodules.formats.dicom.read_dicom`).

Config keys: see :class:`RSNAConfig` (``configs/data/rsna_pneumonia.yaml``).

One record per image (= per ``patientId``), with the label ``Pneumonia`` (1 when the image has at
least one box). ``data.task`` picks the targets returned by ``load_sample``:

* ``classification``: the label only;
* ``detection``: ``Record.boxes`` ``[N, 4]`` ``(x1, y1, x2, y2)`` in the DICOM's own pixels (the CSV's
  1024-pixel coordinates are scaled by ``Columns / 1024`` and ``Rows / 1024`` when the file is not
  1024 x 1024; every box is kept) and ``box_labels`` (all 0 = ``Pneumonia``); negatives get empty
  ``[0, 4]`` arrays;
* ``segmentation``: ``Record.mask`` = the union of the filled boxes (as MGCA and BenchX do; RSNA
  has no pixel masks). A pixel belongs to a box when its centre lies inside it.

Splits (``data.split_protocol``), on the images of the labels CSV sorted by ``patientId`` (the
order of MGCA's ``groupby``), seeded by ``data.split_seed`` (MGCA: 0):

* ``mgca_cls`` (MGCA ``preprocess_rsna_data``): 30 % held out, halved into test and val: 70/15/15;
* ``mgca_det`` (MGCA ``prepare_detection_data``, also used by its RSNA segmentation): a hold-out of
  ``round(n * 10674 / 26684)`` images, halved into test and val. On the full stage-2 train set
  (26,684 images) this is MGCA's fixed ``2 x 5337``: 16,010 / 5,337 / 5,337;
* ``auto`` (default): ``mgca_det`` for detection and segmentation, ``mgca_cls`` for classification.

Splits are drawn from every image of the CSV *before* missing DICOMs are dropped, so a missing
file never moves another image to another split.

Differences from the official code (MGCA ``mgca/preprocess/rsna.py``,
``mgca/datasets/{classification,detection,segmentation}_dataset.py``):
    * Images are letterboxed (longest side resized, centre pad) by
      :class:`~medvlp.datamodules.transforms.CXRTransform`; MGCA's detection resizes to a square
      non-uniformly and normalises boxes by W/H; here boxes stay in pixels of the transformed image.
    * Pixels: per-image min-max of the stored values (with the file's VOI when it has one, and
      MONOCHROME1 inverted); for these 8-bit files with a black pixel this equals MGCA's
      ``convertScaleAbs(x, 255 / x.max())``.
    * Boxes are in the DICOM's own pixel frame (MGCA assumes 1024 everywhere).
    * The hold-out of ``mgca_det`` is written as a fraction so that subsets still split; it equals
      MGCA's count on the full data.
    * Images without a DICOM are counted when records are built (error, or skipped with
      ``data.on_error=skip``) instead of failing at the first batch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlp.config import bounded
from medvlp.datamodules.base import DataConfig, DataError, Record
from medvlp.datamodules.radiograph import (
    RadiographConfig,
    RadiographDataModule,
    check_choice,
    read_table,
    shuffle_split,
)
from medvlp.registry import register_datamodule

if TYPE_CHECKING:  # heavy imports stay inside functions (base.py: check_root must not pay for them)
    import pandas as pd

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
LABEL_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]
CLASSES = ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
FRAME = 1024  # the CSV's coordinates are pixels of the 1024 x 1024 image
MGCA_DET_HOLDOUT = (2 * 5337, 26684)  # MGCA holds out 2 x 5337 of the 26,684 stage-2 train images
TASKS = ("classification", "detection", "segmentation")
SPLIT_PROTOCOLS = ("auto", "mgca_cls", "mgca_det")
SPLITS = ("train", "val", "test")
VOI = ("auto", "none")


@dataclass
class RSNAConfig(RadiographConfig):
    """``data.*`` keys of the RSNA Pneumonia datamodule (``configs/data/rsna_pneumonia.yaml``)."""

    name: str = "rsna_pneumonia"
    task: str = "classification"  # classification | detection | segmentation (targets returned)
    split_protocol: str = "auto"  # auto | mgca_cls (70/15/15) | mgca_det (MGCA's detection hold-out)
    split_seed: int = bounded(0, ge=0, le=2**32 - 1)  # random_state of the splits (MGCA: 0)
    voi: str = "auto"  # DICOM VOI LUT / window: auto (apply when present) | none


def mgca_split(n: int, holdout: float | int, seed: int) -> dict[str, np.ndarray]:
    """Indices of MGCA's two-stage split of ``n`` items.

    ``train_test_split(df, test_size=holdout, random_state=seed)`` gives train and a hold-out;
    ``train_test_split(holdout_df, test_size=0.5, random_state=seed)`` gives (test, val), in that
    order. Each part keeps the permutation order scikit-learn returns.

    Raises:
        ValueError: when ``n`` is too small for every part to be non-empty.
    """
    train, rest = shuffle_split(n, holdout, seed)
    if len(rest) < 2:
        raise ValueError(f"cannot split {n} items into train / val / test with a hold-out of {holdout}")
    test_part, val_part = shuffle_split(len(rest), 0.5, seed)
    return {"train": train, "val": rest[val_part], "test": rest[test_part]}


def fill_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width]`` mask of the union of ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.

    Coordinates are continuous pixel coordinates (origin at the top-left corner of the top-left
    pixel); a pixel is inside when its centre is: columns ``ceil(x1 - 0.5) .. ceil(x2 - 0.5) - 1``.
    For integer coordinates that is ``mask[y1:y2, x1:x2]`` (MGCA's rule).
    """
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, c1 = max(0, math.ceil(x1 - 0.5)), min(int(width), math.ceil(x2 - 0.5))
        r0, r1 = max(0, math.ceil(y1 - 0.5)), min(int(height), math.ceil(y2 - 0.5))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = 1
    return mask


@dataclass(frozen=True)
class BoxMask:
    """Picklable ``Record.mask``: the filled boxes of one image (``(x1, y1, x2, y2)``, original pixels)."""

    boxes: tuple[tuple[float, float, float, float], ...] = ()

    def __call__(self, height: int, width: int) -> np.ndarray:
        return fill_boxes(np.array(self.boxes, dtype=np.float64).reshape(-1, 4), height, width)


def _list_stems(folder: Path, suffix: str) -> dict[str, str]:
    """``{file stem: path}`` of the files of a flat folder whose name ends with ``suffix`` (any case)."""
    out: dict[str, str] = {}
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.lower().endswith(suffix) and entry.is_file():
                    out[entry.name[: -len(suffix)]] = entry.path
    except FileNotFoundError as err:
        raise DataError(f"Folder {folder} does not exist.") from err
    return out


@register_datamodule("rsna_pneumonia")
class RSNAPneumoniaDataModule(RadiographDataModule):
    """RSNA Pneumonia Detection Challenge (stage 2 train set): pneumonia label, boxes, box masks.

    See the module docstring for tasks, splits and the differences from MGCA.
    """

    Config = RSNAConfig
    modality = "2d"
    default_prompts = "cxr.yaml"
    demo_kind = "rsna"  # data.root=demo: the synthetic world of demo/downstream.py
    label_names = ["Pneumonia"]
    box_label_names = ["Pneumonia"]
    EXPECTED_LAYOUT = """\
<root>/                                    the Kaggle rsna-pneumonia-detection-challenge download
  stage_2_train_labels.csv                 patientId,x,y,width,height,Target (one row per box)
  stage_2_detailed_class_info.csv          patientId,class (optional; attached as meta)
  stage_2_train_images/<patientId>.dcm     flat, one DICOM per patientId
  stage_2_test_images/, stage_2_sample_submission.csv   (not used)
"""

    def __init__(self, cfg: RSNAConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        check_choice("data.task", cfg.task, TASKS)
        check_choice("data.split_protocol", cfg.split_protocol, SPLIT_PROTOCOLS)
        check_choice("data.voi", cfg.voi, VOI)
        self.label_names = list(type(self).label_names)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        cls.require(cfg, files=(LABELS_CSV,), dirs=(IMAGE_DIR,))

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    @property
    def protocol(self) -> str:
        """The split protocol in use (``auto`` resolved by ``data.task``)."""
        if self.cfg.split_protocol != "auto":
            return self.cfg.split_protocol
        return "mgca_cls" if self.cfg.task == "classification" else "mgca_det"

    def split_key(self) -> str:
        """Names the label-fraction file: the resolved protocol (``auto`` gives classification and detection /
        segmentation different train splits, so a fraction drawn for one must not be read back for the other)."""
        return f"{type(self).__name__}|{self.protocol}"

    # ------------------------------------------------------------------ tables
    def images(self) -> pd.DataFrame:
        """One row per image, sorted by patientId: ``patient_id``, ``target`` (0/1), ``boxes``
        (float64 ``[N, 4]`` x1, y1, x2, y2 in the CSV's 1024 frame) and ``cls`` (detailed class or None)."""
        if "images" in self._tables:
            return self._tables["images"]
        import pandas as pd

        path = self.root / LABELS_CSV
        df = read_table(path, LABEL_COLUMNS)
        df["patientId"] = df["patientId"].str.strip()
        if df["patientId"].isna().any():
            raise DataError(f"{path} has a row without patientId (line {int(df['patientId'].isna().to_numpy().argmax()) + 2}).")
        target = pd.to_numeric(df["Target"], errors="coerce")
        bad = ~target.isin([0, 1])
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise DataError(f"{path} line {i + 2} (patientId {df['patientId'].iloc[i]}) has Target={df['Target'].iloc[i]!r}; expected 0 or 1.")
        coords = df[["x", "y", "width", "height"]].apply(pd.to_numeric, errors="coerce")
        unparsable = (coords.isna() & df[["x", "y", "width", "height"]].notna()).any(axis=1)
        pos = target == 1
        incomplete = pos & coords.isna().any(axis=1)
        negative_with_box = ~pos & coords.notna().any(axis=1)
        empty = pos & ~incomplete & ((coords["width"] <= 0) | (coords["height"] <= 0))
        for flags, problem in (
            (unparsable, "a coordinate that is not a number"),
            (incomplete, "Target=1 but a blank coordinate (positive rows need x, y, width, height)"),
            (negative_with_box, "Target=0 but coordinates (negative rows have blank x, y, width, height)"),
            (empty, "a box with width or height <= 0"),
        ):
            if flags.any():
                i = int(flags.to_numpy().argmax())
                raise DataError(f"{path} line {i + 2} (patientId {df['patientId'].iloc[i]}) has {problem}: {df.iloc[i].tolist()}.")
        mixed = target.groupby(df["patientId"]).nunique() > 1
        if mixed.any():
            raise DataError(f"{path} has both Target=0 and Target=1 rows for patientId {mixed[mixed].index[0]}.")
        xy = coords.to_numpy(dtype=np.float64)
        box = np.stack([xy[:, 0], xy[:, 1], xy[:, 0] + xy[:, 2], xy[:, 1] + xy[:, 3]], axis=1)
        boxes: dict[str, list[np.ndarray]] = {}
        for pid, is_pos, b in zip(df["patientId"], pos.to_numpy(), box, strict=True):
            rows = boxes.setdefault(pid, [])
            if is_pos:
                rows.append(b)
        ids = sorted(boxes)
        table = pd.DataFrame({
            "patient_id": ids,
            "boxes": [np.array(boxes[i], dtype=np.float64).reshape(-1, 4) for i in ids],
        })
        table["target"] = [int(len(b) > 0) for b in table["boxes"]]
        table["cls"] = table["patient_id"].map(self.class_info())
        known = table["cls"].notna()
        disagree = known & ((table["cls"] == "Lung Opacity") != (table["target"] == 1))
        if disagree.any():
            log.warning("rsna_pneumonia: %d images disagree between Target and class 'Lung Opacity' (first: %s); "
                        "labels follow Target", int(disagree.sum()), table.loc[disagree, "patient_id"].iloc[0])
        self._tables["images"] = table
        return table

    def class_info(self) -> dict[str, str]:
        """patientId -> detailed class from ``stage_2_detailed_class_info.csv`` (duplicates dropped);
        empty when the file is absent."""
        path = self.root / CLASS_INFO_CSV
        if not path.is_file():
            log.info("rsna_pneumonia: no %s; records carry no detailed class", path)
            return {}
        df = read_table(path, ["patientId", "class"])[["patientId", "class"]].drop_duplicates()
        df["patientId"] = df["patientId"].str.strip()
        dup = df["patientId"].duplicated()
        if dup.any():
            pid = df.loc[dup, "patientId"].iloc[0]
            raise DataError(f"{path} gives patientId {pid} several classes: {sorted(df.loc[df['patientId'] == pid, 'class'])}.")
        unknown = sorted(set(df["class"].dropna()) - set(CLASSES))
        if unknown:
            raise DataError(f"{path} has class(es) {unknown}; expected one of {list(CLASSES)}.")
        return dict(zip(df["patientId"], df["class"], strict=True))

    def split_indices(self) -> dict[str, np.ndarray]:
        """Row indices of :meth:`images` per split under the split protocol."""
        key = f"split:{self.protocol}:{self.cfg.split_seed}"
        if key not in self._tables:
            n = len(self.images())
            holdout: float | int = 0.15 * 2
            if self.protocol == "mgca_det":
                holdout = int(round(n * MGCA_DET_HOLDOUT[0] / MGCA_DET_HOLDOUT[1]))
            try:
                self._tables[key] = mgca_split(n, holdout, int(self.cfg.split_seed))
            except ValueError as err:
                raise DataError(f"{self.root / LABELS_CSV}: {n} images are too few for the {self.protocol} split ({err}).") from err
        return self._tables[key]

    def dicoms(self) -> dict[str, str]:
        """patientId -> path of every ``.dcm`` in ``stage_2_train_images/`` (listed once)."""
        if "dicoms" not in self._tables:
            self._tables["dicoms"] = _list_stems(self.root / IMAGE_DIR, ".dcm")
        return self._tables["dicoms"]

    # ------------------------------------------------------------------ contract
    def _dicom_frame(self, path: str) -> tuple[int, int]:
        from medvlp.datamodules.formats.dicom import read_dicom_header

        head = read_dicom_header(path, ["Rows", "Columns"])
        if not head["Rows"] or not head["Columns"]:
            raise DataError(f"DICOM file {path} has no Rows/Columns; cannot place its boxes.")
        return int(head["Rows"]), int(head["Columns"])

    def build_records(self, split: str) -> list[Record]:
        check_choice("split", split, SPLITS)
        self.check_root(self.cfg)
        table = self.images()
        rows = table.iloc[self.split_indices()[split]]
        dicoms = self.dicoms()
        if "unlisted" not in self._tables:
            unlisted = sorted(set(dicoms) - set(table["patient_id"]))
            self._tables["unlisted"] = unlisted
            if unlisted:
                log.info("rsna_pneumonia: %d DICOMs in %s have no row in %s (ignored; first: %s)",
                         len(unlisted), IMAGE_DIR, LABELS_CSV, unlisted[0])
        self.counts["unlisted_dicoms"] = len(self._tables["unlisted"])
        missing = [pid for pid in rows["patient_id"] if pid not in dicoms]
        self.drop_items(
            "missing_dicom", missing,
            f"{len(missing)} of {len(rows)} {split} images listed in {self.root / LABELS_CSV} have no DICOM "
            f"(first: {self.root / IMAGE_DIR / (missing[0] + '.dcm') if missing else ''})", split,
            {m: f"{self.root / IMAGE_DIR / (m + '.dcm')} (listed in {LABELS_CSV}) does not exist" for m in missing},
        )
        want_boxes = self.cfg.task in ("detection", "segmentation")
        records: list[Record] = []
        unreadable: list[str] = []
        first_error: DataError | None = None
        for pid, boxes, target, cls in zip(rows["patient_id"], rows["boxes"], rows["target"], rows["cls"], strict=True):
            path = dicoms.get(pid)
            if path is None:
                continue
            meta = {"patient_id": pid, "class": None if isinstance(cls, float) else cls, "n_boxes": len(boxes), "split": split}
            rec = Record(pid, path, "", np.array([float(target)], dtype=np.float32), meta)
            if want_boxes:
                b = np.zeros((0, 4), dtype=np.float32)
                if len(boxes):
                    try:
                        height, width = self._dicom_frame(path)
                    except DataError as err:
                        unreadable.append(path)
                        first_error = first_error or err
                        if self.cfg.on_error != "skip":
                            raise
                        self.note_dropped(split, pid, str(err))
                        continue
                    b = (boxes * np.array([width, height, width, height]) / FRAME).astype(np.float32)
                    meta["frame"] = (height, width)
                if self.cfg.task == "detection":
                    rec.boxes, rec.box_labels = b, np.zeros(len(b), dtype=np.int64)
                else:
                    rec.mask = BoxMask(tuple(tuple(float(v) for v in box) for box in b))
            records.append(rec)
        self.counts["unreadable_dicom"] = self.counts.get("unreadable_dicom", 0) + len(unreadable)
        if unreadable:
            log.warning("rsna_pneumonia %s: skipped %d unreadable DICOMs (first: %s)", split, len(unreadable), first_error)
        log.info("rsna_pneumonia %s (%s): %d images, %d with pneumonia", split, self.protocol, len(records),
                 sum(int(r.labels[0]) for r in records))
        return records

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        from medvlp.datamodules.formats.dicom import read_dicom

        return read_dicom(record.image_path, voi=self.cfg.voi)
