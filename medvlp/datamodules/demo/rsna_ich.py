"""The tiny RSNA haemorrhage fixture of ``specs/datasets.md`` §11.5, in the Kaggle layout.

``stage_2_train/`` (flat) holds three slices of one series (z = 0, 5, 10 mm; ids in random order),
one slice of a second series (another study), and the known-corrupt ``ID_6431af929.dcm`` (truncated).
One slice of the first series has wrapped 12-bit values (``BitsStored`` 12, unsigned, intercept 0:
stored = HU mod 4096), one has a multi-valued ``WindowCenter`` / ``WindowWidth``. The other slices
are int16 with ``RescaleIntercept`` -1024. ``stage_2_train.csv`` has six rows per image in the
canonical subtype order, one image's block twice, and rows for the corrupt image.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo.dicom import write_dicom

CSV_ORDER = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
# (image id, study, series, z mm, storage, positive subtypes)
SLICES = [
    ("ID_0a1b2c3d4", "ID_st000001", "ID_se000001", 10.0, "int16", set()),
    ("ID_9f8e7d6c5", "ID_st000001", "ID_se000001", 0.0, "wrapped12", {"subdural", "any"}),
    ("ID_5e5e5e5e5", "ID_st000001", "ID_se000001", 5.0, "multiwindow", set()),
    ("ID_77aa77aa7", "ID_st000002", "ID_se000002", 0.0, "int16", {"epidural", "any"}),
]
SIZE = 32


def head_hu(z: float, seed: int) -> np.ndarray:
    """HU ``[32, 32]``: air, skull, brain; a 1000-HU marker at (0, 0) and one at (0, 1 + z / 5)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE]
    r = np.hypot((y - 15.5) / 13, (x - 15.5) / 12)
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[r <= 1.0] = 1000.0
    hu[r <= 0.85] = 35.0
    hu += rng.normal(0, 3, hu.shape)
    hu = np.clip(np.rint(hu), -1000, 1000)
    hu[0, 0] = 1000.0
    hu[0, 1 + int(z // 5)] = 1000.0
    return hu


def write_rsna_ich_fixture(root: str | Path, seed: int = 0) -> Path:
    """Write the fixture under ``root``; returns ``root``."""
    root = Path(root)
    folder = root / "stage_2_train"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, study, series, z, storage, _) in enumerate(SLICES):
        hu = head_hu(z, seed + i)
        tags = {"Modality": "CT", "PatientID": f"ID_pt{i:07d}", "StudyInstanceUID": study, "SeriesInstanceUID": series,
                "SOPInstanceUID": image, "ImagePositionPatient": [-125.0, -110.0, z],
                "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "PixelSpacing": [0.5, 0.5]}
        if storage == "wrapped12":
            stored = np.where(hu >= 0, hu, hu + 4096).astype(np.uint16)
            write_dicom(folder / f"{image}.dcm", stored, bits_stored=12, rescale=(1.0, 0.0), tags=tags)
        else:
            window = ([40.0, 40.0], [80.0, 80.0]) if storage == "multiwindow" else None
            if window:
                tags.update(WindowCenter=window[0], WindowWidth=window[1])
            write_dicom(folder / f"{image}.dcm", (hu + 1024).astype(np.int16), bits_stored=16, rescale=(1.0, -1024.0),
                        tags=tags)
    (folder / "ID_6431af929.dcm").write_bytes(b"DICM" + b"\0" * 60)  # corrupt, as the real one is unusable
    rows = []
    for image, *_, positives in SLICES + [("ID_6431af929", "", "", 0.0, "", set())]:
        rows += [[f"{image}_{sub}", int(sub in positives)] for sub in CSV_ORDER]
    rows += rows[:6]  # one image's block listed twice, as in the real file
    with open(root / "stage_2_train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Label"])
        w.writerows(rows)
    return root
