"""Object-CXR (MIDL 2020 foreign-object challenge, JF Healthcare), read as distributed.

Official files (``specs/datasets.md`` §5): ``train.csv`` and ``dev.csv`` (``image_name,annotation``),
``test.csv`` (``image_path,annotation``, e.g. ``test/09001.jpg``), and the JPGs ``train/``, ``dev/``,
``test/`` (variable sizes). An annotation is empty for an object-free image (NaN after reading);
otherwise objects separated by ``;``, each ``TYPE x1 y1 x2 y2 ...`` in pixels of the original
image: type ``0`` rectangle and ``1`` ellipse give their bounding box (upper-left, lower-right),
type ``2`` a polygon ``x1 y1 ... xn yn``. Coordinates are continuous pixel coordinates with the
origin at the top-left corner of the image.

Config keys: see :class:`ObjectCXRConfig` (``configs/data/object_cxr.yaml``).

One record per image, label ``Foreign object`` (1 when the annotation has an object).
``data.task``: ``detection`` (default) adds ``Record.boxes`` (one box per object: its bounding box,
original pixels) with ``box_labels`` 0; ``segmentation`` adds ``Record.mask`` (rectangles,
ellipses and polygons rasterised: a pixel is inside when its centre is); ``classification``
returns the label only.

Splits (``data.split_protocol``, seeded by ``data.split_seed``):

* ``mgca`` (default, MGCA ``mgca/preprocess/object_cxr.py``): ``train.csv`` split 90/10 in file
  order (``train_test_split(test_size=0.1, random_state=0)``) into train / val; ``dev.csv`` is test;
* ``official`` (BenchX): train = ``train.csv``, val = ``dev.csv``, test = ``test.csv`` (needs the
  released test annotations).

JPEGs are decoded with DCT-domain downscaling towards ``data.image_size``; the base class
(:meth:`~medvlp.datamodules.radiograph.RadiographDataModule.load_sample`) scales boxes from the
original pixels to the decoded ones and rasterises the shapes at the decoded size
(:meth:`ShapeMask.scaled`) before the letterbox transform.

Differences from the official code:
    * MGCA builds a type-2 box around the polygon's pole of inaccessibility (shapely ``polylabel``
      on a 100-px buffer), a larger box centred elsewhere; here a polygon's box is its bounding box
      (no shapely dependency; the box then covers exactly the annotated object).
    * MGCA parses each object by slicing off its first two characters and keeps boxes as
      ``(x, y, w, h)``; here objects are tokenised and malformed ones are reported (DataError naming
      the CSV and the image, or skipped and counted with ``data.on_error=skip``).
    * BenchX resizes non-uniformly to 512 x 512 and draws ellipses as rectangles; here images are
      letterboxed and ellipses rasterised as ellipses.
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
from medvlp.datamodules.base import DataConfig, DataError, DataRootError, Record
from medvlp.datamodules.radiograph import (
    RadiographConfig,
    RadiographDataModule,
    check_choice,
    read_gray,
    read_table,
    shuffle_split,
)
from medvlp.registry import register_datamodule

if TYPE_CHECKING:  # heavy imports stay inside functions (base.py: check_root must not pay for them)
    import pandas as pd

log = logging.getLogger(__name__)

TASKS = ("classification", "detection", "segmentation")
SPLIT_PROTOCOLS = ("mgca", "official")
SPLITS = ("train", "val", "test")
SHAPE_NAMES = {0: "rectangle", 1: "ellipse", 2: "polygon"}
MGCA_VAL_FRACTION = 0.1


@dataclass
class ObjectCXRConfig(RadiographConfig):
    """``data.*`` keys of the Object-CXR datamodule (``configs/data/object_cxr.yaml``)."""

    name: str = "object_cxr"
    task: str = "detection"  # detection (boxes) | segmentation (mask) | classification (label only)
    split_protocol: str = "mgca"  # mgca: train.csv 90/10 -> train/val, dev.csv -> test | official: train/dev/test.csv
    split_seed: int = bounded(0, ge=0, le=2**32 - 1)  # random_state of the mgca 90/10 split (MGCA: 0)


@dataclass(frozen=True)
class Shape:
    """One annotated object: ``kind`` 0 rectangle / 1 ellipse (``coords`` = x1, y1, x2, y2) or
    2 polygon (``coords`` = x1, y1, ..., xn, yn), in original pixels."""

    kind: int
    coords: tuple[float, ...]

    def box(self) -> tuple[float, float, float, float]:
        """The bounding box ``(x1, y1, x2, y2)``."""
        xs, ys = self.coords[0::2], self.coords[1::2]
        return min(xs), min(ys), max(xs), max(ys)


def parse_annotation(text: Any) -> list[Shape]:
    """Objects of one ``annotation`` cell; ``[]`` for an empty cell (NaN, ``""``).

    Raises:
        ValueError: an unknown type, a non-integer value, or a wrong number of coordinates (the
            message names the object).
    """
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return []
    shapes = []
    for k, obj in enumerate(str(text).split(";")):
        tokens = obj.split()
        if not tokens:
            continue  # a trailing ';'
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise ValueError(f"object {k} '{obj.strip()}' has a value that is not a number") from None
        kind, coords = values[0], tuple(values[1:])
        if kind not in (0, 1, 2):
            raise ValueError(f"object {k} '{obj.strip()}' has type {tokens[0]}; expected 0 (rectangle), 1 (ellipse) or 2 (polygon)")
        kind = int(kind)
        if kind in (0, 1) and len(coords) != 4:
            raise ValueError(f"object {k} ({SHAPE_NAMES[kind]}) has {len(coords)} coordinates; expected 4 (x1 y1 x2 y2)")
        if kind == 2 and (len(coords) < 6 or len(coords) % 2):
            raise ValueError(f"object {k} (polygon) has {len(coords)} coordinates; expected pairs of at least 3 points")
        shapes.append(Shape(kind, coords))
    return shapes


def _pixel_range(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Indices ``[a, b)`` of the pixels whose centre ``i + 0.5`` lies in ``[lo, hi)``."""
    return max(0, math.ceil(lo - 0.5)), min(int(size), math.ceil(hi - 0.5))


def rasterise(shapes: list[Shape] | tuple[Shape, ...], height: int, width: int, sx: float = 1.0,
              sy: float = 1.0) -> np.ndarray:
    """uint8 ``[height, width]`` union mask of ``shapes`` whose coordinates are scaled by ``(sx, sy)``.

    A pixel is inside when its centre is: rectangles ``[x1, x2) x [y1, y2)``, ellipses inscribed in
    their box, polygons by the even-odd rule.
    """
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    for shape in shapes:
        xs = np.asarray(shape.coords[0::2], dtype=np.float64) * sx
        ys = np.asarray(shape.coords[1::2], dtype=np.float64) * sy
        c0, c1 = _pixel_range(xs.min(), xs.max(), width)
        r0, r1 = _pixel_range(ys.min(), ys.max(), height)
        if c1 <= c0 or r1 <= r0:
            continue
        if shape.kind == 0:
            mask[r0:r1, c0:c1] = 1
            continue
        py, px = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 0.5
        if shape.kind == 1:
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            ax, ay = (xs.max() - xs.min()) / 2, (ys.max() - ys.min()) / 2
            inside = ((px - cx) / ax) ** 2 + ((py - cy) / ay) ** 2 <= 1.0
        else:
            inside = np.zeros(px.shape, dtype=bool)
            for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(np.roll(xs, -1), np.roll(ys, -1))):
                if y0 == y1:
                    continue
                crosses = (y0 > py) != (y1 > py)
                x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
                inside ^= crosses & (px < x_at)
        mask[r0:r1, c0:c1] |= inside.astype(np.uint8)
    return mask


@dataclass(frozen=True)
class ShapeMask:
    """Picklable ``Record.mask``: the rasterised objects of one image (original pixels)."""

    shapes: tuple[Shape, ...] = ()

    def __call__(self, height: int, width: int) -> np.ndarray:
        return rasterise(self.shapes, height, width)

    def scaled(self, height: int, width: int, sx: float, sy: float) -> np.ndarray:
        """The mask of an image decoded at a different size (coordinates scaled by ``sx``, ``sy``);
        ``RadiographDataModule.load_sample`` calls it instead of a nearest resize."""
        return rasterise(self.shapes, height, width, sx, sy)


@register_datamodule("object_cxr")
class ObjectCXRDataModule(RadiographDataModule):
    """Object-CXR foreign objects: label, boxes (rectangles, ellipses, polygons) and masks.

    See the module docstring for the annotation format, splits and differences from MGCA / BenchX.
    """

    Config = ObjectCXRConfig
    modality = "2d"
    default_prompts = ""  # no zero-shot prompt set for foreign objects
    demo_kind = "object_cxr"  # data.root=demo: the synthetic world of demo/downstream.py
    label_names = ["Foreign object"]
    box_label_names = ["Foreign object"]
    EXPECTED_LAYOUT = """\
<root>/                                    the Object-CXR release (Google Drive / Kaggle mirror)
  train.csv   dev.csv                      image_name,annotation   (00001.jpg, '0 x1 y1 x2 y2;2 x1 y1 ...')
  test.csv                                 image_path,annotation   (test/09001.jpg; data.split_protocol=official)
  train/00001.jpg ... train/08000.jpg
  dev/08001.jpg ... dev/09000.jpg
  test/09001.jpg ... test/10000.jpg
"""

    def __init__(self, cfg: ObjectCXRConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)
        check_choice("data.task", cfg.task, TASKS)
        check_choice("data.split_protocol", cfg.split_protocol, SPLIT_PROTOCOLS)
        self.label_names = list(type(self).label_names)
        self._tables: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout
    @classmethod
    def _needed(cls, cfg: DataConfig) -> list[str]:
        names = ["train", "dev"]
        if getattr(cfg, "split_protocol", "mgca") == "official":
            names.append("test")
        return names

    @classmethod
    def check_root(cls, cfg: DataConfig) -> None:
        super().check_root(cfg)
        root = Path(cfg.root)
        for name in cls._needed(cfg):
            if not (root / f"{name}.csv").is_file():
                raise DataRootError(cls.root_message(cfg.root, f"has no {name}.csv"))
            if not (root / name).is_dir():
                raise DataRootError(cls.root_message(cfg.root, f"has no {name}/ folder"))

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    # ------------------------------------------------------------------ tables
    def table(self, name: str) -> pd.DataFrame:
        """``<name>.csv`` (train | dev | test) as ``image`` (name in the folder), ``path``,
        ``annotation`` (NaN = empty), in file order."""
        if name in self._tables:
            return self._tables[name]
        path = self.root / f"{name}.csv"
        column = "image_path" if name == "test" else "image_name"
        df = read_table(path, [column])
        if "annotation" not in df.columns:
            hint = (" The test annotations were released after the challenge; use a copy that has them, or "
                    "data.split_protocol=mgca (test = dev.csv).") if name == "test" else ""
            raise DataError(f"{path} lacks the column 'annotation'; found {list(df.columns)}.{hint}")
        if df[column].isna().any():
            raise DataError(f"{path} line {int(df[column].isna().to_numpy().argmax()) + 2} has no {column}.")
        names = df[column].str.strip()
        if name == "test":  # test/09001.jpg, relative to the root
            paths = [str(self.root / p) for p in names]
            names = names.map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1])
        else:
            paths = [str(self.root / name / n) for n in names]
        out = df[["annotation"]].copy()
        out.insert(0, "path", paths)
        out.insert(0, "image", list(names))
        dup = out["image"].duplicated()
        if dup.any():
            raise DataError(f"{path} lists {out.loc[dup, 'image'].iloc[0]} more than once.")
        self._tables[name] = out.reset_index(drop=True)
        return self._tables[name]

    def split_table(self, split: str) -> tuple[pd.DataFrame, str]:
        """Rows of ``split`` and the CSV they come from."""
        if self.cfg.split_protocol == "official":
            name = {"train": "train", "val": "dev", "test": "test"}[split]
            return self.table(name), name
        if split == "test":
            return self.table("dev"), "dev"
        df = self.table("train")
        try:
            train, val = shuffle_split(len(df), MGCA_VAL_FRACTION, int(self.cfg.split_seed))
        except ValueError as err:
            raise DataError(f"{self.root / 'train.csv'}: {len(df)} images are too few for the 90/10 split ({err}).") from err
        return df.iloc[train if split == "train" else val], "train"

    # ------------------------------------------------------------------ contract
    def build_records(self, split: str) -> list[Record]:
        check_choice("split", split, SPLITS)
        self.check_root(self.cfg)
        rows, name = self.split_table(split)
        csv = self.root / f"{name}.csv"
        parsed: list[tuple[str, str, list[Shape]]] = []
        bad: dict[str, str] = {}
        for image, path, annotation in zip(rows["image"], rows["path"], rows["annotation"], strict=True):
            try:
                parsed.append((image, path, parse_annotation(annotation)))
            except ValueError as err:
                bad[image.rsplit(".", 1)[0]] = f"{csv}, image {image}: {err} (annotation {annotation!r})"
        first_bad = next(iter(bad.values()), "")
        self.drop_items("bad_annotation", list(bad), f"{len(bad)} {split} images with a malformed annotation (first: {first_bad})",
                        split, bad)
        folders: dict[str, set[str]] = {}
        missing: list[str] = []
        for _, path, _ in parsed:
            folder, file = os.path.split(path)
            if folder not in folders:
                folders[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if file not in folders[folder]:
                missing.append(path)
        self.drop_items("missing_image", [os.path.basename(m).rsplit(".", 1)[0] for m in missing],
                        f"{len(missing)} of {len(parsed)} {split} images listed in {csv} do not exist (first: "
                        f"{missing[0] if missing else ''})", split,
                        {os.path.basename(m).rsplit(".", 1)[0]: f"{m} (listed in {csv}) does not exist" for m in missing})
        absent = set(missing)
        records: list[Record] = []
        for image, path, shapes in parsed:
            if path in absent:
                continue
            study = image.rsplit(".", 1)[0]
            meta = {"image_name": image, "csv": name, "split": split, "shape_types": [s.kind for s in shapes]}
            rec = Record(study, path, "", np.array([float(bool(shapes))], dtype=np.float32), meta)
            if self.cfg.task == "detection":
                rec.boxes = np.array([s.box() for s in shapes], dtype=np.float32).reshape(-1, 4)
                rec.box_labels = np.zeros(len(shapes), dtype=np.int64)
            elif self.cfg.task == "segmentation":
                rec.mask = ShapeMask(tuple(shapes))
            records.append(rec)
        log.info("object_cxr %s (%s): %d images, %d with foreign objects", split, self.cfg.split_protocol,
                 len(records), sum(int(r.labels[0]) for r in records))
        return records

    def read_pixels(self, record: Record, train: bool) -> np.ndarray:
        return read_gray(record.image_path, draft_size=self.read_size)
