"""Write NIH ChestX-ray14 in its exact on-disk layout (``specs/datasets.md`` §7).

* :func:`write_nih14` lays out any list of :class:`NIHItem` as ``Data_Entry_2017_v2020.csv`` (or
  the 2017 file with its trailing commas), ``BBox_List_2017.csv``, ``train_val_list.txt`` /
  ``test_list.txt`` and the PNGs under ``images/`` or Kaggle's ``images_0NN/images/``;
* :func:`write_nih14_fixture` writes the tiny test fixture of §7.7 (made-up ids matching
  ``^\\d{8}_\\d{3}\\.png$``, procedurally drawn pixels); :data:`FIXTURE_IMAGES` says what each image
  exercises.

The CSV headers are written byte for byte as NIH does: the bracketed names keep their inner
commas unquoted (``OriginalImage[Width,Height]``), which is exactly the trap a loader must handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.datamodules.demo._util import fmt_float, rng_for
from medvlp.datamodules.demo.chexpert import toy_radiograph

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


FIXTURE_IMAGES = {
    "00000001_000-002": "one patient, three follow-ups (patient-level val split), multi-label, No Finding",
    "00000002_000": "train_val image with a Mass and a Nodule box, Kaggle nesting images_001/images/",
    "00000003_000": "RGBA PNG (gray in RGB, opaque alpha)",
    "00000004_000": "AP view; Pleural_Thickening (underscore) and Hernia",
    "00000005_000": "Emphysema|Fibrosis, images_002/images/",
    "00000006_000": "test image with an 'Infiltrate' box and an Atelectasis box, float coordinates",
    "00000006_001": "test image with a Pneumothorax box",
    "00000007_000": "test, No Finding",
    "00000008_000": "test, Edema|Consolidation|Pneumonia with a Pneumonia box",
    "00000009_000": "in Data_Entry but in neither split list (ignored)",
}


def fixture_items(seed: int = 0) -> list[NIHItem]:
    """The images of :func:`write_nih14_fixture` (see :data:`FIXTURE_IMAGES`); 64 x 48 (W x H)."""
    h, w = 48, 64

    def img(i: int) -> np.ndarray:
        return toy_radiograph(rng_for(seed, 71, i), h, w)

    k1 = "images_001/images"
    return [
        NIHItem("00000001_000.png", img(0), ["Cardiomegaly"], age=57, gender="M"),
        NIHItem("00000001_001.png", img(1), ["Effusion", "Infiltration"], age=58, gender="M"),
        NIHItem("00000001_002.png", img(2), [], age=58, gender="M"),
        NIHItem("00000002_000.png", img(3), ["Mass", "Nodule"], age=81, gender="F", folder=k1,
                boxes=[("Mass", 8.0, 4.0, 16.0, 12.0), ("Nodule", 40.5, 20.25, 6.5, 6.0)]),
        NIHItem("00000003_000.png", img(4), [], age=30, gender="F", rgba=True),
        NIHItem("00000004_000.png", img(5), ["Pleural_Thickening", "Hernia"], age=66, view="AP"),
        NIHItem("00000005_000.png", img(6), ["Emphysema", "Fibrosis"], age=72, folder="images_002/images"),
        NIHItem("00000006_000.png", img(7), ["Infiltration", "Atelectasis"], split="test", folder=k1,
                boxes=[("Infiltrate", 12.372881355932, 10.0, 20.5, 14.75), ("Atelectasis", 30.0, 28.0, 18.0, 10.0)]),
        NIHItem("00000006_001.png", img(8), ["Pneumothorax"], split="test", view="AP",
                boxes=[("Pneumothorax", 2.0, 2.0, 24.0, 20.0)]),
        NIHItem("00000007_000.png", img(9), [], split="test", gender="F"),
        NIHItem("00000008_000.png", img(10), ["Edema", "Consolidation", "Pneumonia"], split="test",
                boxes=[("Pneumonia", 34.0, 6.0, 22.0, 30.0)]),
        NIHItem("00000009_000.png", img(11), ["Atelectasis"], split=""),
    ]  # fmt: skip


def write_nih14_fixture(root: str | Path, seed: int = 0, variant: str = "both") -> Path:
    """Write the ChestX-ray14 test fixture (12 PNGs, ~25 kB) into ``root``; returns ``root``.

    ``variant="both"`` writes ``Data_Entry_2017_v2020.csv`` and also the trailing-comma
    ``Data_Entry_2017.csv`` of the same images (a loader picks one: ``data.data_entry``).
    """
    items = fixture_items(seed)
    if variant == "both":
        write_nih14(root, items, variant="2017")
        variant = "v2020"
    return write_nih14(root, items, variant=variant)
