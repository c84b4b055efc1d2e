"""The tiny Pub-Brain-5 fixture of ``specs/datasets.md`` §12.5, in HLIP's layout.

Five study folders, one per source (``open_bhb``, ``stroke``, ``brats23/train/...``, ``nyu_mets``,
``ucsf_mets``), with 1 to 4 ``.pt`` series of non-square ``(D, H, W)`` float tensors in [0, 1] (one of
them 4-D, a DWI pair); a sixth listed study folder is empty. ``pub_brain_5.csv`` lists all six with
absolute ``/data/pub_brain_5/...`` paths and one-hot classes; ``pub_brain_5_gt.csv`` the open_bhb,
stroke and brats23 rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medvlp.datamodules.pub_brain5 import CLASSES

STUDIES = [  # (relative folder, class, series names, 4-D series index or -1)
    ("open_bhb/sub-135700393345", "Normal", ["t1"], -1),
    ("stroke/sub-b74a5032", "Stroke", ["adc", "dwi", "flair"], 1),
    ("brats23/train/adult_metastasis/BraTS-MET-00214-000", "Metastasis",
     ["BraTS-MET-00214-000-t1c", "BraTS-MET-00214-000-t1n", "BraTS-MET-00214-000-t2f", "BraTS-MET-00214-000-t2w"], -1),
    ("nyu_mets/NYU_Mets_96952621_1244531997", "Metastasis", ["t1_post", "flair"], -1),
    ("ucsf_mets/100222A", "Metastasis", ["t1c"], -1),
    ("brats23/train/glioma/BraTS-GLI-00459-000", "Glioma", [], -1),  # empty folder (HLIP skips it)
]
SHAPE = (6, 10, 12)


def write_pub_brain5_fixture(root: str | Path, seed: int = 0) -> Path:
    """Write the fixture under ``root``; returns ``root``."""
    import torch

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for folder, cls, series, four_d in STUDIES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(series):
            vol = rng.random(SHAPE, dtype=np.float32)
            vol[:, 0, 0] = i / 4  # identifies the series after loading (corner voxel)
            t = torch.from_numpy(vol)
            if i == four_d:
                t = torch.stack([t, 1 - t], dim=-1)
            torch.save(t, root / folder / f"{name}.pt")
        rows.append([f"/data/pub_brain_5/{folder}", *(int(c == cls) for c in CLASSES)])
    for name, keep in (("pub_brain_5.csv", lambda r: True),
                       ("pub_brain_5_gt.csv", lambda r: r[0].split("/")[3] in ("open_bhb", "stroke", "brats23"))):
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["study", *CLASSES])
            w.writerows(r for r in rows if keep(r))
    return root
