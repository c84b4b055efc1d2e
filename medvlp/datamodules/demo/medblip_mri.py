"""The tiny MedBLIP-list fixture of ``specs/datasets.md`` §13.4.

Six NIfTI volumes of 16 x 20 x 24 voxels (non-cubic) - a head whose dark ventricles grow with the
diagnosis (CN < MCI < AD), so the label is visible in the pixels - and one tab-separated,
header-less ``.csv`` list per cohort under ``local_data/``, with texts covering every label spelling,
OASIS-2's ``Converted`` and a row without a diagnosis. Two ADNI visits of one subject (same PTID)
show that splits go by subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPE = (16, 20, 24)  # (z, y, x)
VENTRICLE = {"CN": 2.0, "MCI": 3.5, "AD": 5.0}
# (list, image path, subject sentence, diagnosis word or None, severity)
ROWS = [
    ("ADNI-train", "ADNI/002_S_0295/visit1.nii.gz", "A 74-year-old male, 16 years of education, MMSE 28.", "CN", "CN"),
    ("ADNI-train", "ADNI/002_S_0295/visit2.nii.gz", "A 76-year-old male, 16 years of education, MMSE 27.", "MCI", "MCI"),
    ("ADNI-train", "ADNI/011_S_0003/visit1.nii.gz", "An 81-year-old female, 12 years of education, MMSE 20.", "Dementia", "AD"),
    ("OASIS2-train", "OASIS2/OAS2_0001/mri.nii.gz", "An 87-year-old male. CDR 0.", "Nondemented", "CN"),
    ("OASIS2-train", "OASIS2/OAS2_0002/mri.nii.gz", "A 75-year-old male. CDR 0.5.", "Converted", "MCI"),
    ("ADNI-test", "ADNI/027_S_0120/visit1.nii.gz", "A 69-year-old female, MMSE 24.", "AD", "AD"),
    ("ADNI-test", "ADNI/027_S_0120/visit1.nii.gz", "A 69-year-old female, MMSE 24.", None, "AD"),
    ("AIBL-test", "AIBL/sub-1001/t1.nii.gz", "A 70-year-old female.", "NC", "CN"),
    ("AIBL-test", "AIBL/sub-1002/t1.nii.gz", "A 72-year-old male.", "Demented", "AD"),
]


def brain(severity: str, seed: int) -> np.ndarray:
    """float32 (z, y, x): background 0, head ~100, brain ~60, ventricles ~10 (radius by severity)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
    c = [(n - 1) / 2 for n in SHAPE]
    r = np.sqrt(((z - c[0]) / 7.5) ** 2 + ((y - c[1]) / 9.5) ** 2 + ((x - c[2]) / 11.5) ** 2)
    vol = np.zeros(SHAPE, np.float32)
    vol[r <= 1.0] = 100.0
    vol[r <= 0.85] = 60.0
    vent = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + ((x - c[2]) / 1.5) ** 2) <= VENTRICLE[severity]
    vol[vent] = 10.0
    return vol + rng.normal(0, 2, SHAPE).astype(np.float32)


def write_medblip_fixture(root: str | Path, seed: int = 0) -> Path:
    """Write the fixture under ``root``; returns ``root``."""
    import SimpleITK as sitk

    root = Path(root)
    lists: dict[str, list[str]] = {}
    for i, (name, image, sentence, word, severity) in enumerate(ROWS):
        path = root / image
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            img = sitk.GetImageFromArray(brain(severity, seed + i))
            img.SetSpacing((1.2, 1.0, 1.1))
            sitk.WriteImage(img, str(path))
        text = sentence + (f" The diagnosis is {word}." if word else "")
        lists.setdefault(name, []).append(f"{image}\t{text}")
    (root / "local_data").mkdir(parents=True, exist_ok=True)
    for name, lines in lists.items():
        (root / "local_data" / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
