"""Tiny test fixtures in the exact on-disk formats of the datasets (``specs/datasets.md`` §1.11 MIMIC-CXR,
§2.7 CheXpert, §3.7 RSNA, §4.7 SIIM-ACR, §5.5 Object-CXR, §6.6 COVIDx, §7.7 ChestX-ray14, §8.7 CT-RATE).

Every ID, report sentence and pixel is made up; each trap of the spec has at least one row that
exercises it. ``tests/datamodules/conftest.py`` turns some of them into session fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from PIL import Image

from medvlp.datamodules.demo._util import rng_for
from medvlp.datamodules.demo.chexpert import (
    CHEXPERT_LABELS,
    COMPETITION,
    CheXpertItem,
    toy_radiograph,
    write_chexpert,
)
from medvlp.datamodules.demo.covidx import COVIDxItem, write_covidx
from medvlp.datamodules.demo.nih14 import NIHItem, write_nih14
from medvlp.datamodules.demo.object_cxr import ObjectCxrItem, _draw, write_object_cxr
from medvlp.datamodules.demo.rsna import RsnaItem, synthetic_radiograph, uuid4_from, write_rsna
from medvlp.datamodules.demo.siim import SiimItem, sop_uids, write_siim

_IMAGE_STREAM, _ID_STREAM, _MASK_STREAM = 1, 2, 3


def _qualifying(c: str, rng: np.random.Generator) -> dict[str, float | None]:
    """A 5x200-qualifying label row: ``c`` = 1, every other finding 0.0 or blank (No Finding blank)."""
    labels: dict[str, float | None] = {c: 1.0}
    for n in CHEXPERT_LABELS:
        if n not in (c, "No Finding"):
            labels[n] = 0.0 if rng.random() < 0.5 else None
    return labels


# What each fixture patient exercises (train.csv unless said otherwise).
FIXTURE_PATIENTS = {
    "patient00001-00016": "5x200-qualifying frontal rows: 3 per class, 4 for Edema (so a 5x3 draw really samples)",
    "patient00017": "Atelectasis = 1 but Pneumonia = -1: -1 anywhere disqualifies it from 5x200",
    "patient00018": "two competition positives (Cardiomegaly, Edema): not in 5x200",
    "patient00019": "frontal AP + lateral (blank AP/PA) of one study, Consolidation = 1 with Lung Opacity",
    "patient00020": "a lateral-only image that would qualify for Consolidation: excluded (frontal only)",
    "patient00021": "-1 in every competition label and Pneumonia, blank Fracture / No Finding: the policies",
    "patient00022": "every label blank; Sex = Unknown, Age = 0",
    "patient00023": "frontal with AP/PA = LL, No Finding = 1",
    "patient00024": "frontal PA + lateral: Pleural Effusion = -1, Edema = 1, Support Devices = 1",
    "patient00025": "study2 only: Cardiomegaly = 0, Edema = -1",
    "patient00026": "frontal with AP/PA = RL, No Finding = 1",
    "patient00027": "Support Devices = 1 only",
    "patient64541-64544": "valid.csv: only 0 / 1, a lateral in patient64541",
}


def chexpert_fixture_items(seed: int = 0) -> list[CheXpertItem]:
    """The rows of :func:`write_chexpert_fixture` (see :data:`FIXTURE_PATIENTS`)."""
    rng = rng_for(seed, 21)
    items: list[CheXpertItem] = []
    counter = [0]

    def add(labels: dict[str, float | None], frontal: bool = True, split: str = "train", patient: int | None = None,
            **kw) -> None:  # fmt: skip
        if patient is None:
            counter[0] += 1
        pid = patient if patient is not None else counter[0]
        h, w = int(rng.integers(44, 56)), int(rng.integers(34, 42))  # portrait, non-square
        img = toy_radiograph(rng_for(seed, 22, len(items)), h, w, lateral=not frontal)
        same = [it for it in items if it.patient == f"patient{pid:05d}"]  # one patient, one sex and age
        kw.setdefault("sex", same[0].sex if same else str(rng.choice(["Male", "Female"])))
        kw.setdefault("age", same[0].age if same else int(rng.integers(20, 90)))
        items.append(CheXpertItem(f"patient{pid:05d}", img, labels, frontal=frontal, split=split, **kw))

    for c in COMPETITION:
        for _ in range(4 if c == "Edema" else 3):
            add(_qualifying(c, rng))
    add({**_qualifying("Atelectasis", rng), "Pneumonia": -1.0})  # 17
    add({"Cardiomegaly": 1.0, "Edema": 1.0, "No Finding": None})  # 18
    add({"Consolidation": 1.0, "Lung Opacity": 1.0}, ap_pa="AP")  # 19 frontal
    add({"Consolidation": 1.0, "Lung Opacity": 1.0}, frontal=False, view=2, patient=19)  # 19 lateral
    add(_qualifying("Consolidation", rng), frontal=False)  # 20
    add({c: -1.0 for c in COMPETITION} | {"Pneumonia": -1.0, "Lung Opacity": 0.0})  # 21
    add({}, sex="Unknown", age=0, ap_pa="AP")  # 22
    add({"No Finding": 1.0}, ap_pa="LL")  # 23
    labels24 = {"Pleural Effusion": -1.0, "Edema": 1.0, "Support Devices": 1.0, "Lung Opacity": 0.0}
    add(labels24)  # 24 frontal
    add(labels24, frontal=False, view=2, patient=24)  # 24 lateral
    add({"Cardiomegaly": 0.0, "Edema": -1.0}, study=2)  # 25
    add({"No Finding": 1.0}, ap_pa="RL")  # 26
    add({"Support Devices": 1.0})  # 27
    zero = {n: 0.0 for n in CHEXPERT_LABELS}
    add({**zero, "Cardiomegaly": 1.0}, split="valid", patient=64541)
    add({**zero, "Cardiomegaly": 1.0}, frontal=False, view=2, split="valid", patient=64541)
    add({**zero, "Edema": 1.0, "Pleural Effusion": 1.0}, split="valid", patient=64542)
    add({**zero, "No Finding": 1.0}, split="valid", patient=64543)
    add({**zero, "Atelectasis": 1.0}, split="valid", patient=64544)
    return items


def write_chexpert_fixture(root: str | Path, seed: int = 0, prefix: str = "CheXpert-v1.0-small") -> Path:
    """Write the CheXpert test fixture (29 train rows, 5 valid rows, ~40 kB) into ``root``.

    Args:
        root: the dataset folder (any name: users rename it, the CSVs keep ``prefix``).
        seed: pixel / label-blank seed.
        prefix: ``Path`` prefix of the CSVs.

    Returns:
        ``root``.
    """
    return write_chexpert(root, chexpert_fixture_items(seed), prefix=prefix)


def write_rsna_fixture(root: str | Path, seed: int = 0) -> list[RsnaItem]:
    """The tiny RSNA fixture of §3.7 (10 train + 1 test image, < 100 kB).

    Traps covered (§3.8): negatives with blank coordinates (``No Lung Opacity / Not Normal`` and
    ``Normal``), an image with 2 and one with 4 boxes (several rows per image, class info
    duplicated per row), AP and PA, JPEG Baseline and uncompressed files, a MONOCHROME1 file whose
    MONOCHROME2 twin holds the same image and boxes, and 64 x 64 / 48 x 64 / 64 x 48 images so
    that the 1024-pixel coordinates must be rescaled per axis.

    Returns:
        The train items in CSV order (ids, boxes in image pixels, file options).
    """
    rng = rng_for(seed, _ID_STREAM)
    specs = [  # (H, W), boxes (image pixels), view, class, photometric, transfer syntax
        ((64, 64), [], "PA", "Normal", "MONOCHROME2", "explicit"),
        ((64, 64), [], "AP", "No Lung Opacity / Not Normal", "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [(10, 20, 22, 40), (40, 18, 54, 44)], "AP", "", "MONOCHROME2", "explicit"),
        ((64, 64), [(8, 10, 20, 26), (8, 34, 20, 52), (42, 12, 56, 28), (44, 36, 58, 54)], "PA", "",
         "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [(36, 24, 50, 46)], "AP", "", "MONOCHROME1", "explicit"),
        ((64, 64), [(36, 24, 50, 46)], "AP", "", "MONOCHROME2", "explicit"),  # twin of the one above
        ((48, 64), [(12, 9, 24, 30)], "PA", "", "MONOCHROME2", "explicit"),
        ((64, 48), [], "PA", "Normal", "MONOCHROME2", "explicit"),
        ((64, 64), [], "PA", "No Lung Opacity / Not Normal", "MONOCHROME2", "explicit"),
        ((64, 64), [(20, 30, 30.5, 45.25)], "PA", "", "MONOCHROME2", "explicit"),
    ]
    items: list[RsnaItem] = []
    for i, ((h, w), boxes, view, cls, photometric, syntax) in enumerate(specs):
        twin_of_previous = i == 5
        image = items[-1].image if twin_of_previous else synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, i), h, w, boxes)
        items.append(RsnaItem(
            patient_id=uuid4_from(rng), image=image, boxes=boxes, detailed_class=cls, view=view,
            sex="F" if i % 3 else "M", age=int(rng.integers(18, 90)), photometric=photometric, transfer_syntax=syntax,
        ))
    test = [RsnaItem(patient_id=uuid4_from(rng), image=synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, 99), 64, 64))]
    write_rsna(root, items, test_items=test)
    return items


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """An irregular blob mask (a wobbly ellipse) centred at ``(cx, cy)`` pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.arctan2(yy + 0.5 - cy, xx + 0.5 - cx)
    wobble = 1 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6.28))
    r = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2
    return (r <= wobble).astype(np.uint8)


def write_siim_fixture(root: str | Path, seed: int = 0, stage: int = 1) -> list[SiimItem]:
    """The tiny SIIM fixture of §4.7 (12 labelled images, 7 negative, + 1 test image; 64 px, < 200 kB).

    Traps covered (§4.8): the spaced header and spaced values (stage 1), ``-1`` negatives, an image
    with 2 overlapping RLE rows and one with 3 (union; split by image), masks that are thin
    horizontal bars and multi-column blobs (a transposed or absolute decode breaks them), JPEG
    Baseline and uncompressed files, a MONOCHROME1 file whose MONOCHROME2 twin holds the same image
    and mask, a 48 x 64 image (masks follow Rows x Columns), and an unlabelled test image.

    Args:
        root: dataset root.
        seed: fixture seed (pixels, ids, blob shapes).
        stage: 1 or 2 (see :func:`write_siim`).

    Returns:
        The labelled items in CSV order.
    """
    rng = rng_for(seed, _ID_STREAM)
    mrng = rng_for(seed, _MASK_STREAM)
    stamp = 1517875000 + int(rng.integers(0, 999))
    bar = np.zeros((64, 64), np.uint8)
    bar[10:13, 20:50] = 1  # a horizontal bar: transposing gives a vertical one
    specs = [  # (H, W), masks, photometric, transfer syntax
        ((64, 64), [], "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [_blob(mrng, 64, 64, 20, 30, 8, 12), _blob(mrng, 64, 64, 26, 36, 7, 9)], "MONOCHROME2", "explicit"),
        ((64, 64), [bar], "MONOCHROME1", "explicit"),
        ((64, 64), [bar], "MONOCHROME2", "explicit"),  # twin of the MONOCHROME1 file
        ((64, 64), [], "MONOCHROME2", "explicit"),
        ((64, 64), [_blob(mrng, 64, 64, 44, 20, 6, 10), _blob(mrng, 64, 64, 46, 44, 5, 6), bar], "MONOCHROME2",
         "jpeg_baseline"),
        ((48, 64), [_blob(mrng, 48, 64, 40, 20, 9, 7)], "MONOCHROME2", "explicit"),
        ((64, 64), [], "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [], "MONOCHROME2", "explicit"),
        ((64, 64), [], "MONOCHROME2", "explicit"),
        ((64, 64), [], "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [], "MONOCHROME2", "explicit"),
    ]
    items: list[SiimItem] = []
    counter = 100000 + int(rng.integers(10, 90))
    for i, ((h, w), masks, photometric, syntax) in enumerate(specs):
        counter += int(rng.integers(3, 40))
        sop, study, series = sop_uids(int(rng.integers(1000, 14000)), stamp + i, counter)
        if i == 3:
            image = items[-1].image
        else:
            image = synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, i), h, w)
            for m in masks:  # a pneumothorax is dark (no lung markings): darken the masked area a bit
                image = np.clip(image.astype(np.int16) - 40 * (m != 0), 0, 255).astype(np.uint8)
        items.append(SiimItem(
            image_id=sop, image=image, masks=masks, study_uid=study, series_uid=series, patient_id=uuid4_from(rng),
            view="AP" if i % 3 == 1 else "PA", sex="F" if i % 2 else "M", age=int(rng.integers(18, 90)),
            photometric=photometric, transfer_syntax=syntax,
        ))
    counter += 7
    sop, study, series = sop_uids(int(rng.integers(1000, 14000)), stamp + 50, counter)
    test = [SiimItem(sop, synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, 99), 64, 64), study_uid=study,
                     series_uid=series, patient_id=uuid4_from(rng))]
    write_siim(root, items, stage=stage, test_items=test)
    return items


def write_object_cxr_fixture(root: str | Path, seed: int = 0) -> list[ObjectCxrItem]:
    """The tiny Object-CXR fixture of §5.5 (10 train, 3 dev, 2 test JPGs of 6 sizes, < 100 kB).

    Traps covered: empty annotations (NaN after reading), a row mixing a rectangle, an ellipse and
    a polygon, a row with two rectangles, images of different sizes (wider and taller than high,
    not multiples of one another), coordinates in original pixels, and ``test.csv`` with
    ``image_path`` instead of ``image_name``.

    Returns:
        Every item, in split and file order.
    """
    sizes = [(96, 72), (72, 96), (80, 80), (100, 64), (64, 90), (88, 76)]  # (W, H)
    plan: list[tuple[str, list[tuple[int, list[int]]]]] = [
        ("train", [(0, [10, 12, 30, 28]), (1, [40, 40, 60, 56]), (2, [50, 10, 70, 14, 66, 30, 52, 26])]),
        ("train", []),
        ("train", [(0, [20, 30, 34, 50])]),
        ("train", []),
        ("train", [(2, [10, 10, 40, 12, 25, 40])]),
        ("train", [(1, [30, 20, 50, 60])]),
        ("train", []),
        ("train", [(0, [5, 5, 15, 15]), (0, [40, 50, 60, 60])]),
        ("train", []),
        ("train", [(0, [22, 18, 38, 30])]),
        ("dev", [(0, [12, 14, 40, 32]), (2, [40, 40, 60, 44, 50, 70])]),
        ("dev", []),
        ("dev", [(1, [20, 20, 44, 36])]),
        ("test", [(0, [30, 30, 50, 40])]),
        ("test", []),
    ]
    first = {"train": 1, "dev": 8001, "test": 9001}  # the release numbers train 00001-08000, dev 08001-, test 09001-
    items = []
    for i, (split, objects) in enumerate(plan):
        w, h = sizes[i % len(sizes)]
        image = _draw(synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, i), h, w), objects)
        number = first[split] + sum(it.split == split for it in items)
        items.append(ObjectCxrItem(image_name=f"{number:05d}.jpg", image=image, objects=objects, split=split))
    write_object_cxr(root, items)
    return items


# (patient id, file name, Kaggle class, 9A class, source, encoding, split); every trap of §6.6
_COVIDX_FIXTURE = [
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


def covidx_fixture_items(seed: int = 0, version: str = "kaggle") -> list[COVIDxItem]:
    """The rows of :func:`write_covidx_fixture`: ``kaggle`` (binary), ``COVIDx9A`` (3-class, no val,
    4-field lines) or ``COVIDx`` (3-class, no val, 3-field lines)."""
    items = []
    for i, (pid, name, binary, three, source, enc, split) in enumerate(_COVIDX_FIXTURE):
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
    write_covidx(root, covidx_fixture_items(seed, "kaggle"), "kaggle")
    write_covidx(root, covidx_fixture_items(seed, "COVIDx9A"), "COVIDx9A", images=False)
    write_covidx(root, covidx_fixture_items(seed, "COVIDx"), "COVIDx", images=False)
    return Path(root)


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


def nih14_fixture_items(seed: int = 0) -> list[NIHItem]:
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
    items = nih14_fixture_items(seed)
    if variant == "both":
        write_nih14(root, items, variant="2017")
        variant = "v2020"
    return write_nih14(root, items, variant=variant)


# --------------------------------------------------------------------------------------------- MIMIC

MIMIC_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]


def mimic_report(**sections: str) -> str:
    """A report in the MIMIC shape: centred title, every line starting with one space."""
    lines = ["                                 FINAL REPORT"]
    for header, body in sections.items():
        lines.append(f" {header.replace('_', ' ')}:  {body}" if body and "\n" not in body else f" {header.replace('_', ' ')}: ")
        if body and "\n" in body:
            lines.append(" ")
            lines.extend(f" {line}" for line in body.split("\n"))
        lines.append(" ")
    return "\n".join(lines) + "\n"


REPORT_FULL = mimic_report(
    EXAMINATION="CHEST (PA AND LAT)",
    INDICATION="___ year old with cough  // eval for infiltrate",
    COMPARISON="___",
    FINDINGS="Lungs are well expanded and clear.  No focal consolidation,\npleural effusion or pneumothorax.  Heart size is normal.",
    IMPRESSION="No acute cardiopulmonary process.",
)
REPORT_FINDINGS_ONLY = mimic_report(
    EXAMINATION="CHEST (PORTABLE AP)",
    FINDINGS="Portable view of the chest.  Small left pleural effusion is new.\nMild cardiomegaly.",
)
REPORT_TYPO = mimic_report(
    INDICATION="Shortness of breath.",
    FINIDNGS="Right basal opacity has increased in size.",
    IMPRESSON="Worsening right lower lobe consolidation.",
)
REPORT_NUMBERED = mimic_report(
    TECHNIQUE="Single frontal view.",
    IMPRESSION="1. No pneumothorax. 2. Mild edema.",
)
REPORT_NO_HEADER = (
    "                                 FINAL REPORT\n"
    " Frontal chest radiograph was obtained.\n"
    " \n"
    " The lungs are clear without effusion.  Cardiac silhouette is stable.\n"
)
REPORT_TOO_SHORT = mimic_report(EXAMINATION="CHEST", IMPRESSION="Normal.")
REPORT_TWO_FRONTAL = mimic_report(
    FINDINGS="Endotracheal tube tip sits above the carina.",
    IMPRESSION="Support devices in standard position.",
)


@dataclass
class MimicImage:
    subject: str
    study: str
    dicom: str
    view: str  # "" = blank ViewPosition
    split: str
    size: tuple[int, int] = (64, 80)  # (W, H)


@dataclass
class MimicFixture:
    root: Path
    reports_root: Path
    images: list[MimicImage] = field(default_factory=list)


def _dicom(i: int) -> str:
    h = f"{i:08x}"
    return "-".join(f"{int(h, 16) * (k + 7) % 0xFFFFFFFF:08x}" for k in range(5))


# studies: (subject, study, split, report, [(view, (W, H))], labels or None = no label row)
MIMIC_STUDIES = [
    ("10000001", "50000001", "train", REPORT_FULL, [("PA", (64, 80)), ("LATERAL", (64, 80))],
     {"No Finding": "1.0", "Edema": "0.0", "Pneumonia": "-1.0"}),
    ("10000001", "50000002", "train", REPORT_FINDINGS_ONLY, [("AP", (80, 64))],
     {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0", "No Finding": ""}),
    ("10000004", "50000007", "train", REPORT_TOO_SHORT, [("PA", (64, 80))], {"No Finding": "1.0"}),
    ("10000004", "50000008", "train", REPORT_TWO_FRONTAL, [("PA", (64, 80)), ("AP", (72, 80))], None),
    ("11000002", "50000003", "validate", REPORT_FULL, [("", (64, 80))], {"No Finding": "1.0"}),
    ("11000002", "50000004", "validate", REPORT_TYPO, [("PA", (64, 80))], {"Consolidation": "1.0"}),
    ("12000003", "50000005", "test", REPORT_NUMBERED, [("PA", (64, 80))], {"Edema": "1.0", "Pneumothorax": "0.0"}),
    ("12000003", "50000006", "test", REPORT_NO_HEADER, [("PA", (80, 64))], {"No Finding": "1.0"}),
]
# v2.1.0 radiologist labels of the test studies (columns deliberately not in alphabetical order)
MIMIC_TEST_SET = {"50000005": {"Edema": "0.0", "Pneumothorax": "1.0"}, "50000006": {"Atelectasis": "1.0"}}


def write_mimic(root: Path, *, gz: bool = True, reports_root: Path | None = None, test_set: bool = True) -> MimicFixture:
    """Write the MIMIC-CXR-JPG fixture (§1.11) under ``root``; reports go to ``reports_root`` or root."""
    root.mkdir(parents=True, exist_ok=True)
    reports_root = reports_root or root
    rng = np.random.default_rng(0)
    fx = MimicFixture(root=root, reports_root=reports_root)
    meta_rows, split_rows, label_rows, negbio_rows = [], [], [], []
    counter = 0
    for subject, study, split, report, images, labels in MIMIC_STUDIES:
        rep = reports_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        rep.parent.mkdir(parents=True, exist_ok=True)
        rep.write_text(report)
        for view, (w, h) in images:
            counter += 1
            dicom = _dicom(counter)
            path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = np.clip(60 + 120 * (yy / h) + rng.normal(0, 10, (h, w)) + 40 * (xx / w), 1, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(path, quality=95)
            fx.images.append(MimicImage(subject, study, dicom, view, split, (w, h)))
            time = "80556.875" if counter == 1 else f"{120000 + counter}.5"  # leading zero lost
            meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, h, w, 21800506, time,
                              "CHEST (PA AND LAT)", "postero-anterior" if view == "PA" else "", "Erect"])
            split_rows.append([dicom, study, subject, split])
        if labels is not None:
            label_rows.append([subject, study] + [labels.get(n, "") for n in MIMIC_LABELS])
            negbio_rows.append([subject, study] + ["0.0" if labels.get(n) == "-1.0" else labels.get(n, "") for n in MIMIC_LABELS])
    meta_cols = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                 "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                 "PatientOrientationCodeSequence_CodeMeaning"]
    ext = ".csv.gz" if gz else ".csv"
    comp = "gzip" if gz else None
    pd.DataFrame(meta_rows, columns=meta_cols).to_csv(root / f"mimic-cxr-2.0.0-metadata{ext}", index=False, compression=comp)
    pd.DataFrame(split_rows, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        root / f"mimic-cxr-2.0.0-split{ext}", index=False, compression=comp)
    pd.DataFrame(label_rows, columns=["subject_id", "study_id", *MIMIC_LABELS]).to_csv(
        root / f"mimic-cxr-2.0.0-chexpert{ext}", index=False, compression=comp)
    pd.DataFrame(negbio_rows, columns=["subject_id", "study_id", *MIMIC_LABELS]).to_csv(
        root / f"mimic-cxr-2.0.0-negbio{ext}", index=False, compression=comp)
    if test_set:
        cols = ["study_id", *reversed(MIMIC_LABELS)]
        rows = [[s] + [v.get(n, "0.0") for n in reversed(MIMIC_LABELS)] for s, v in MIMIC_TEST_SET.items()]
        pd.DataFrame(rows, columns=cols).to_csv(root / "mimic-cxr-2.1.0-test-set-labeled.csv", index=False)
    (root / "IMAGE_FILENAMES").write_text(
        "".join(f"files/p{i.subject[:2]}/p{i.subject}/s{i.study}/{i.dicom}.jpg\n" for i in fx.images))
    return fx


# ------------------------------------------------------------------------------------------ CT-RATE

CT_LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
CT_META_COLUMNS = [
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower",
    "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime", "SingleCollimationWidth",
    "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "NumberofSlices", "ZSpacing", "StudyDate",
]
CT_SHAPE = (16, 32, 32)  # (z, y, x) voxels


def phantom_hu(shape: tuple[int, int, int] = CT_SHAPE, seed: int = 0) -> np.ndarray:
    """A chest-like HU volume (z, y, x): air, a soft-tissue body, two lungs, a spine, and a marker
    bright block in the (low z, low y, low x) corner of the body so that flips are detectable."""
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.48 * w)) ** 2 <= 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx - side * 0.22 * w) / (0.16 * w)) ** 2 <= 1
        hu[lung] = -850.0
    spine = ((yy - (cy + 0.33 * h)) / (0.07 * h)) ** 2 + ((xx - cx) / (0.07 * w)) ** 2 <= 1
    hu[spine] = 700.0
    hu[: d // 4, int(0.2 * h) : int(0.3 * h), int(0.2 * w) : int(0.3 * w)] = 300.0
    hu += np.random.default_rng(seed).normal(0, 5, shape).astype(np.float32)
    return np.round(hu)


def write_nifti(path: Path, array: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


@dataclass
class CTVolume:
    name: str
    intercept: float = -1024.0
    spacing_xy: float = 0.8
    spacing_z: float = 2.5
    dtype: str = "int16"  # stored dtype of the v1 file
    fixed: bool = False  # also write a v2 file under <split>_fixed/
    v1: bool = True  # write the v1 file
    findings: str = "Lungs are clear. No effusion (left or right)."
    impressions: str = "No acute findings."
    clinical: str = "Not given."
    labels: tuple[int, ...] = ()
    kernel: str = "B"
    iop: str = "[1, 0, 0, 0, 1, 0]"
    seed: int = 0


def default_ct_volumes() -> list[CTVolume]:
    """§8.7: two recons, two scans of one patient, multi-digit recon id, -8192 and -1024, v2 copies,
    placeholder / empty report fields, single-quoted kernel list, float-formatted orientation."""
    return [
        CTVolume("train_1_a_1", intercept=-8192, fixed=True, kernel="['Bl57d', '3']", labels=(1, 0, 1)),
        CTVolume("train_1_a_2", intercept=-8192, labels=(1, 0, 1)),
        CTVolume("train_2_a_1", intercept=-1024, dtype="uint16", findings="", impressions="Cardiomegaly.",
                 iop="[1.000000, 0.000000, 0.000000, 0.000000, 1.000000, -0.000000]", labels=(0, 0, 1)),
        CTVolume("train_2_b_1", intercept=-1024, impressions="", findings="Small nodule in the right lung.",
                 labels=(0, 1)),
        CTVolume("train_3_a_2", spacing_xy=0.7, spacing_z=3.0, fixed=True, labels=(0, 0, 0, 1)),
        CTVolume("train_3_a_10", spacing_xy=0.7, spacing_z=3.0, labels=(0, 0, 0, 1), seed=1),
        CTVolume("train_4_a_1", findings="", impressions="Not given.", labels=()),  # no usable text
        CTVolume("train_5_a_1", labels=(1,)),
        CTVolume("train_6_a_1", labels=(0, 1)),
        CTVolume("train_7_a_1", intercept=-8192, labels=(0, 0, 1)),
        CTVolume("valid_1_a_1", intercept=-8192, fixed=True, labels=(1, 1)),
        CTVolume("valid_1_a_2", intercept=-8192, labels=(1, 1)),
        CTVolume("valid_2_a_1", intercept=-1024, labels=(0, 0, 0, 0, 1)),
    ]


def write_ct_rate(parent: Path, volumes: list[CTVolume] | None = None, *, extra_label_rows: list[str] = (),
                  skip_report: list[str] = ()) -> Path:
    """Write ``parent/dataset/`` in the CT-RATE layout (§8.7); returns the ``dataset`` folder."""
    volumes = default_ct_volumes() if volumes is None else volumes
    ds = parent / "dataset"
    rows: dict[str, dict[str, list]] = {"train": {"rep": [], "lab": [], "meta": []}, "valid": {"rep": [], "lab": [], "meta": []}}
    for v in volumes:
        split = v.name.split("_", 1)[0]
        patient, scan = v.name.rsplit("_", 2)[0], v.name.rsplit("_", 1)[0]
        hu = phantom_hu(seed=v.seed)
        rel = Path(patient) / scan / f"{v.name}.nii.gz"
        if v.v1:
            stored = (hu - v.intercept).astype(v.dtype)
            write_nifti(ds / split / rel, stored)  # default header: spacing 1, origin 0, identity
        if v.fixed:
            write_nifti(ds / f"{split}_fixed" / rel, hu.astype(np.int16), (v.spacing_z, v.spacing_xy, v.spacing_xy),
                        origin=(-166.0, 9.0, 56.3))
        file_name = f"{v.name}.nii.gz"
        if v.name not in skip_report:
            rows[split]["rep"].append([file_name, v.clinical, "Non-contrast chest CT.", v.findings, v.impressions])
        lab = list(v.labels) + [0] * (18 - len(v.labels))
        rows[split]["lab"].append([file_name, *lab])
        meta = {c: "" for c in CT_META_COLUMNS}
        meta.update(
            VolumeName=file_name, Manufacturer="Siemens Healthineers" if v.intercept == -8192 else "PHILIPS",
            PatientSex="M", PatientAge="036Y", ConvolutionKernel=v.kernel, PatientPosition="HFS",
            ImagePositionPatient="[-166, 9, 56.2998657]", ImageOrientationPatient=v.iop, SamplesPerPixel="1",
            PhotometricInterpretation="MONOCHROME2", Rows=str(CT_SHAPE[1]), Columns=str(CT_SHAPE[2]),
            XYSpacing=f"[{v.spacing_xy}, {v.spacing_xy}]", RescaleIntercept=str(int(v.intercept)), RescaleSlope="1",
            RescaleType="HU" if v.intercept == -1024 else "", NumberofSlices=str(CT_SHAPE[0]), ZSpacing=str(v.spacing_z),
            StudyDate="20200101",
        )
        rows[split]["meta"].append([meta[c] for c in CT_META_COLUMNS])
    for name in extra_label_rows:
        rows[name.split("_", 1)[0]]["lab"].append([f"{name}.nii.gz", *([0] * 18)])
    for split, rep_name, meta_name in (("train", "train", "train"), ("valid", "validation", "validation")):
        (ds / "radiology_text_reports").mkdir(parents=True, exist_ok=True)
        (ds / "multi_abnormality_labels").mkdir(parents=True, exist_ok=True)
        (ds / "metadata").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows[split]["rep"], columns=["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                                  "Impressions_EN"]).to_csv(
            ds / "radiology_text_reports" / f"{rep_name}_reports.csv", index=False)
        pd.DataFrame(rows[split]["lab"], columns=["VolumeName", *CT_LABELS]).to_csv(
            ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", index=False)
        pd.DataFrame(rows[split]["meta"], columns=CT_META_COLUMNS).to_csv(
            ds / "metadata" / f"{meta_name}_metadata.csv", index=False)
    return ds


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
