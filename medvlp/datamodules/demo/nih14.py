"""Write NIH ChestX-ray14 in its exact on-disk layout (``specs/datasets.md`` §7).

:func:`write_nih14` lays out any list of :class:`NIHItem` as ``Data_Entry_2017_v2020.csv`` (or
the 2017 file with its trailing commas), ``BBox_List_2017.csv``, ``train_val_list.txt`` /
``test_list.txt`` and the PNGs under ``images/`` or Kaggle's ``images_0NN/images/``. The tiny test
fixture of §7.7 (``write_nih14_fixture``) lives in ``tests/format_fixtures.py``.

The CSV headers are written byte for byte as NIH does: the bracketed names keep their inner
commas unquoted (``OriginalImage[Width,Height]``), which is exactly the trap a loader must handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.datamodules.demo._util import fmt_float

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
]  # fmt: skip
BOX_FILE_LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]


@dataclass
class NIHItem:
    """One ChestX-ray14 image.

    ``boxes`` are ``(label, x, y, w, h)`` in the pixels of ``image``, the label spelled as in
    ``BBox_List_2017.csv`` (``Infiltrate``).
    """

    image_index: str  # <patient 8 digits>_<follow-up 3 digits>.png
    image: np.ndarray  # uint8 [H, W]
    findings: list[str] = field(default_factory=list)  # [] = "No Finding"
    split: str = "train_val"  # train_val | test | "" (listed in neither file)
    age: int = 50
    gender: str = "M"  # M | F
    view: str = "PA"  # PA | AP
    boxes: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    folder: str = "images"  # images | images_0NN/images (Kaggle nesting)
    rgba: bool = False  # store as RGBA (gray in RGB, opaque alpha)
    original_size: tuple[int, int] = (2500, 2048)  # OriginalImage[Width,Height] of the source DICOM
    spacing: float = 0.143  # OriginalImagePixelSpacing[x,y]


def write_nih14(root: str | Path, items: list[NIHItem], variant: str = "v2020") -> Path:
    """Write ``items`` as a ChestX-ray14 download into ``root``.

    Args:
        root: dataset folder.
        items: images in ``Data_Entry`` order.
        variant: ``v2020`` (``Data_Entry_2017_v2020.csv``) or ``2017`` (``Data_Entry_2017.csv``, every
            line ending in a comma). The other file, if present, is left alone.

    Returns:
        ``root``.
    """
    if variant not in ("v2020", "2017"):
        raise ValueError(f"variant must be v2020 or 2017, got {variant!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    end = "," if variant == "2017" else ""
    entry, bbox, lists = [DATA_ENTRY_HEADER + end], [BBOX_HEADER], {"train_val": [], "test": []}
    for it in items:
        img = np.asarray(it.image)
        if img.dtype != np.uint8 or img.ndim != 2:
            raise ValueError(f"NIHItem.image must be uint8 [H, W], got {img.dtype} {img.shape}")
        unknown = [f for f in it.findings if f not in NIH_LABELS]
        if unknown:
            raise ValueError(f"{it.image_index}: unknown findings {unknown}")
        path = root / it.folder / it.image_index
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(np.stack([img, img, img, np.full_like(img, 255)], -1), "RGBA") if it.rgba else Image.fromarray(img, "L")
        pil.save(path)
        patient, follow_up = it.image_index.removesuffix(".png").split("_")
        findings = "|".join(it.findings) or "No Finding"
        w, h = it.original_size
        entry.append(f"{it.image_index},{findings},{int(follow_up)},{int(patient)},{it.age},{it.gender},{it.view},"
                     f"{w},{h},{it.spacing},{it.spacing}{end}")  # fmt: skip
        for label, x, y, bw, bh in it.boxes:
            if label not in BOX_FILE_LABELS:
                raise ValueError(f"{it.image_index}: box label {label!r} is not one of {BOX_FILE_LABELS}")
            bbox.append(f"{it.image_index},{label},{fmt_float(x, 15)},{fmt_float(y, 15)},{fmt_float(bw, 15)},{fmt_float(bh, 15)},,,")
        if it.split:
            lists[it.split].append(it.image_index)
    name = "Data_Entry_2017_v2020.csv" if variant == "v2020" else "Data_Entry_2017.csv"
    (root / name).write_text("\n".join(entry) + "\n", encoding="utf-8")
    (root / "BBox_List_2017.csv").write_text("\n".join(bbox) + "\n", encoding="utf-8")
    (root / "train_val_list.txt").write_text("".join(n + "\n" for n in lists["train_val"]), encoding="utf-8")
    (root / "test_list.txt").write_text("".join(n + "\n" for n in lists["test"]), encoding="utf-8")
    return root
