"""Write CheXpert (v1.0 / v1.0-small) in its exact on-disk layout (``specs/datasets.md`` §2).

* :func:`write_chexpert` lays out any list of :class:`CheXpertItem` (pixels, labels, ids) as
  ``train.csv`` / ``valid.csv`` + ``{train,valid}/patientNNNNN/studyK/viewJ_{frontal,lateral}.jpg``;
* :func:`write_chexpert_fixture` writes the tiny test fixture of §2.7, one row or more per trap of
  §2.8 (ids, pixels and labels are made up). :data:`FIXTURE_PATIENTS` names what each row tests.

Also here: :func:`toy_radiograph`, a procedurally drawn chest-like uint8 image shared by the other
fixture writers of this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.datamodules.demo._util import gaussian_blur, rng_for, soft, write_csv

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


def fixture_items(seed: int = 0) -> list[CheXpertItem]:
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
    return write_chexpert(root, fixture_items(seed), prefix=prefix)
