"""The tiny Rad-ChestCT fixture of ``specs/datasets.md`` §9.5, in the distributed format.

Three volumes (``trn00001``, ``val00002``, ``tst00003``) as ``.npz`` with the single key ``ct`` (int16
HU, clipped to [-1000, 1000], ``(slices, rows, cols)`` = 24 x 32 x 32 at the implied 0.8 mm, slices
from superior to inferior) in nested folders (as unpacked archives leave them), ``Summary_3630.csv``,
the three abnormality x location label files (``<abnormality>*<location>`` columns, 0/1 floats) and
HLIP's 15-class ``rad_chestct_labels.csv`` (calcification -> both calcification classes).

Each volume has a chest phantom (air -1000, body 40, lungs -850 HU) and a 1000-HU marker block in
its first (most superior) slices, at the patient's left-posterior corner, so orientation can be
checked after loading.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medvlp.datamodules.rad_chestct import CT_RATE_CLASSES

SHAPE = (24, 32, 32)
VOLUMES = [  # (NoteAcc_DEID, MRN_DEID, Set_Assigned, Subset_Assigned, folder, {abnormality*location: 1})
    ("trn00001", "mrn00011", "imgtrain_extra", "imgtrain", "part_a", {"nodule*right_lower_lobe": 1, "calcification*aorta": 1}),
    ("val00002", "mrn00012", "imgvalid", "imgvalid_a", "part_b/volumes", {"emphysema*left_upper_lobe": 1}),
    ("tst00003", "mrn00013", "imgtest", "imgtest_a", "part_b/volumes", {"atelectasis*lung": 1, "nodule*left_lung": 1,
                                                                          "pleural_effusion*right_lung": 1}),
]
COLUMNS = ["nodule*right_lower_lobe", "nodule*left_lung", "calcification*aorta", "emphysema*left_upper_lobe",
           "atelectasis*lung", "pleural_effusion*right_lung", "air_trapping*lung"]
FILES = {"train": "imgtrain_Abnormality_and_Location_Labels.csv", "val": "imgvalid_Abnormality_and_Location_Labels.csv",
         "test": "imgtest_Abnormality_and_Location_Labels.csv"}


def phantom(seed: int) -> np.ndarray:
    """int16 ``(slices, rows, cols)`` chest phantom with a bright marker in the superior-left-posterior corner."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((y - 15.5) / 13) ** 2 + ((x - 15.5) / 14) ** 2 <= 1
    lungs = body & ((((y - 15) / 9) ** 2 + ((x - 9) / 5) ** 2 <= 1) | (((y - 15) / 9) ** 2 + ((x - 22) / 5) ** 2 <= 1))
    hu = np.full(SHAPE, -1000.0)
    hu[body] = 40.0
    hu[lungs] = -850.0
    hu += rng.normal(0, 10, SHAPE)
    hu[:3, 24:, 26:] = 1000.0  # superior (first slices), posterior (high rows), patient left (high cols)
    return np.clip(np.rint(hu), -1000, 1000).astype(np.int16)


def write_rad_chestct_fixture(root: str | Path, seed: int = 0) -> Path:
    """Write the fixture under ``root``; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (acc, _, _, _, folder, _) in enumerate(VOLUMES):
        (root / folder).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(root / folder / f"{acc}.npz", ct=phantom(seed + i))
    with open(root / "Summary_3630.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["MRN_DEID", "NoteAcc_DEID", "Set_Assigned", "Subset_Assigned"])
        for acc, mrn, set_, subset, _, _ in VOLUMES:
            w.writerow([mrn, acc, set_, subset])
    for split, name in FILES.items():
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["NoteAcc_DEID", *COLUMNS])
            for acc, _, set_, _, _, positives in VOLUMES:
                if set_.startswith({"train": "imgtrain", "val": "imgvalid", "test": "imgtest"}[split]):
                    w.writerow([acc, *(f"{float(positives.get(c, 0)):.1f}" for c in COLUMNS)])
    with open(root / "rad_chestct_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["NoteAcc_DEID", *(c for c, _ in CT_RATE_CLASSES)])
        for acc, _, _, _, _, positives in VOLUMES:
            found = {c.split("*")[0] for c, v in positives.items() if v}
            w.writerow([acc, *(f"{float(src in found):.1f}" for _, src in CT_RATE_CLASSES)])
    return root
