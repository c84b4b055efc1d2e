"""The synthetic brain-MRI world: multi-series studies in HLIP's study-JSON layout (``specs/datasets.md`` §12.4).

Layout written::

    <root>/train.json, valid.json        {"<study>": {"series": {"<series>": {"num_slices": D, "view": v}},
                                                       "report_length": n, "report": [sentence, ...]}}
    <root>/<study>/<series>/img.pt       uint8 tensor (D, H, W): through-plane axis first
    <root>/labels.csv                    study,<finding ...> (0/1), an extension for zero-shot evaluation
    <root>/demo_truth/info.json          counts and the world's settings

Each study is one synthetic head (skull, grey and white matter, two lateral ventricles) with zero
to three of ``BRAIN_FINDINGS`` drawn into it, imaged as 1 to 6 series (mostly 2 to 4) of different
contrasts (T1, T2, FLAIR, DWI, post-contrast T1), most axial, some coronal or sagittal (the stored
tensor is then the head seen from that side, through-plane axis first). A finding shows with the
contrast a radiologist expects - an acute infarct is brightest on DWI, a haemorrhage bright on T1
and dark on T2, an enhancing mass has a bright rim on post-contrast T1 - so which series a study
has changes what is visible, as in real studies. The report is a list of short sentences naming
every finding with its side and lobe, and some of the absent ones as negatives.

Traps: series names with spaces (``AX T1 POST``), a study with a single series, studies with more
series than a typical ``data.num_scans``, non-square in-plane sizes, and one study per split whose
report list is empty (a loader skips and counts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import (
    cap,
    gaussian_blur,
    pick,
    rng_for,
    smooth_noise,
    write_csv,
    write_json,
)

BRAIN_FINDINGS = ["Acute infarct", "Mass", "Hemorrhage", "Ventriculomegaly", "White matter lesions"]
PREVALENCE = {"Acute infarct": 0.25, "Mass": 0.2, "Hemorrhage": 0.2, "Ventriculomegaly": 0.25, "White matter lesions": 0.25}
GRID = (20, 44, 40)  # canonical (z: inferior -> superior, y: anterior -> posterior, x: right -> left)
SPLIT_VALID = 0.2
_STUDY_STREAM, _PIXEL_STREAM = 31, 32

# tissue and lesion intensities (0-255) per contrast
CONTRASTS = ("T1", "T2", "FLAIR", "DWI", "T1C")
TISSUE = {  # skull, grey matter, white matter, CSF
    "T1": (190, 110, 160, 35), "T2": (50, 140, 95, 235), "FLAIR": (60, 135, 105, 25),
    "DWI": (15, 100, 85, 20), "T1C": (190, 115, 160, 35),
}
LESION = {  # value per contrast, in CONTRASTS order
    "infarct": (80, 200, 215, 250, 80),
    "mass_core": (70, 195, 185, 120, 70),
    "mass_rim": (70, 195, 185, 120, 245),
    "edema": (125, 190, 185, 95, 125),
    "hemorrhage": (225, 30, 200, 45, 225),
    "wml": (125, 215, 240, 105, 125),
}
SERIES_NAMES = {  # contrast -> folder names by view (several spellings, spaces included)
    "T1": {"axial": ["AX_T1", "AX T1"], "coronal": ["COR_T1"], "sagittal": ["SAG_T1", "SAG T1"]},
    "T2": {"axial": ["AX_T2", "AX T2 FSE"], "coronal": ["COR_T2"], "sagittal": ["SAG_T2"]},
    "FLAIR": {"axial": ["AX_FLAIR", "AX T2 FLAIR"], "coronal": ["COR_FLAIR"], "sagittal": ["SAG_FLAIR"]},
    "DWI": {"axial": ["DWI_b1000", "AX DWI"], "coronal": ["DWI_b1000"], "sagittal": ["DWI_b1000"]},
    "T1C": {"axial": ["AX_T1_POST", "AX T1 POST"], "coronal": ["COR_T1_POST"], "sagittal": ["SAG_T1_POST"]},
}
LOBES = ["frontal", "parietal", "temporal", "occipital"]
DEEP = ["basal ganglia", "thalamus", "internal capsule"]
NEGATIVES = {
    "Acute infarct": ["No acute infarct.", "No restricted diffusion."],
    "Mass": ["No mass lesion.", "No intracranial mass."],
    "Hemorrhage": ["No intracranial hemorrhage.", "No hemorrhage."],
    "Ventriculomegaly": ["Ventricles are normal in size.", "No hydrocephalus."],
    "White matter lesions": ["No significant white matter disease.", "White matter signal is normal."],
}
NORMAL = ["No acute intracranial abnormality.", "Normal MRI of the brain.", "Unremarkable brain MRI."]


@dataclass
class BrainStudy:
    """One planned study: its findings, where they are, and its series."""

    study_id: str
    split: str
    findings: dict[str, dict] = field(default_factory=dict)  # name -> placement
    series: list[tuple[str, str, str]] = field(default_factory=list)  # (folder name, contrast, view)
    report: list[str] = field(default_factory=list)


def _place(rng: np.random.Generator, name: str) -> dict:
    side = pick(rng, ("right", "left"))
    sx = 1.0 if side == "left" else -1.0  # x grows towards the patient's left
    if name == "Acute infarct":
        lobe = pick(rng, LOBES)
        return {"side": side, "lobe": lobe, "centre": _lobe_centre(rng, lobe, sx, 0.62), "radius": (3.0, 6.0, 4.5)}
    if name == "Mass":
        lobe = pick(rng, LOBES)
        r = float(rng.uniform(3.5, 5.0))
        return {"side": side, "lobe": lobe, "centre": _lobe_centre(rng, lobe, sx, 0.42), "radius": (r * 0.7, r, r)}
    if name == "Hemorrhage":
        where = pick(rng, DEEP)
        c = (GRID[0] / 2 + rng.uniform(-2, 2), GRID[1] / 2 + rng.uniform(-3, 3), GRID[2] / 2 + sx * rng.uniform(5, 8))
        r = float(rng.uniform(2.5, 3.5))
        return {"side": side, "where": where, "centre": c, "radius": (r * 0.8, r, r)}
    if name == "White matter lesions":
        n = int(rng.integers(5, 10))
        spots = []
        for _ in range(n):
            s = pick(rng, (-1.0, 1.0))
            spots.append((GRID[0] / 2 + rng.uniform(-3, 4), GRID[1] / 2 + rng.uniform(-9, 9), GRID[2] / 2 + s * rng.uniform(6, 10)))
        return {"spots": spots}
    if name == "Ventriculomegaly":
        return {"scale": float(rng.uniform(1.6, 1.9))}
    raise KeyError(name)


def _lobe_centre(rng: np.random.Generator, lobe: str, sx: float, depth: float) -> tuple[float, float, float]:
    """A point in the hemisphere ``sx`` at fraction ``depth`` of the brain radius, in the lobe's quadrant."""
    zc, yc, xc = (n / 2 for n in GRID)
    ay = {"frontal": -0.55, "parietal": 0.25, "temporal": -0.05, "occipital": 0.7}[lobe] + rng.uniform(-0.1, 0.1)
    az = {"frontal": 0.2, "parietal": 0.45, "temporal": -0.4, "occipital": 0.05}[lobe] + rng.uniform(-0.1, 0.1)
    ax = sx * float(np.sqrt(max(0.15, 1 - ay**2 - az**2)))
    return (zc + az * depth * 8.5, yc + ay * depth * 19.0, xc + ax * depth * 17.0)


def _ellipsoid(centre: tuple[float, ...], radius: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.ogrid[: GRID[0], : GRID[1], : GRID[2]]
    return ((z - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2 + ((x - centre[2]) / radius[2]) ** 2


def _sentences(study: BrainStudy, rng: np.random.Generator) -> list[str]:
    out = []
    f = study.findings
    if "Acute infarct" in f:
        p = f["Acute infarct"]
        out.append(pick(rng, (f"Acute infarct in the {p['side']} {p['lobe']} lobe.",
                              f"Restricted diffusion in the {p['side']} {p['lobe']} lobe consistent with acute infarct.")))
    if "Mass" in f:
        p = f["Mass"]
        out.append(pick(rng, (f"Enhancing mass in the {p['side']} {p['lobe']} lobe with surrounding edema.",
                              f"Rim-enhancing mass of the {p['side']} {p['lobe']} lobe with vasogenic edema.")))
    if "Hemorrhage" in f:
        p = f["Hemorrhage"]
        out.append(pick(rng, (f"Intraparenchymal hemorrhage in the {p['side']} {p['where']}.",
                              f"Acute hemorrhage centred in the {p['side']} {p['where']}.")))
    if "Ventriculomegaly" in f:
        out.append(pick(rng, ("Ventriculomegaly with enlarged lateral ventricles.", "The lateral ventricles are enlarged.")))
    if "White matter lesions" in f:
        out.append(pick(rng, ("Scattered periventricular white matter hyperintensities.",
                              "Multiple white matter lesions, likely chronic small vessel disease.")))
    for name in BRAIN_FINDINGS:
        if name not in f and rng.random() < 0.45:
            out.append(pick(rng, NEGATIVES[name]))
    if not f:
        out.insert(0, pick(rng, NORMAL))
    order = rng.permutation(len(out))
    return [cap(out[i]) for i in order]


def plan_studies(n: int, seed: int) -> list[BrainStudy]:
    """The studies of a world of ``n`` (deterministic in ``seed``); the last study of each split has an empty report."""
    studies = []
    for i in range(n):
        rng = rng_for(seed, _STUDY_STREAM, i)
        split = "valid" if rng.random() < SPLIT_VALID else "train"
        s = BrainStudy(f"BRAIN_{i:06d}", split)
        for name in BRAIN_FINDINGS:
            if rng.random() < PREVALENCE[name]:
                s.findings[name] = _place(rng, name)
        k = 1 if i == 1 else 6 if i in (2, 3) else int(rng.choice([2, 3, 4], p=[0.3, 0.4, 0.3]))
        contrasts = [str(c) for c in rng.permutation(CONTRASTS)][: min(k, 5)] + (["T2"] if k == 6 else [])
        used: set[str] = set()
        for j, contrast in enumerate(contrasts):
            view = "axial" if rng.random() < 0.75 or j == 0 else pick(rng, ("coronal", "sagittal"))
            names = [nm for nm in SERIES_NAMES[contrast][view] if nm not in used]
            name = pick(rng, names) if names else f"{SERIES_NAMES[contrast][view][0]}_{j}"
            if i == 0 and j == 0:
                name = "AX T1 POST" if contrast == "T1C" else f"AX {contrast}"  # a name with a space, always
            used.add(name)
            s.series.append((name, contrast, view))
        s.report = _sentences(s, rng)
        studies.append(s)
    for split in ("train", "valid"):
        last = [s for s in studies if s.split == split]
        if len(last) > 2:
            last[-1].report = []
    return studies


def render(study: BrainStudy, contrast: str, view: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(D, H, W)`` of one series: through-plane axis first (axial: z; coronal: y; sagittal: x)."""
    zc, yc, xc = (n / 2 - 0.5 for n in GRID)
    head = _ellipsoid((zc, yc, xc), (9.6, 21.0, 19.0))
    skull, gm, wm, csf = TISSUE[contrast]
    ci = CONTRASTS.index(contrast)
    vol = np.zeros(GRID, np.float32)
    vol[head <= 1.0] = skull
    brain = head <= 0.82
    vol[brain] = gm
    vol[head <= 0.62] = wm
    f = study.findings
    scale = f.get("Ventriculomegaly", {}).get("scale", 1.0)
    for sx in (-1.0, 1.0):
        vent = _ellipsoid((zc + 1.0, yc - 1.0, xc + sx * 3.2 * scale**0.5), (2.6 * scale, 7.0 * scale**0.7, 1.8 * scale))
        vol[vent <= 1.0] = csf
    if "White matter lesions" in f:
        for c in f["White matter lesions"]["spots"]:
            spot = (_ellipsoid(c, (1.3, 1.8, 1.8)) <= 1.0) & brain
            vol[spot] = LESION["wml"][ci]
    if "Acute infarct" in f:
        p = f["Acute infarct"]
        vol[(_ellipsoid(p["centre"], p["radius"]) <= 1.0) & brain] = LESION["infarct"][ci]
    if "Mass" in f:
        p = f["Mass"]
        d = _ellipsoid(p["centre"], p["radius"])
        vol[(d <= 2.6) & (d > 1.0) & brain] = LESION["edema"][ci]
        vol[(d <= 1.0) & brain] = LESION["mass_rim"][ci]
        vol[(d <= 0.3) & brain] = LESION["mass_core"][ci]
    if "Hemorrhage" in f:
        p = f["Hemorrhage"]
        vol[(_ellipsoid(p["centre"], p["radius"]) <= 1.0) & brain] = LESION["hemorrhage"][ci]
    vol = gaussian_blur(vol, 0.6)
    bias = 1.0 + 0.08 * smooth_noise(rng, GRID, 6.0)
    vol = vol * bias + rng.normal(0.0, 5.0, GRID).astype(np.float32) * (head <= 1.05)
    if view == "coronal":
        vol = vol.transpose(1, 0, 2)[::2]  # (y, z, x), thick coronal slices
    elif view == "sagittal":
        vol = vol.transpose(2, 0, 1)[::2]  # (x, z, y)
    return np.clip(np.rint(vol), 0, 255).astype(np.uint8)


def write_dataset(root: Path, n_studies: int, seed: int) -> dict[str, int]:
    """Write the world under ``root``; returns its counts."""
    import torch

    root = Path(root)
    studies = plan_studies(n_studies, seed)
    index: dict[str, dict] = {"train": {}, "valid": {}}
    n_series = 0
    for i, s in enumerate(studies):
        series = {}
        for j, (name, contrast, view) in enumerate(s.series):
            arr = render(s, contrast, view, rng_for(seed, _PIXEL_STREAM, i, j))
            folder = root / s.study_id / name
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(arr), folder / "img.pt")
            series[name] = {"num_slices": int(arr.shape[0]), "view": view}
            n_series += 1
        index[s.split][s.study_id] = {"series": series, "report_length": len(s.report), "report": list(s.report)}
    write_json(root / "train.json", index["train"])
    write_json(root / "valid.json", index["valid"])
    write_csv(root / "labels.csv", ["study", *BRAIN_FINDINGS],
              [[s.study_id, *(int(n in s.findings) for n in BRAIN_FINDINGS)] for s in studies])
    counts = {"studies": len(studies), "series": n_series, "train_studies": len(index["train"]),
              "valid_studies": len(index["valid"]), "empty_reports": sum(not s.report for s in studies)}
    write_json(root / "demo_truth" / "info.json", {"world": "brain_mri", "seed": seed, "grid": list(GRID), "counts": counts,
                                                   "prevalence": PREVALENCE})
    return counts


def example_report(seed: int, n: int) -> list[str]:
    """``n`` report texts of the world (no pixels), e.g. for the demo tokenizer's corpus."""
    return ["This MRI study shows: " + " ".join(s.report) for s in plan_studies(n, seed) if s.report]


__all__ = ["BRAIN_FINDINGS", "BrainStudy", "example_report", "plan_studies", "render", "write_dataset"]
