"""Write CheXpert (v1.0 / v1.0-small) in its exact on-disk layout (``specs/datasets.md`` §2).

:func:`write_chexpert` lays out any list of :class:`CheXpertItem` (pixels, labels, ids) as
``train.csv`` / ``valid.csv`` + ``{train,valid}/patientNNNNN/studyK/viewJ_{frontal,lateral}.jpg``.
The tiny test fixture of §2.7 (``write_chexpert_fixture``) lives in ``tests/format_fixtures.py``.

Also here: :func:`toy_radiograph`, a procedurally drawn chest-like uint8 image (the pixels of the
CheXpert, ChestX-ray14 and COVIDx test fixtures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.datamodules.demo._util import gaussian_blur, soft, write_csv

CHEXPERT_COLUMNS = [
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
CHEXPERT_LABELS = CHEXPERT_COLUMNS[5:]
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


@dataclass
class CheXpertItem:
    """One CheXpert image (one CSV row).

    ``labels`` maps CheXpert observation names to 1.0 / 0.0 / -1.0; a name that is missing (or
    None) is written blank. ``ap_pa``: None = ``PA`` for a frontal and blank for a lateral; ``""``
    forces a blank.
    """

    patient: str  # patient\d{5}: train patient00001-patient64540, valid patient64541-
    image: np.ndarray  # uint8 [H, W]
    labels: dict[str, float | None] = field(default_factory=dict)
    study: int = 1
    view: int = 1
    frontal: bool = True
    split: str = "train"  # train | valid
    sex: str = "Female"  # Male | Female | Unknown
    age: int = 60  # 0 = unknown
    ap_pa: str | None = None  # PA | AP | LL | RL | "" (blank)

    def rel(self) -> str:
        """Path of the image under the dataset folder."""
        kind = "frontal" if self.frontal else "lateral"
        return f"{self.split}/{self.patient}/study{self.study}/view{self.view}_{kind}.jpg"


def _fmt(value: float | None, valid: bool) -> str:
    if value is None:
        return "0.0" if valid else ""
    if value not in (1.0, 0.0, -1.0) or (valid and value == -1.0):
        raise ValueError(f"CheXpert label value {value} is not allowed in {'valid' if valid else 'train'}.csv")
    return f"{float(value):.1f}"


def write_chexpert(root: str | Path, items: list[CheXpertItem], prefix: str = "CheXpert-v1.0-small") -> Path:
    """Write ``items`` as a CheXpert release into ``root`` (the dataset folder itself).

    Args:
        root: dataset folder; gets ``train.csv``, ``valid.csv``, ``train/``, ``valid/``.
        items: images in CSV order; ``split`` picks the file. ``valid`` rows may hold only 0 / 1
            (blank is written as 0.0, as in the real ``valid.csv``).
        prefix: top folder written at the start of every ``Path`` (``CheXpert-v1.0-small`` or
            ``CheXpert-v1.0``), whatever ``root`` is called.

    Returns:
        ``root``.
    """
    root = Path(root)
    rows: dict[str, list[list[str]]] = {"train": [], "valid": []}
    for it in items:
        if it.split not in rows:
            raise ValueError(f"CheXpertItem.split must be train or valid, got {it.split!r}")
        unknown = set(it.labels) - set(CHEXPERT_LABELS)
        if unknown:
            raise ValueError(f"unknown CheXpert labels {sorted(unknown)}")
        img = np.asarray(it.image)
        if img.dtype != np.uint8 or img.ndim != 2:
            raise ValueError(f"CheXpertItem.image must be uint8 [H, W], got {img.dtype} {img.shape}")
        path = root / it.rel()
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(path, quality=95)
        ap_pa = ("PA" if it.frontal else "") if it.ap_pa is None else it.ap_pa
        valid = it.split == "valid"
        rows[it.split].append([
            f"{prefix}/{it.rel()}", it.sex, str(int(it.age)), "Frontal" if it.frontal else "Lateral", ap_pa,
            *(_fmt(it.labels.get(n), valid) for n in CHEXPERT_LABELS),
        ])  # fmt: skip
    for split in ("train", "valid"):
        write_csv(root / f"{split}.csv", CHEXPERT_COLUMNS, rows[split])
    return root


def toy_radiograph(rng: np.random.Generator, h: int, w: int, lateral: bool = False) -> np.ndarray:
    """A small chest-like uint8 ``[h, w]`` image: dark background, body, two darker lungs, noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (x + 0.5) / w, (y + 0.5) / h
    body = soft(1.0 - np.hypot((u - 0.5) / 0.46, (v - 0.55) / 0.5), 0.04)
    img = 15.0 + 110.0 * body
    centres = ((0.45, 0.3),) if lateral else ((0.3, 0.18), (0.7, 0.18))
    for cu, au in centres:
        lung = soft(1.0 - np.hypot((u - cu) / au, (v - 0.45) / 0.3), 0.05)
        img = img * (1 - lung) + 55.0 * lung
    img += float(rng.uniform(-10, 10)) + 12.0 * gaussian_blur(rng.standard_normal((h, w)).astype(np.float32), 1.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
