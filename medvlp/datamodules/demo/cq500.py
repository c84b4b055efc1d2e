"""The tiny CQ500 fixture of ``specs/datasets.md`` §10.5, in the distributed layout.

Two scans, ``CQ500-CT-0`` and ``CQ500-CT-12``, extracted as the zips do (``CQ500-CT-<n>/CQ500CT<n>
CQ500CT<n>/Unknown Study/<series>/``: spaces in the names), each with two series (``CT PLAIN THIN``,
8 slices of 1.25 mm, and ``CT 5mm``, 8 slices of 5 mm), 32 x 32 int16 slices stored as HU + 1024 with
RescaleIntercept -1024, file numbers shuffled against anatomy, and ``reads.csv`` with the full
44-column header. Scan 12 has a haemorrhage (70 HU) that two of the three readers mark as ICH / IPH.
Every slice carries an orientation marker: 1000 HU in its first rows and columns, and only the
most superior slice of a series has it over the whole first row (checks the slice order).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medvlp.datamodules.cq500 import FINDINGS, READERS
from medvlp.datamodules.demo.dicom import write_dicom

SERIES = {"CT PLAIN THIN": 1.25, "CT 5mm": 5.0}
SCANS = (0, 12)
SIZE = 32


def head_slice(z: int, n_slices: int, bleed: bool, rng: np.random.Generator) -> np.ndarray:
    """HU ``[32, 32]``: air, skull ring, brain, optional bleed, orientation markers."""
    y, x = np.mgrid[:SIZE, :SIZE]
    r = np.hypot((y - 15.5) / 13, (x - 15.5) / 12)
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[r <= 1.0] = 1000.0  # skull
    hu[r <= 0.85] = 35.0  # brain
    if bleed:
        hu[(np.hypot(y - 12, x - 20) <= 4)] = 70.0
    hu += rng.normal(0, 3, hu.shape)
    hu[0, 0] = 1000.0
    if z == n_slices - 1:
        hu[0, :] = 1000.0  # the most superior slice
    return np.rint(hu)


def write_cq500_fixture(root: str | Path, seed: int = 0) -> Path:
    """Write the fixture under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for n in SCANS:
        study = root / f"CQ500-CT-{n}" / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study"
        for s, (series, thickness) in enumerate(SERIES.items()):
            folder = study / series
            order = rng.permutation(8)  # file number of each anatomical slice
            series_uid = f"1.2.826.0.1.3680043.8.498.{n}.{s + 1}"
            for z in range(8):
                stored = (head_slice(z, 8, n == 12, rng) + 1024).astype(np.int16)
                write_dicom(folder / f"CT{int(order[z]):06d}.dcm", stored, bits_stored=16, rescale=(1.0, -1024.0), tags={
                    "Modality": "CT", "PatientID": f"CQ500-CT-{n}", "SeriesInstanceUID": series_uid,
                    "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{n}",
                    "SOPInstanceUID": f"{series_uid}.{z + 1}", "SeriesDescription": series,
                    "ImagePositionPatient": [-80.0, -90.0, float(z * thickness)],
                    "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "PixelSpacing": [0.5, 0.5],
                    "SliceThickness": thickness, "InstanceNumber": int(order[z]) + 1,
                })
    header = ["name", "Category"] + [f"{r}:{f}" for r in READERS for f in FINDINGS]
    with open(root / "reads.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for n in SCANS:
            row = [f"CQ500-CT-{n}", "B1"]
            for reader in READERS:
                positive = {"ICH", "IPH"} if n == 12 and reader != "R3" else ({"Fracture"} if reader == "R3" else set())
                row += [int(f in positive) for f in FINDINGS]
            w.writerow(row)
    return root
