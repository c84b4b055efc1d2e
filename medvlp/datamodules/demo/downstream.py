"""Downstream demo worlds: the synthetic chest X-rays written as CheXpert, RSNA, SIIM and NIH14.

Every image is drawn by :func:`~medvlp.datamodules.demo.cxr.draw_frontal` from findings sampled as
in the MIMIC-CXR world, so a model pre-trained on the MIMIC demo meets the same findings here:

* ``chexpert`` - CheXpert-v1.0-small CSVs + JPGs; the world's five findings as CheXpert labels
  (hedged findings as -1; labels the world never draws left blank), ``valid.csv`` 0/1 only;
* ``rsna`` - RSNA stage-2: pneumonia = consolidation, its box (in the 1024 frame of the CSV),
  square DICOMs, one in 7 stored MONOCHROME1 and one in 3 JPEG-baseline compressed;
* ``siim`` - SIIM-ACR stage 1: the pneumothorax mask as competition RLE, DICOM tree;
* ``nih14`` - ChestX-ray14: Cardiomegaly / Effusion / Consolidation / Pneumothorax / Nodule,
  official lists, and BBox_List boxes for nodules;
* ``covidx`` - COVIDx9A label files, three classes: normal (no finding), pneumonia (one
  consolidation), COVID-19 (a second consolidation in the other lung: bilateral disease);
* ``object_cxr`` - Object-CXR: radio-opaque foreign objects (rectangles, ellipses, polygons) drawn
  onto half of the images, with their annotations.

Images are square (RSNA / SIIM / NIH images are 1024 x 1024 in reality), ``size`` pixels wide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import rng_for, write_json
from medvlp.datamodules.demo.cxr import CxrFindings, draw_frontal, sample_findings

KINDS = ("chexpert", "rsna", "siim", "nih14", "covidx", "object_cxr")
_STREAM = {"chexpert": 40, "rsna": 41, "siim": 42, "nih14": 43, "covidx": 44, "object_cxr": 45}
SIZE = 128


def _study(kind: str, seed: int, i: int, size: int, view: str = "PA") -> tuple[CxrFindings, np.ndarray, dict, dict]:
    f = sample_findings(rng_for(seed, _STREAM[kind], i, 0))
    pixels, truth, masks = draw_frontal(f, size, size, view, rng_for(seed, _STREAM[kind], i, 1))
    return f, pixels, truth, masks


def _nodule_box(truth: dict, size: int) -> tuple[float, float, float, float]:
    x, y, r = float(truth["nodule_x"]), float(truth["nodule_y"]), float(truth["nodule_r"])
    return max(0.0, x - r), max(0.0, y - r), min(float(size), x + r), min(float(size), y + r)


def write_chexpert_demo(root: Path, n: int, seed: int) -> dict[str, int]:
    from medvlp.datamodules.demo.chexpert import CheXpertItem, write_chexpert

    items = []
    n_valid = max(2, n // 10)
    for i in range(n):
        view = "AP" if i % 3 == 0 else "PA"
        f, pixels, _, _ = _study("chexpert", seed, i, SIZE, view)
        valid = i < n_valid
        present = {"Cardiomegaly": f.cardiomegaly, "Pleural Effusion": f.effusion, "Consolidation": f.consolidation,
                   "Pneumothorax": f.pneumothorax, "Lung Lesion": f.nodule}  # fmt: skip
        labels: dict[str, float | None] = {}
        for name, flag in present.items():
            if flag:
                labels[name] = 1.0 if valid or name not in f.hedged else -1.0
            elif valid or i % 2 == 0:
                labels[name] = 0.0  # train rows leave some absent findings blank, as the labeller does
        labels["No Finding"] = 1.0 if not f.present() else (0.0 if valid else None)
        if valid:  # valid.csv: every column 0/1
            labels = {k: (v if v is not None else 0.0) for k, v in labels.items()}
        patient = 64541 + i if valid else 1 + i
        items.append(CheXpertItem(patient=f"patient{patient:05d}", image=pixels, labels=labels, split="valid" if valid else "train",
                                  sex=("Male", "Female")[i % 2], age=40 + i % 50, ap_pa=view))  # fmt: skip
    write_chexpert(root, items)
    return {"images": len(items), "valid": n_valid}


def write_rsna_demo(root: Path, n: int, seed: int) -> dict[str, int]:
    from medvlp.datamodules.demo.rsna import RsnaItem, uuid4_from, write_rsna

    items = []
    rng = rng_for(seed, _STREAM["rsna"], 10**6)
    for i in range(n):
        view = "AP" if i % 3 == 0 else "PA"
        f, pixels, truth, _ = _study("rsna", seed, i, SIZE, view)
        boxes = []
        if f.consolidation:
            boxes.append((truth["consolidation_x0"], truth["consolidation_y0"], truth["consolidation_x1"], truth["consolidation_y1"]))
        detailed = "Lung Opacity" if boxes else ("Normal" if not f.present() else "No Lung Opacity / Not Normal")
        items.append(RsnaItem(patient_id=uuid4_from(rng), image=pixels, boxes=boxes, detailed_class=detailed, view=view,
                              sex=("M", "F")[i % 2], age=30 + i % 60,
                              photometric="MONOCHROME1" if i % 7 == 3 else "MONOCHROME2",
                              transfer_syntax="jpeg_baseline" if i % 3 == 1 else "explicit"))  # fmt: skip
    write_rsna(root, items)
    return {"images": len(items), "positive": sum(bool(it.boxes) for it in items)}


def write_siim_demo(root: Path, n: int, seed: int) -> dict[str, int]:
    from medvlp.datamodules.demo.siim import SiimItem, sop_uids, write_siim

    items = []
    for i in range(n):
        f, pixels, _, masks = _study("siim", seed, i, SIZE)
        uid = sop_uids(1000 + i, 1517875000 + seed, 100002 + i % 899990)[0]
        mask = masks.get("pneumothorax")
        items.append(SiimItem(image_id=uid, image=pixels, masks=[(mask > 0).astype(np.uint8)] if mask is not None else [],
                              photometric="MONOCHROME1" if i % 7 == 3 else "MONOCHROME2",
                              transfer_syntax="explicit" if i % 3 == 1 else "jpeg_baseline"))  # fmt: skip
    write_siim(root, items, stage=1)
    return {"images": len(items), "positive": sum(bool(it.masks) for it in items)}


def write_nih14_demo(root: Path, n: int, seed: int) -> dict[str, int]:
    from medvlp.datamodules.demo.nih14 import NIHItem, write_nih14

    items = []
    patient, follow = 1, 0
    for i in range(n):
        f, pixels, truth, _ = _study("nih14", seed, i, SIZE)
        findings = [name for name, flag in (("Cardiomegaly", f.cardiomegaly), ("Effusion", f.effusion),
                                            ("Consolidation", f.consolidation), ("Pneumothorax", f.pneumothorax),
                                            ("Nodule", f.nodule)) if flag]  # fmt: skip
        boxes = []
        if f.nodule:
            x1, y1, x2, y2 = _nodule_box(truth, SIZE)
            boxes.append(("Nodule", x1, y1, x2 - x1, y2 - y1))
        items.append(NIHItem(image_index=f"{patient:08d}_{follow:03d}.png", image=pixels, findings=findings,
                             split="test" if patient % 5 == 0 else "train_val", boxes=boxes,
                             folder="images", original_size=(SIZE, SIZE)))  # fmt: skip
        follow += 1
        if i % 3 == 2:  # three images per patient
            patient, follow = patient + 1, 0
    write_nih14(root, items)
    return {"images": len(items), "boxes": sum(len(it.boxes) for it in items)}


def write_covidx_demo(root: Path, n: int, seed: int) -> dict[str, int]:
    from medvlp.datamodules.demo.covidx import COVIDxItem, write_covidx
    from medvlp.datamodules.demo.cxr import ZONES

    items, counts = [], {"normal": 0, "pneumonia": 0, "COVID-19": 0}
    for i in range(n):
        cls = ("normal", "pneumonia", "COVID-19")[i % 3]
        rng = rng_for(seed, _STREAM["covidx"], i, 0)
        f = CxrFindings()
        if cls != "normal":
            f.consolidation = ZONES[int(rng.integers(len(ZONES)))]
        pixels, _, _ = draw_frontal(f, SIZE, SIZE, "AP", rng_for(seed, _STREAM["covidx"], i, 1))
        if cls == "COVID-19":  # a second consolidation in the same level of the other lung
            level, side = f.consolidation.split("_")
            other = CxrFindings(consolidation=f"{level}_{'left' if side == 'right' else 'right'}")
            overlay, _, _ = draw_frontal(other, SIZE, SIZE, "AP", rng_for(seed, _STREAM["covidx"], i, 1))
            pixels = np.maximum(pixels, overlay)
        split = "test" if i % 10 == 0 else "train"
        items.append(COVIDxItem(patient_id=f"demo{i:05d}", filename=f"demo-{i:05d}.png", label=cls, image=pixels,
                                split=split, source=("rsna", "cohen", "sirm")[i % 3]))  # fmt: skip
        counts[cls] += 1
    write_covidx(root, items, version="COVIDx9A")
    return {"images": len(items), **{k.lower().replace("-", ""): v for k, v in counts.items()}}


def write_object_cxr_demo(root: Path, n: int, seed: int) -> dict[str, int]:
    from medvlp.datamodules.demo.object_cxr import ObjectCxrItem, _draw, write_object_cxr

    items = []
    for i in range(n):
        f, pixels, _, _ = _study("object_cxr", seed, i, SIZE)
        rng = rng_for(seed, _STREAM["object_cxr"], i, 2)
        objects: list[tuple[int, list[int]]] = []
        if i % 2:
            for _ in range(int(rng.integers(1, 3))):
                kind = int(rng.integers(3))
                x, y = int(rng.integers(20, SIZE - 30)), int(rng.integers(20, SIZE - 30))
                a, b = int(rng.integers(5, 12)), int(rng.integers(5, 12))
                if kind == 2:
                    objects.append((2, [x, y, x + a, y + 2, x + a // 2, y + b]))
                else:
                    objects.append((kind, [x, y, x + a, y + b]))
            pixels = _draw(pixels, objects)
        split = "dev" if i % 5 == 0 else "train"
        items.append(ObjectCxrItem(image_name=f"{i + 1:05d}.jpg", image=pixels, objects=objects, split=split))
    write_object_cxr(root, items)
    return {"images": len(items), "with_objects": sum(bool(it.objects) for it in items)}


_WRITERS = {
    "chexpert": write_chexpert_demo,
    "rsna": write_rsna_demo,
    "siim": write_siim_demo,
    "nih14": write_nih14_demo,
    "covidx": write_covidx_demo,
    "object_cxr": write_object_cxr_demo,
}


def write_downstream(kind: str, root: Path, n: int, seed: int) -> dict[str, int]:
    """Write the ``kind`` world (``KINDS``) with ``n`` images under ``root``; returns its counts."""
    root = Path(root)
    counts = _WRITERS[kind](root, n, seed)
    write_json(root / "demo_truth" / "info.json", {"kind": kind, "seed": seed, "counts": counts})
    return counts
