"""Synthetic chest CT volumes with reports, written in the CT-RATE layout (``specs/datasets.md`` §8).

Layers, kept apart:

* **findings** - :class:`CtFindings`, the ground truth of one scan;
* **reports** - :func:`compose_report` writes ``Findings_EN`` / ``Impressions_EN`` that state every
  present finding (side / lobe) and negate a random subset of absent ones; :func:`anatomy_report`
  splits the same sentences by fVLM anatomy (``desc_info.json`` / ``conc_info.json``);
* **voxels** - :func:`render_scene` builds a chest in Hounsfield units with a TotalSegmentator-v2
  label map, :func:`reconstruct` adds kernel-dependent noise per reconstruction;
* **dataset** - :func:`write_dataset` lays out patients / scans / reconstructions, v1 volumes (raw
  stored values, default header), a few v2 ``*_fixed`` copies, every CSV, anatomy masks, fVLM's
  per-anatomy report files and truth.

Array order is SimpleITK's ``(z, y, x)``: x runs to the patient's left, y to posterior, z to
superior (slice 0 is the lowest), matching an identity direction in LPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvlp.datamodules.demo._util import (
    cap,
    fmt_float,
    gaussian_blur,
    pick,
    rng_for,
    smooth_noise,
    write_csv,
    write_json,
)

CT_FINDINGS = [
    "Cardiomegaly", "Pleural effusion", "Lung nodule", "Consolidation", "Emphysema", "Arterial wall calcification",
    "Hiatal hernia",
]  # fmt: skip
CT_RATE_LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]  # fmt: skip
REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
METADATA_COLUMNS = [
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType",
    "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "NumberofSlices", "ZSpacing", "StudyDate",
]  # fmt: skip
TRUTH_COLUMNS = [
    "VolumeName", "split", *CT_FINDINGS, "effusion_side", "nodule_lobe", "nodule_x", "nodule_y", "nodule_z",
    "nodule_radius_mm", "nodule_count", "consolidation_lobe", "calcified_plaques", "heart_volume_ml",
]  # fmt: skip
_GEOMETRY_COLUMNS = TRUTH_COLUMNS[2 + len(CT_FINDINGS) :]  # truth cells returned by render_scene
# TotalSegmentator v2 ``total`` task ids of the structures the world draws (specs/methods/fvlm.md §3.1).
ANATOMY_LABELS = {
    5: "liver", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea", 51: "heart",
    52: "aorta",
}  # fmt: skip
LOBES = {"right_upper": 12, "right_middle": 13, "right_lower": 14, "left_upper": 10, "left_lower": 11}
# fVLM's four anatomies (specs/methods/fvlm.md §3.1), the keys of desc_info.json / conc_info.json.
FVLM_ANATOMIES = ("lung", "heart", "esophagus", "aorta")
IN_PLANE = 80  # Rows = Columns
_SCAN_STREAM, _RECON_STREAM, _PLAN_STREAM, _TEXT_STREAM, _HERNIA_STREAM = 10, 11, 12, 13, 14
HERNIA_P = 0.25  # drawn from its own stream, so the other draws of a scan do not depend on it

# ---------------------------------------------------------------------------------------------- findings


@dataclass
class CtFindings:
    """Ground truth of one chest CT scan (shared by its reconstructions)."""

    cardiomegaly: bool = False
    effusion: str = ""  # "", "left", "right", "bilateral"
    effusion_size: str = ""  # small | moderate | large
    nodule: str = ""  # "" or a LOBES key: lobe of the largest nodule
    nodule_mm: int = 0  # diameter of the largest nodule
    nodule_count: int = 1  # with a nodule: how many; the others are smaller and anywhere in the lungs
    consolidation: str = ""  # "" or a LOBES key
    emphysema: bool = False
    calcification: bool = False
    hernia: bool = False  # sliding hiatal hernia (distal oesophagus / stomach above the diaphragm)

    def labels(self) -> dict[str, int]:
        """The seven simulated CT-RATE labels (``CT_FINDINGS``) as 0/1."""
        flags = [self.cardiomegaly, self.effusion, self.nodule, self.consolidation, self.emphysema, self.calcification,
                 self.hernia]  # fmt: skip
        return {name: int(bool(flag)) for name, flag in zip(CT_FINDINGS, flags, strict=True)}


def sample_findings(rng: np.random.Generator) -> CtFindings:
    """Each of the first six findings independently with p = 0.25 (location / size drawn uniformly).

    The hiatal hernia is not drawn here: :func:`plan_scans` draws it (p = ``HERNIA_P``) from a stream
    of its own.
    """
    flags = rng.random(6) < 0.25
    f = CtFindings(cardiomegaly=bool(flags[0]), emphysema=bool(flags[4]), calcification=bool(flags[5]))
    if flags[1]:
        f.effusion = pick(rng, ("left", "right", "bilateral"))
        f.effusion_size = pick(rng, ("small", "moderate", "large"))
    if flags[2]:
        f.nodule, f.nodule_mm = pick(rng, list(LOBES)), int(rng.integers(26, 35))
        f.nodule_count = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
    if flags[3]:
        f.consolidation = pick(rng, list(LOBES))
    return f


# ---------------------------------------------------------------------------------------------- reports

_POS = {
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present.", "Heart size is increased, consistent with cardiomegaly.",
                     "Cardiomegaly is noted."],
    "Pleural effusion": ["{eside} pleural effusion is present.", "There is {esize} pleural effusion on the {eplace}.",
                         "{esize} {eside} pleural effusion with adjacent compressive changes."],
    "Lung nodule": ["A {mm} mm solid nodule is seen in the {nlobe}.", "There is a {mm} mm nodule in the {nlobe}.",
                    "Lung nodule measuring {mm} mm in the {nlobe}."],
    "Consolidation": ["There is an area of consolidation in the {clobe}.", "Consolidation is present in the {clobe}.",
                      "Patchy consolidation in the {clobe} with air bronchograms."],
    "Emphysema": ["Emphysematous changes are present in both lungs.", "Emphysema is present in both lungs.",
                  "Centrilobular emphysema in both lungs."],
    "Arterial wall calcification": ["Calcified atherosclerotic plaques are seen in the wall of the thoracic aorta.",
                                    "Arterial wall calcification is present in the aorta.",
                                    "There is calcification of the aortic wall."],
    "Hiatal hernia": ["A hiatal hernia is present.", "There is a sliding hiatal hernia.", "Hiatal hernia is seen."],
}  # fmt: skip
_IMPR = {
    "Cardiomegaly": ["Cardiomegaly."],
    "Pleural effusion": ["{eside} pleural effusion.", "{esize} {eside} pleural effusion."],
    "Lung nodule": ["{mm} mm nodule in the {nlobe}.", "Lung nodule in the {nlobe}."],
    "multiple nodules": ["Multiple lung nodules, the largest measuring {mm} mm in the {nlobe}.",
                         "Multiple pulmonary nodules, the largest in the {nlobe}."],
    "Consolidation": ["Consolidation in the {clobe}.", "{clobe} consolidation, may represent pneumonia."],
    "Emphysema": ["Emphysema.", "Emphysematous changes in both lungs."],
    "Arterial wall calcification": ["Atherosclerotic calcification of the aorta.", "Arterial wall calcification."],
    "Hiatal hernia": ["Hiatal hernia.", "Sliding hiatal hernia."],
}
_NEG = {
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly.", "Cardiomegaly is not present.", "The heart is of normal size."],
    "Pleural effusion": ["No pleural effusion.", "Pleural effusion is not present.", "No pleural effusion or pleural thickening."],
    "Lung nodule": ["No lung nodule.", "No pulmonary nodule or mass is seen.", "Lung nodule is not present.", "No pulmonary nodule."],
    "Consolidation": ["No consolidation.", "No infiltration or consolidation in either lung.", "Consolidation is not present."],
    "Emphysema": ["No emphysema.", "There is no emphysema.", "Emphysema is not present."],
    "Arterial wall calcification": ["No arterial wall calcification.", "No calcified plaque in the aortic wall.",
                                    "The thoracic aorta is of normal caliber without wall calcification.",
                                    "Arterial wall calcification is not present."],
    "Hiatal hernia": ["No hiatal hernia.", "Hiatal hernia is not present."],
    # CT-RATE labels the world never draws: negated only, so that every prompt word is in the corpus
    "Medical material": ["No medical material.", "Medical material is not present."],
    "Pericardial effusion": ["No pericardial effusion.", "Pericardial effusion is not present."],
    "Coronary artery wall calcification": ["No coronary artery wall calcification.",
                                           "Coronary artery wall calcification is not present."],
    "Lymphadenopathy": ["No lymphadenopathy.", "No mediastinal or hilar lymphadenopathy."],
    "Atelectasis": ["No atelectasis.", "Atelectasis is not present."],
    "Lung opacity": ["No lung opacity.", "No ground glass opacity."],
    "Pulmonary fibrotic sequela": ["No pulmonary fibrotic sequela.", "No fibrotic sequela."],
    "Mosaic attenuation pattern": ["No mosaic attenuation pattern.", "Mosaic attenuation pattern is not present."],
    "Peribronchial thickening": ["No peribronchial thickening.", "Peribronchial thickening is not present."],
    "Bronchiectasis": ["No bronchiectasis.", "Bronchiectasis is not present."],
    "Interlobular septal thickening": ["No interlobular septal thickening.", "Interlobular septal thickening is not present."],
}  # fmt: skip
# report order: (anatomy group, labels described there)
_GROUPS = [
    ("airway", []), ("mediastinum", ["Lymphadenopathy", "Medical material"]),
    ("heart", ["Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"]),
    ("aorta", ["Arterial wall calcification"]), ("esophagus", ["Hiatal hernia"]),
    ("lungs", ["Emphysema", "Lung nodule", "Consolidation", "Atelectasis", "Lung opacity", "Pulmonary fibrotic sequela",
               "Mosaic attenuation pattern", "Peribronchial thickening", "Bronchiectasis", "Interlobular septal thickening"]),
    ("pleura", ["Pleural effusion"]), ("abdomen", []), ("bone", []),
]  # fmt: skip
# report group -> fVLM anatomy of its sentences; airway, mediastinum, abdomen and bone sentences have none
_GROUP_ANATOMY = {"lungs": "lung", "pleura": "lung", "heart": "heart", "esophagus": "esophagus", "aorta": "aorta"}
# absent findings negated with p = 0.6, the other labels with p = 0.3; the hiatal hernia keeps the lower
# rate of the labels that are never drawn, so a report without a hernia reads as it did before it was simulated
_OFTEN_NEGATED = frozenset(CT_FINDINGS) - {"Hiatal hernia"}
_FIXED = {
    "airway": ["Trachea and both main bronchi are patent.", "The trachea and main bronchi are open and of normal caliber."],
    "mediastinum": ["Mediastinal structures are unremarkable.", "No mass is seen in the mediastinum."],
    "abdomen": ["The liver is of normal size in the sections included.", "Upper abdominal organs in the sections are unremarkable."],
    "bone": ["No lytic or sclerotic bone lesion.", "Bony structures of the thorax are intact."],
}  # fmt: skip
_MORE_NODULES = {  # number of additional nodules -> wordings
    1: ["One additional smaller nodule is seen in the lungs.", "There is one more nodule of smaller size in the lungs."],
    2: ["Two additional smaller nodules are seen in the lungs.", "There are two more nodules of smaller size in the lungs."],
    3: ["Three additional smaller nodules are seen in the lungs.", "There are three more nodules of smaller size in the lungs."],
}  # fmt: skip
_NORMAL_IMPRESSION = ["No significant pathology in the thorax.", "Normal chest CT.", "No acute pathology."]
_CLINICAL = ["Cough.", "Shortness of breath.", "Chest pain.", "Fever and cough.", "Follow-up of a pulmonary nodule.",
             "Screening.", "Dyspnea on exertion."]  # fmt: skip


def _lobe_words(key: str) -> str:
    side, lobe = key.split("_")
    return f"{side} {lobe} lobe"


Sentences = list[tuple[str, str]]  # (sentence, fVLM anatomy or "" for none)


def compose_sentences(f: CtFindings, rng: np.random.Generator) -> tuple[Sentences, Sentences]:
    """The findings and impression sentences of a scan, each with the fVLM anatomy it describes.

    Findings: a few fixed normal statements, every present finding with side / lobe, random negations
    of absent ones (a negation belongs to the anatomy of its label); impression: one line per present
    finding, else a normal impression (no anatomy).

    Args:
        f: the scan's findings.
        rng: generator for the wording.

    Returns:
        ``(findings, impression)``, lists of ``(sentence, anatomy)`` with anatomy one of
        ``FVLM_ANATOMIES`` or ``""``.
    """
    fields = {
        "eside": f.effusion, "esize": f.effusion_size,
        "eplace": "both sides" if f.effusion == "bilateral" else f"{f.effusion} side",
        "nlobe": _lobe_words(f.nodule) if f.nodule else "", "mm": str(f.nodule_mm),
        "clobe": _lobe_words(f.consolidation) if f.consolidation else "",
    }  # fmt: skip
    present = {k for k, v in f.labels().items() if v}
    findings: Sentences = []
    impression: Sentences = []
    for group, names in _GROUPS:
        anatomy = _GROUP_ANATOMY.get(group, "")
        if group in _FIXED and rng.random() < 0.6:
            findings.append((pick(rng, _FIXED[group]), anatomy))
        for name in names:
            if name in present:
                findings.append((cap(pick(rng, _POS[name]).format(**fields)), anatomy))
                several = name == "Lung nodule" and f.nodule_count > 1
                if several:
                    findings.append((pick(rng, _MORE_NODULES[f.nodule_count - 1]), anatomy))
                line = cap(pick(rng, _IMPR["multiple nodules" if several else name]).format(**fields))
                impression.append((line, anatomy))
            elif rng.random() < (0.6 if name in _OFTEN_NEGATED else 0.3):
                findings.append((pick(rng, _NEG[name]), anatomy))
    if not impression:
        impression.append((pick(rng, _NORMAL_IMPRESSION), ""))
    return findings, impression


def compose_report(f: CtFindings, rng: np.random.Generator) -> tuple[str, str]:
    """``(Findings_EN, Impressions_EN)`` for a scan: every present finding with side / lobe, random negations.

    Args:
        f: the scan's findings.
        rng: generator for the wording.

    Returns:
        Two texts of full sentences separated by single spaces (:func:`compose_sentences` joined).
    """
    findings, impression = compose_sentences(f, rng)
    return " ".join(s for s, _ in findings), " ".join(s for s, _ in impression)


def anatomy_texts(sentences: Sentences) -> dict[str, str]:
    """``{anatomy: its sentences joined by single spaces}`` in ``FVLM_ANATOMIES`` order, mentioned anatomies only."""
    out = {a: " ".join(s for s, x in sentences if x == a) for a in FVLM_ANATOMIES}
    return {a: text for a, text in out.items() if text}


def anatomy_report(f: CtFindings, rng: np.random.Generator, z_spacing: float) -> tuple[dict[str, str], ...]:
    """A ``*_reports.csv`` row and its decomposition by fVLM anatomy (what ``desc_info.json`` /
    ``conc_info.json`` hold for the scan).

    Args:
        f: the scan's findings.
        rng: generator for the wording (consumed exactly as by :func:`report_row`).
        z_spacing: slice thickness in mm, quoted in the technique.

    Returns:
        ``(row, findings by anatomy, impression by anatomy)``; ``row`` as :func:`report_row`.
    """
    findings, impression = compose_sentences(f, rng)
    row = {
        "ClinicalInformation_EN": "Not given." if rng.random() < 0.1 else pick(rng, _CLINICAL),
        "Technique_EN": f"Non-contrast axial images of the thorax were obtained with {fmt_float(z_spacing)} mm slice thickness.",
        "Findings_EN": " ".join(s for s, _ in findings),
        "Impressions_EN": " ".join(s for s, _ in impression),
    }
    return row, anatomy_texts(findings), anatomy_texts(impression)


def report_row(f: CtFindings, rng: np.random.Generator, z_spacing: float) -> dict[str, str]:
    """The four text cells of a ``*_reports.csv`` row (``Not given.`` for ~10 % of clinical fields)."""
    return anatomy_report(f, rng, z_spacing)[0]


# ---------------------------------------------------------------------------------------------- voxels


def _seg_dist(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((x - a[0]) * dx + (y - a[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - (a[0] + t * dx), y - (a[1] + t * dy))


def _ball(shape: tuple[int, ...], centre: tuple[int, ...], radius: float, spacing: tuple[float, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """A ball of ``radius`` mm around voxel ``centre``: ``(crop slices, boolean mask inside the crop)``."""
    box, axes = [], []
    for c, size, s in zip(centre, shape, spacing):
        r = int(np.ceil(radius / s))
        lo, hi = max(c - r, 0), min(c + r + 1, size)
        box.append(slice(lo, hi))
        axes.append((np.arange(lo, hi) - c) * s)
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return tuple(box), zz**2 + yy**2 + xx**2 < radius**2


class _Grid:
    """Normalised voxel coordinates of one scan plus its generator.

    ``X``, ``Y`` run over [-1, 1] across the in-plane field of view (to the patient's left /
    posterior), ``Z`` over [0, 1] from the lowest to the highest slice; they broadcast to
    ``shape = (nz, 80, 80)``. ``mm_xy`` / ``mm_z`` convert normalised units to millimetres.
    """

    def __init__(self, nz: int, spacing: tuple[float, float], rng: np.random.Generator) -> None:
        self.sp, self.dz = spacing
        self.shape = (nz, IN_PLANE, IN_PLANE)
        self.mm_xy, self.mm_z = IN_PLANE * self.sp / 2.0, nz * self.dz
        axis = (np.arange(IN_PLANE, dtype=np.float32) + 0.5) / IN_PLANE * 2 - 1
        self.Z = ((np.arange(nz, dtype=np.float32) + 0.5) / nz)[:, None, None]
        self.Y, self.X = axis[None, :, None], axis[None, None, :]
        self.rng = rng

    def jit(self, s: float) -> float:
        """A small random offset (normal, standard deviation ``s``)."""
        return float(self.rng.normal(0, s))

    def dist_mm(self, z: float, y: float, x: float) -> np.ndarray:
        """Distance in mm of every voxel from the normalised point (z, y, x)."""
        return np.sqrt(((self.X - x) * self.mm_xy) ** 2 + ((self.Y - y) * self.mm_xy) ** 2 + ((self.Z - z) * self.mm_z) ** 2)


@dataclass
class _Chest:
    """Masks of the drawn anatomy that later layers depend on."""

    body: np.ndarray  # squared normalised body radius (< 0.86 inside the muscle wall)
    heart: np.ndarray
    heart_z: float
    lungs: dict[str, np.ndarray]  # side -> mask (pleural space included)
    lung_y: dict[str, np.ndarray]  # side -> -1 anterior .. +1 posterior position inside that lung

    @property
    def lung(self) -> np.ndarray:
        return self.lungs["right"] | self.lungs["left"]


def _draw_chest(g: _Grid, f: CtFindings, hu: np.ndarray, lab: np.ndarray) -> _Chest:
    """Body wall, mediastinal fat, heart, lungs with lobes (TotalSegmentator ids) and liver."""
    X, Y, Z = g.X, g.Y, g.Z
    taper = 1.0 - 0.06 * Z
    body = (X / ((0.84 + g.jit(0.02)) * taper)) ** 2 + ((Y - 0.04) / ((0.58 + g.jit(0.02)) * taper)) ** 2
    hu[body < 1.0] = -100.0  # subcutaneous fat
    hu[body < 0.86] = 40.0  # muscle and organs
    hs = (1.38, 1.3, 1.22) if f.cardiomegaly else (1.0, 1.0, 1.0)
    hc = (0.10 + g.jit(0.015), -0.16 + g.jit(0.015), 0.36 + g.jit(0.015))
    rh = ((X - hc[0]) / (0.24 * hs[0])) ** 2 + ((Y - hc[1]) / (0.22 * hs[1])) ** 2 + ((Z - hc[2]) / (0.15 * hs[2])) ** 2
    med = (np.abs(X - 0.03) < 0.13) & (Y > -0.45) & (Y < 0.35) & (Z > 0.3)
    hu[med | (rh < 1.3)] = -70.0  # mediastinal and epicardial fat
    apex_scale = np.sqrt(np.clip((0.95 + g.jit(0.01) - Z) / 0.30, 0, 1))
    lungs, lung_y = {}, {}
    for side, cx in (("right", -0.40), ("left", 0.40)):
        cy, ax, ay = 0.02, 0.29 + g.jit(0.01), 0.40 + g.jit(0.01)
        rr = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2
        dome = 0.20 + 0.13 * np.clip(1 - rr, 0, 1) + (0.04 if side == "right" else 0.0)
        lungs[side] = (rr < apex_scale**2) & (Z > dome) & ~med & ~(rh < 1.4)
        lung_y[side] = (Y - cy) / (ay * np.maximum(apex_scale, 0.05))
    lower = Z < 0.52 + 0.22 * Y  # oblique fissure, higher posteriorly
    lab[lungs["left"] & ~lower], lab[lungs["left"] & lower] = LOBES["left_upper"], LOBES["left_lower"]
    lab[lungs["right"] & ~lower & (Z >= 0.60)] = LOBES["right_upper"]  # above the horizontal fissure
    lab[lungs["right"] & ~lower & (Z < 0.60)] = LOBES["right_middle"]
    lab[lungs["right"] & lower] = LOBES["right_lower"]
    chest = _Chest(body, rh < 1.0, hc[2], lungs, lung_y)
    liver = (((X + 0.30) / 0.55) ** 2 + (Y / 0.48) ** 2 + ((Z - 0.05) / 0.28) ** 2 < 1.0) & (body < 0.86)
    liver &= ~chest.lung & ~chest.heart
    hu[liver], lab[liver] = 58.0, 5
    return chest


def _draw_lungs(g: _Grid, f: CtFindings, c: _Chest, hu: np.ndarray, lab: np.ndarray) -> dict:
    """Parenchyma with vessels, then emphysema, effusion, consolidation and nodule; returns truth cells."""
    X, Y, Z, rng, lung = g.X, g.Y, g.Z, g.rng, c.lung
    parenchyma = (-945.0 if f.emphysema else -840.0) + 15.0 * smooth_noise(rng, g.shape, (0.6, 1.0, 1.0))
    hilum_d2 = (np.abs(X) - 0.22) ** 2 + (Y - 0.02) ** 2 + ((Z - 0.55) * g.mm_z / g.mm_xy) ** 2
    threshold = 2.0 + (0.4 if f.emphysema else 0.0) - 0.7 * np.exp(-hilum_d2 / 0.08)  # denser near the hila
    vessel = smooth_noise(rng, g.shape, (0.7, 1.0, 1.0)) > threshold
    parenchyma = np.where(vessel, -450.0, parenchyma)  # thin vessels, partial-volume averaged
    if f.emphysema:  # low-attenuation holes, upper-lobe predominant
        bullae = smooth_noise(rng, g.shape, 1.0) < -1.3 - 0.5 * (1.0 - Z)
        parenchyma = np.where(bullae & ~vessel, -985.0, parenchyma)
    hu[lung] = parenchyma[lung]
    fluid = np.zeros(g.shape, bool)
    for side in (("left", "right") if f.effusion == "bilateral" else (f.effusion,) if f.effusion else ()):
        depth = {"small": 0.35, "moderate": 0.6, "large": 0.85}[f.effusion_size] * np.clip(1 - (Z - 0.2) / 0.45, 0.2, 1)
        fluid |= c.lungs[side] & (c.lung_y[side] > 1.0 - 2.0 * depth)  # dependent (posterior), deepest at the base
    hu[fluid] = 12.0 + 6.0 * rng.standard_normal(int(fluid.sum()))
    truth = {"effusion_side": f.effusion, "consolidation_lobe": f.consolidation, "nodule_lobe": f.nodule}
    if f.consolidation:  # a smooth blob covering 45-70 % of the lobe
        region = (lab == LOBES[f.consolidation]) & ~fluid
        idx = np.flatnonzero(region)
        z0, y0, x0 = np.unravel_index(idx[rng.integers(idx.size)], g.shape)
        sigma, blob = rng.uniform(25, 32), np.zeros(g.shape, np.float32)
        for dzv, dyv, dxv in rng.normal(0, 20, (3, 3)):
            d = g.dist_mm(Z.flat[z0] + dzv / g.mm_z, Y.flat[y0] + dyv / g.mm_xy, X.flat[x0] + dxv / g.mm_xy)
            blob += np.exp(-(d**2) / (2 * sigma**2))
        cons = region & (blob >= np.quantile(blob[region], 1.0 - rng.uniform(0.45, 0.7)))
        hu[cons] = np.clip(-40.0 + 35.0 * rng.standard_normal(int(cons.sum())), -100, 40)
    if f.nodule:  # solid balls: the largest in the named lobe, the others smaller and anywhere
        aerated = lung & ~fluid
        for k in range(f.nodule_count):
            radius = f.nodule_mm / 2.0 * (1.0 if k == 0 else rng.uniform(0.6, 0.85))
            centre, box, ball = _place_ball(g, rng, (lab == LOBES[f.nodule]) if k == 0 else lung, aerated, radius)
            hu[box][ball] = 50.0 + 8.0 * rng.standard_normal(int(ball.sum()))
            if k == 0:
                truth.update(nodule_x=int(centre[2]), nodule_y=int(centre[1]), nodule_z=int(centre[0]),
                             nodule_radius_mm=radius, nodule_count=f.nodule_count)  # fmt: skip
    return truth


def _place_ball(g: _Grid, rng: np.random.Generator, where: np.ndarray, aerated: np.ndarray, radius: float) -> tuple:
    """A ball of ``radius`` mm centred in ``where``, preferably entirely inside ``aerated`` (25 tries).

    Returns:
        ``(centre voxel, crop slices, ball mask inside the crop)``.
    """
    cand = np.flatnonzero(where & aerated)
    best, best_frac = None, -1.0
    for _ in range(25):
        centre = np.unravel_index(cand[rng.integers(cand.size)], g.shape)
        box, ball = _ball(g.shape, centre, radius, (g.dz, g.sp, g.sp))
        frac = float((ball & aerated[box]).sum()) / max(int(ball.sum()), 1)
        if frac > best_frac:
            best, best_frac = (centre, box, ball), frac
        if frac > 0.97:
            break
    return best


def _draw_mediastinum(g: _Grid, f: CtFindings, c: _Chest, hu: np.ndarray, lab: np.ndarray) -> int:
    """Heart, aorta (ascending, arch, descending; wall calcifications), trachea, bronchi, oesophagus
    (with a hiatal hernia: a bulge of the distal oesophagus / stomach above the diaphragm).

    Returns:
        The number of calcified plaques drawn on the aortic wall.
    """
    X, Y, Z, rng = g.X, g.Y, g.Z, g.rng
    hu[c.heart], lab[c.heart] = 40.0, 51
    asc, knee, desc = (0.02 + g.jit(0.01), -0.13 + g.jit(0.01)), (0.19, -0.02), (0.17 + g.jit(0.01), 0.27)
    ra, z_arch = 0.07, 0.78 + g.jit(0.01)
    far = np.float32(9.0)
    d_asc = np.where((Z >= c.heart_z) & (Z <= z_arch), np.hypot(X - asc[0], Y - asc[1]), far)
    d_desc = np.where(Z <= z_arch, np.hypot(X - desc[0], Y - desc[1]), far)
    arch = np.minimum(_seg_dist(X, Y, asc, knee), _seg_dist(X, Y, knee, desc))
    d_arch = np.where(np.abs(Z - z_arch) < ra * g.mm_xy / g.mm_z, arch, far)
    aorta_d = np.minimum(np.minimum(d_asc, d_desc), d_arch)
    aorta = aorta_d < ra
    hu[aorta], lab[aorta] = 45.0, 52
    plaques = 0
    if f.calcification:  # calcified plaques: patches of the aortic wall within 10-15 mm of a wall voxel
        wall = aorta & (aorta_d > 0.55 * ra)
        plaques = int(rng.integers(8, 15))
        for i in rng.choice(np.flatnonzero(wall), size=plaques, replace=False):
            box, ball = _ball(g.shape, np.unravel_index(i, g.shape), rng.uniform(10, 15), (g.dz, g.sp, g.sp))
            hu[box] = np.where(ball & wall[box], rng.uniform(700, 1000), hu[box])
    trachea = (np.hypot(X, Y + 0.02) < 0.07) & (Z > 0.68)
    hu[trachea], lab[trachea] = 30.0, 16
    hu[(np.hypot(X, Y + 0.02) < 0.055) & (Z > 0.68)] = -1000.0
    for sgn in (-1.0, 1.0):  # main bronchi below the carina
        bx = sgn * 0.18 * np.clip((0.68 - Z) / 0.10, 0, 1)
        hu[(np.hypot(X - bx, Y) < 0.04) & (Z > 0.58) & (Z <= 0.68)] = -1000.0
    eso = (np.hypot(X - 0.05, Y - 0.19) < 0.04) & (Z > 0.12)
    hu[eso], lab[eso] = 35.0, 15
    if f.hernia:
        _draw_hernia(g, c, aorta, hu, lab)
    return plaques


def _draw_hernia(g: _Grid, c: _Chest, aorta: np.ndarray, hu: np.ndarray, lab: np.ndarray) -> None:
    """A sliding hiatal hernia: an ellipsoid sac around the distal oesophagus just above the diaphragm
    (Z 0.12-0.32), a soft-tissue wall around fluid with an air pocket on top (anterior: the patient
    lies supine), all labelled oesophagus (15). It pushes aside no heart, aorta, lung or vertebra
    voxel, and draws nothing from the generator.
    """
    X, Y, Z = g.X, g.Y, g.Z
    r, rz, centre = 0.12, 0.10, (0.05, 0.19, 0.22)  # normalised in-plane radius, Z half-height, (x, y, z)
    e = ((X - centre[0]) / r) ** 2 + ((Y - centre[1]) / r) ** 2 + ((Z - centre[2]) / rz) ** 2
    sac = (e < 1.0) & ~c.heart & ~aorta & ~c.lung & (np.hypot(X, Y - 0.40) >= 0.12)  # the vertebral body stays
    lumen = sac & (e < 0.6)
    air = lumen & (Y < centre[1] - 0.05 * r)
    hu[sac], lab[sac] = 35.0, 15  # wall
    hu[lumen & ~air] = 20.0  # fluid / food
    hu[air] = -1000.0


def _draw_bones(g: _Grid, c: _Chest, hu: np.ndarray) -> None:
    """Vertebrae (cortex, marrow, discs, canal, spinous process), ribs and sternum."""
    X, Y, Z = g.X, g.Y, g.Z
    rv = np.hypot(X, Y - 0.40)
    disc = ((Z * g.mm_z + g.rng.uniform(0, 26)) % 26.0) < 5.0
    hu[:] = np.where(rv < 0.11, np.where(disc, 80.0, np.where(rv > 0.085, 700.0, 220.0)), hu)
    hu[:] = np.where(np.hypot(X, Y - 0.545) < 0.04, 20.0, hu)
    hu[:] = np.where((np.abs(X) < 0.03) & (Y > 0.59) & (Y < 0.66) & ~disc, 500.0, hu)
    ribs = (c.body > 0.76) & (c.body < 0.86) & (np.cos(2 * np.pi * (Z * g.mm_z / 30.0 + 0.35 * Y)) > 0.55) & (Z > 0.12)
    hu[ribs & ((Y > -0.42) | (np.abs(X) > 0.3))] = 650.0
    hu[((X / 0.07) ** 2 + ((Y + 0.42) / 0.035) ** 2 < 1.0) & (Z > 0.3)] = 400.0


def render_scene(f: CtFindings, nz: int, spacing: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A noiseless chest in HU with its anatomy label map.

    Args:
        f: findings to draw.
        nz: number of slices (in-plane size is ``IN_PLANE``).
        spacing: ``(xy, z)`` voxel size in mm.
        rng: the scan's generator.

    Returns:
        ``(hu float32 [nz, 80, 80], labels uint8 [nz, 80, 80] (ANATOMY_LABELS ids), truth)``; lung
        labels cover the whole pleural space of each lobe, effusion included.
    """
    g = _Grid(nz, spacing, rng)
    hu = np.full(g.shape, -1000.0, np.float32)
    lab = np.zeros(g.shape, np.uint8)
    chest = _draw_chest(g, f, hu, lab)
    truth = _draw_lungs(g, f, chest, hu, lab)
    truth["calcified_plaques"] = _draw_mediastinum(g, f, chest, hu, lab)
    _draw_bones(g, chest, hu)
    truth["heart_volume_ml"] = round(float(chest.heart.sum()) * g.sp * g.sp * g.dz / 1000.0, 1)
    return gaussian_blur(hu, (0.4, 0.6, 0.6)), lab, truth


def reconstruct(scene: np.ndarray, kernel: str, rng: np.random.Generator) -> np.ndarray:
    """One reconstruction of a scene: ``lung`` (sharp, noisy) or ``soft`` (smooth) kernel -> int16 HU."""
    if kernel == "lung":
        img = scene + 20.0 * rng.standard_normal(scene.shape, dtype=np.float32)
    else:
        img = gaussian_blur(scene, (0.3, 0.7, 0.7)) + 8.0 * rng.standard_normal(scene.shape, dtype=np.float32)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


# ---------------------------------------------------------------------------------------------- dataset

# (Manufacturer, ManufacturerModelName, (sharp kernel, soft kernel)); "Siemens Healthineers" rows store
# raw values with RescaleIntercept -8192 and a list-valued kernel string (§8.3).
_SCANNERS = [
    ("Siemens Healthineers", "SOMATOM go.Top", ("['Bl57d', '3']", "['Br40d', '3']")),
    ("SIEMENS", "SOMATOM Definition Edge", ("B70f", "B31f")),
    ("Philips", "Ingenuity CT", ("YA", "B")),
    ("GE MEDICAL SYSTEMS", "Revolution EVO", ("LUNG", "STANDARD")),
    ("TOSHIBA", "Aquilion ONE", ("FC51", "FC08")),
]
_SPLIT_CODE = {"train": 0, "valid": 1}


@dataclass
class _CtScan:
    split: str  # train | valid
    patient: int
    letter: str
    findings: CtFindings
    recons: list[int]
    nz: int
    spacing: tuple[float, float]  # (xy, z) mm
    scanner: int  # index into _SCANNERS
    meta: dict[str, str] = field(default_factory=dict)  # scan-level metadata cells
    report: dict[str, str] = field(default_factory=dict)  # REPORT_COLUMNS[1:] texts
    # Findings_EN / Impressions_EN -> {fVLM anatomy: sentences of that anatomy}
    anatomy_text: dict[str, dict[str, str]] = field(default_factory=dict)
    fixed: bool = False  # also write a v2 copy of the first reconstruction

    @property
    def name(self) -> str:
        return f"{self.split}_{self.patient}_{self.letter}"

    @property
    def stream(self) -> tuple[int, int, int]:
        return _SPLIT_CODE[self.split], self.patient, ord(self.letter) - ord("a")

    @property
    def intercept(self) -> int:
        return -8192 if self.scanner == 0 else -1024

    def kernel(self, recon: int) -> tuple[str, str]:
        """(``ConvolutionKernel`` cell, ``lung`` | ``soft``) of a reconstruction."""
        sharp = recon % 2 == 1
        return _SCANNERS[self.scanner][2][0 if sharp else 1], "lung" if sharp else "soft"


# Traps forced on the first patients: (split, patient) -> settings (§8.7 / §8.8).
_FORCED = {
    ("train", 1): {"scans": {"a": [1, 2]}, "clinical": "Not given.", "fixed": True},
    ("train", 2): {"scans": {"a": [1], "b": [1]}, "scanner": 0, "fixed": True},
    ("train", 3): {"scans": {"a": [1, 2, 10]}, "empty": "Impressions_EN"},
    ("train", 4): {"scans": {"a": [1]}, "empty": "Findings_EN"},
    ("valid", 1): {"scans": {"a": [1, 2]}, "fixed": True},
    ("valid", 2): {"scans": {"a": [1]}, "age": ""},
}


def _scan_meta(rng: np.random.Generator, scanner: int, nz: int, sp: float, dz: float) -> dict[str, str]:
    """Scan-level metadata cells, list-valued ones written as Python list strings (§8.3)."""
    x0 = -IN_PLANE * sp / 2 + sp / 2
    y0 = x0 + rng.uniform(-30, 30)
    z0 = -rng.uniform(150, 450)
    table = rng.uniform(130, 200)
    siemens = scanner in (0, 1)
    iop = "[1, 0, 0, 0, 1, 0]" if siemens or rng.random() < 0.5 else (
        "[1.000000, 0.000000, 0.000000, 0.000000, 1.000000, -0.000000]")
    mas = int(rng.integers(40, 250))
    return {
        "Manufacturer": _SCANNERS[scanner][0], "ManufacturerModelName": _SCANNERS[scanner][1],
        "PatientSex": pick(rng, ("M", "F")), "PatientAge": f"{int(rng.integers(25, 90)):03d}Y",
        "ReconstructionDiameter": fmt_float(IN_PLANE * sp), "DistanceSourceToDetector": "1085.6" if siemens else "",
        "DistanceSourceToPatient": "595.0" if siemens else "", "GantryDetectorTilt": "0.0",
        "TableHeight": f"{table:.1f}", "RotationDirection": "CW", "ExposureTime": str(int(rng.integers(300, 1000))),
        "XRayTubeCurrent": str(int(rng.integers(50, 400))), "Exposure": str(mas),
        "FilterType": "FLAT" if siemens else pick(rng, ("BODY FILTER", "")), "GeneratorPower": "",
        "FocalSpots": "1.2" if rng.random() < 0.3 else "", "PatientPosition": "FFS" if rng.random() < 0.05 else "HFS",
        "RevolutionTime": "0.5", "SingleCollimationWidth": "0.6", "TotalCollimationWidth": "38.4",
        "TableSpeed": "46.0", "TableFeedPerRotation": "23.0", "SpiralPitchFactor": "1.2",
        "DataCollectionCenterPatient": f"[0.0, {fmt_float(-table)}, {fmt_float(z0 + nz * dz / 2)}]",
        "ReconstructionTargetCenterPatient": f"[0.0, {fmt_float(y0 - x0)}, {fmt_float(z0 + nz * dz / 2)}]",
        "ExposureModulationType": "XYZ_EC" if siemens else "", "CTDIvol": f"{mas * 0.07:.2f}",
        "ImagePositionPatient": f"[{fmt_float(x0)}, {fmt_float(y0)}, {fmt_float(z0)}]",
        "ImageOrientationPatient": iop, "SliceLocation": fmt_float(z0), "SamplesPerPixel": "1",
        "PhotometricInterpretation": "MONOCHROME2", "Rows": str(IN_PLANE), "Columns": str(IN_PLANE),
        "XYSpacing": f"[{sp}, {sp}]", "RescaleIntercept": str(-8192 if scanner == 0 else -1024), "RescaleSlope": "1",
        "RescaleType": "HU" if rng.random() < 0.8 else "", "NumberofSlices": str(nz), "ZSpacing": repr(dz),
        "StudyDate": str(20180101 + 10000 * int(rng.integers(0, 4)) + 100 * int(rng.integers(0, 12)) + int(rng.integers(0, 28))),
    }  # fmt: skip


def plan_scans(n_patients: int, seed: int) -> list[_CtScan]:
    """Patients (~22 % valid), scans, reconstructions, geometry, findings, metadata, reports and traps."""
    rng = rng_for(seed, _PLAN_STREAM)
    n_valid = max(2, round(n_patients * 2 / 9))
    scans = []
    for split, count in (("train", n_patients - n_valid), ("valid", n_valid)):
        for patient in range(1, count + 1):
            forced = _FORCED.get((split, patient), {})
            layout = forced.get("scans")
            if layout is None:
                letters = ["a", "b"] if rng.random() < 0.07 else ["a"]
                layout = {x: list(range(1, int(rng.choice([1, 2, 3], p=[0.7, 0.27, 0.03])) + 1)) for x in letters}
            for letter, recons in layout.items():
                scanner = forced.get("scanner", 0 if rng.random() < 0.28 else int(rng.integers(1, len(_SCANNERS))))
                nz, sp = int(rng.integers(36, 45)), float(pick(rng, (340, 350, 360, 370, 380))) / IN_PLANE
                dz = float(pick(rng, (5.0, 6.0, 6.25, 7.0, 7.5)))
                scan = _CtScan(split, patient, letter, CtFindings(), recons, nz, (sp, dz), scanner,
                               fixed=forced.get("fixed", False) and letter == "a")  # fmt: skip
                scan.findings = sample_findings(rng_for(seed, _SCAN_STREAM, *scan.stream))
                scan.findings.hernia = bool(rng_for(seed, _HERNIA_STREAM, *scan.stream).random() < HERNIA_P)
                scan.meta = _scan_meta(rng, scanner, nz, sp, dz)
                if "age" in forced:
                    scan.meta["PatientAge"] = forced["age"]
                scan.report, desc, conc = anatomy_report(scan.findings, rng_for(seed, _TEXT_STREAM, *scan.stream), dz)
                scan.anatomy_text = {"Findings_EN": desc, "Impressions_EN": conc}
                if "clinical" in forced:
                    scan.report["ClinicalInformation_EN"] = forced["clinical"]
                if "empty" in forced:
                    scan.report[forced["empty"]] = ""
                    scan.anatomy_text[forced["empty"]] = {}  # nothing to decompose
                scans.append(scan)
    return scans


def _write_nifti(array: np.ndarray, path: Path, scan: _CtScan | None = None) -> None:
    """Write a (z, y, x) array as gzipped NIfTI.

    Without ``scan`` the header keeps the writer defaults (spacing 1, origin 0, identity direction,
    ``scl_slope`` 1 / ``scl_inter`` 0) like a CT-RATE v1 file; with ``scan`` the geometry comes from
    its metadata (spacing, ``ImagePositionPatient``, ``ImageOrientationPatient``) like a v2 file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array)
    if scan is not None:
        row, col = np.array([float(x) for x in scan.meta["ImageOrientationPatient"].strip("[]").split(",")]).reshape(2, 3)
        sp, dz = scan.spacing
        img.SetSpacing((sp, sp, dz))
        img.SetOrigin([float(x) for x in scan.meta["ImagePositionPatient"].strip("[]").split(",")])
        img.SetDirection(np.stack([row, col, np.cross(row, col)], axis=1).ravel().tolist())
    sitk.WriteImage(img, str(path), True)


def write_dataset(root: Path, n_patients: int, seed: int) -> dict[str, int]:
    """Write the whole CT-RATE demo with ``root`` as the ``dataset/`` folder.

    Besides CT-RATE's own files it writes fVLM's per-anatomy reports (a separate download in the real
    dataset): ``desc_info.json`` (findings) and ``conc_info.json`` (impression), each
    ``{scan (train_1_a): {anatomy: sentences}}`` with the ``FVLM_ANATOMIES`` the text mentions; a scan
    whose text mentions none of them (a normal impression, an empty cell) has no entry.

    Args:
        root: dataset root (created).
        n_patients: number of patients (train + valid).
        seed: dataset seed.

    Returns:
        Counts: ``patients``, ``scans``, ``volumes``, ``valid_volumes``, ``fixed_volumes``.
    """
    scans = plan_scans(n_patients, seed)
    per_split = {split: {k: [] for k in ("report", "label", "meta", "truth")} for split in ("train", "valid")}
    n_fixed = 0
    for scan in scans:
        scene, labels, truth = render_scene(scan.findings, scan.nz, scan.spacing, rng_for(seed, _SCAN_STREAM, *scan.stream, 1))
        sim = scan.findings.labels()
        folder = f"{scan.split}_{scan.patient}/{scan.name}"
        for recon in scan.recons:
            name = f"{scan.name}_{recon}.nii.gz"
            kernel_cell, kernel = scan.kernel(recon)
            hu = reconstruct(scene, kernel, rng_for(seed, _RECON_STREAM, *scan.stream, recon))
            stored = hu.astype(np.int32) - scan.intercept
            _write_nifti(stored.astype(np.uint16 if scan.intercept == -8192 else np.int16), root / scan.split / folder / name)
            _write_nifti(labels, root / "anatomy_masks" / scan.split / name)
            if scan.fixed and recon == scan.recons[0]:
                _write_nifti(hu, root / f"{scan.split}_fixed" / folder / name, scan)
                n_fixed += 1
            out = per_split[scan.split]
            out["report"].append([name, *(scan.report[c] for c in REPORT_COLUMNS[1:])])
            out["label"].append([name, *(sim.get(c, 0) for c in CT_RATE_LABELS)])
            series = f"{'Lung' if kernel == 'lung' else 'Mediastinum'} {fmt_float(scan.spacing[1])} mm"
            cells = {**scan.meta, "VolumeName": name, "SeriesDescription": series, "ConvolutionKernel": kernel_cell}
            out["meta"].append([cells[c] for c in METADATA_COLUMNS])
            out["truth"].append([name, scan.split, *(sim[c] for c in CT_FINDINGS), *(truth.get(c) for c in _GEOMETRY_COLUMNS)])
    for split, word in (("train", "train"), ("valid", "validation")):
        out = per_split[split]
        write_csv(root / "radiology_text_reports" / f"{word}_reports.csv", REPORT_COLUMNS, out["report"])
        write_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName", *CT_RATE_LABELS], out["label"])
        write_csv(root / "metadata" / f"{word}_metadata.csv", METADATA_COLUMNS, out["meta"])
    write_json(root / "anatomy_masks" / "labels.json", {str(k): v for k, v in ANATOMY_LABELS.items()})
    for file, column in (("desc_info.json", "Findings_EN"), ("conc_info.json", "Impressions_EN")):
        write_json(root / file, {scan.name: scan.anatomy_text[column] for scan in scans if scan.anatomy_text[column]})
    truth_rows = per_split["train"]["truth"] + per_split["valid"]["truth"]
    write_csv(root / "demo_truth" / "ct_findings.csv", TRUTH_COLUMNS, truth_rows)
    counts = {
        "patients": n_patients,
        "scans": len(scans),
        "volumes": len(truth_rows),
        "valid_volumes": len(per_split["valid"]["truth"]),
        "fixed_volumes": n_fixed,
    }
    write_json(root / "demo_truth" / "info.json", {"kind": "ct", "seed": seed, "counts": counts})
    return counts
