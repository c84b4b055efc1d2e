"""Write COVIDx (COVID-Net) in its exact on-disk layout (``specs/datasets.md`` §6).

* :func:`write_covidx` lays out any list of :class:`COVIDxItem` as the images under
  ``train/`` / ``val/`` / ``test/`` plus the header-less, space-separated label files: the Kaggle
  ``train.txt`` / ``val.txt`` / ``test.txt`` or the GitHub ``labels/<split>_<version>.txt``;
* :func:`write_covidx_fixture` writes the tiny test fixture of §6.6: a Kaggle-style binary release
  plus, in the same folder, a 3-class ``labels/*_COVIDx9A.txt`` pair (with a 5-token line) and a
  3-field ``labels/*_COVIDx.txt`` pair. Ids are made up but follow the real patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.datamodules.demo._util import rng_for
from medvlp.datamodules.demo.chexpert import toy_radiograph

ENCODINGS = ("gray", "rgb", "gray16")


@dataclass
class COVIDxItem:
    """One COVIDx image (one label-file line).

    ``encoding``: ``gray`` (8-bit L), ``rgb`` (the gray copied to 3 channels with a faint tint) or
    ``gray16`` (16-bit PNG holding ``image * 16``, i.e. 12-bit data as in DICOM-derived sources);
    the container (PNG / JPEG) follows the file extension.
    """

    patient_id: str  # may hold spaces in old releases ("COVID 1")
    filename: str  # e.g. "COVID(1).png", "<uuid>.png", "sub-S03044_ses-E06790_..._dx-corrected.png"
    label: str  # class token as written: positive | negative | normal | pneumonia | COVID-19
    image: np.ndarray  # uint8 [H, W]
    split: str = "train"  # train | val | test
    source: str = "rsna"  # data-source token; "" = 3-field line (oldest releases)
    encoding: str = "gray"


def _save(item: COVIDxItem, path: Path) -> None:
    img = np.asarray(item.image)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"COVIDxItem.image must be uint8 [H, W], got {img.dtype} {img.shape}")
    if item.encoding not in ENCODINGS:
        raise ValueError(f"COVIDxItem.encoding must be one of {ENCODINGS}, got {item.encoding!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    fmt = "JPEG" if jpeg else "PNG"
    if item.encoding == "gray16":
        if jpeg:
            raise ValueError(f"{item.filename}: a 16-bit image must be a PNG")
        Image.fromarray(img.astype(np.uint16) * 16).save(path, format=fmt)  # mode I;16
    elif item.encoding == "rgb":
        rgb = np.stack([img, np.clip(img.astype(np.int16) + 3, 0, 255).astype(np.uint8), img], -1)
        Image.fromarray(rgb, "RGB").save(path, format=fmt, quality=95)
    else:
        Image.fromarray(img, "L").save(path, format=fmt, quality=95)


def write_covidx(root: str | Path, items: list[COVIDxItem], version: str = "kaggle", images: bool = True) -> Path:
    """Write ``items`` as a COVIDx release into ``root``.

    Args:
        root: dataset folder.
        items: images in file order; ``split`` picks the label file and the image folder.
        version: ``kaggle`` (``train.txt``, ``val.txt``, ``test.txt`` at the root) or a label-file
            version such as ``COVIDx9A`` (``labels/train_COVIDx9A.txt``, ...).
        images: also write the image files (False: label files only, e.g. a second version over
            images already written).

    Returns:
        ``root``.
    """
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for it in items:
        if it.split not in lines:
            raise ValueError(f"COVIDxItem.split must be train, val or test, got {it.split!r}")
        if " " in it.filename or not it.filename:
            raise ValueError(f"COVIDx file names hold no spaces: {it.filename!r}")
        if images:
            _save(it, root / it.split / it.filename)
        fields = [it.patient_id, it.filename, it.label] + ([it.source] if it.source else [])
        lines[it.split].append(" ".join(fields))
    for split, rows in lines.items():
        if split == "val" and not rows:  # CXR-2 and the GitHub files have no val file
            continue
        path = root / f"{split}.txt" if version == "kaggle" else root / "labels" / f"{split}_{version}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return root


# (patient id, file name, Kaggle class, 9A class, source, encoding, split); every trap of §6.6
_FIXTURE = [
    ("1534", "ricord-1534-a1b2c3.jpg", "positive", "COVID-19", "ricord", "gray", "train"),
    ("7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f", "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f.png", "negative", "normal", "rsna", "gray", "train"),
    ("0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d", "0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d.png", "negative", "pneumonia", "rnsa", "gray", "train"),
    ("COVID 12", "COVID(12).png", "positive", "COVID-19", "sirm", "gray", "train"),
    ("302", "fig1-302-chest.JPG", "positive", "COVID-19", "fig1", "gray", "train"),
    ("44", "actmed-44-f1e2.jpeg", "positive", "COVID-19", "actmed", "gray", "train"),
    ("S03044", "sub-S03044_ses-E06790_run-1_bp-chest_vp-pa_dx-corrected.png", "positive", "COVID-19", "bimcv", "gray16", "train"),
    ("A881923", "A881923-0001.jpg", "positive", "COVID-19", "stonybrook", "rgb", "train"),
    ("19", "cohen-19-pa.jpg", "positive", "pneumonia", "cohen", "gray", "train"),
    ("1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9", "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9.png", "negative", "normal", "rsna", "gray", "train"),
    ("2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e", "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e.png", "negative", "normal", "rsna", "gray", "val"),
    ("1601", "ricord-1601-9f8e.jpg", "positive", "COVID-19", "ricord", "gray", "val"),
    ("3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f", "3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f.png", "negative", "normal", "rsna", "gray", "test"),
    ("S04411", "sub-S04411_ses-E08812_run-1_bp-chest_vp-ap_cr.png", "positive", "COVID-19", "bimcv", "gray16", "test"),
    ("COVID 40", "COVID(40).jpg", "positive", "COVID-19", "sirm", "rgb", "test"),
]  # fmt: skip
FIXTURE_NOTES = {
    "train.txt / val.txt / test.txt": "Kaggle binary files, 4 fields; the 'COVID 12' id holds a space",
    "labels/*_COVIDx9A.txt": "3-class files (no val) over the train/ and test/ images; 'COVID 12 COVID(12).png ...' is a 5-token line",
    "labels/*_COVIDx.txt": "oldest 3-field files (no data source), one id with a space",
    "images": ".png / .jpg / .jpeg / .JPG, parenthesised names, two 16-bit PNGs, two RGB JPGs, an 'rnsa' source",
}


def fixture_items(seed: int = 0, version: str = "kaggle") -> list[COVIDxItem]:
    """The rows of :func:`write_covidx_fixture`: ``kaggle`` (binary), ``COVIDx9A`` (3-class, no val,
    4-field lines) or ``COVIDx`` (3-class, no val, 3-field lines)."""
    items = []
    for i, (pid, name, binary, three, source, enc, split) in enumerate(_FIXTURE):
        if version != "kaggle" and split == "val":
            continue
        h, w = (40, 52) if i % 2 else (50, 38)  # landscape and portrait
        img = toy_radiograph(rng_for(seed, 61, i), h, w)
        label = binary if version == "kaggle" else three
        src = "" if version == "COVIDx" else source
        items.append(COVIDxItem(pid, name, label, img, split=split, source=src, encoding=enc))
    return items


def write_covidx_fixture(root: str | Path, seed: int = 0) -> Path:
    """Write the COVIDx test fixture (15 images, three label-file versions, ~30 kB) into ``root``."""
    write_covidx(root, fixture_items(seed, "kaggle"), "kaggle")
    write_covidx(root, fixture_items(seed, "COVIDx9A"), "COVIDx9A", images=False)
    write_covidx(root, fixture_items(seed, "COVIDx"), "COVIDx", images=False)
    return Path(root)
