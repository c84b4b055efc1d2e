"""Write COVIDx (COVID-Net) in its exact on-disk layout (``specs/datasets.md`` §6).

:func:`write_covidx` lays out any list of :class:`COVIDxItem` as the images under
``train/`` / ``val/`` / ``test/`` plus the header-less, space-separated label files: the Kaggle
``train.txt`` / ``val.txt`` / ``test.txt`` or the GitHub ``labels/<split>_<version>.txt``. The tiny
test fixture of §6.6 (``write_covidx_fixture``) lives in ``tests/format_fixtures.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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
