"""Synthetic chest radiographs with reports, written in the MIMIC-CXR-JPG layout (``specs/datasets.md`` §1).

Three layers, kept apart:

* **findings** - :class:`CxrFindings`, the ground truth of one study (what is wrong and where);
* **reports** - :func:`report_text` turns findings into a MIMIC-style free-text report and the
  CheXpert-style labels that a report labeller would read from it (§1.6, §1.8);
* **pixels** - :func:`draw_frontal` / :func:`draw_lateral` paint a radiograph (display convention:
  dense = bright, the patient's left on the image right) in which every finding is visible;
* **dataset** - :func:`write_dataset` lays out patients, studies, images, splits, the traps of
  §1.11/§1.12 and every official CSV, plus ground truth under ``demo_truth/``.
"""

from __future__ import annotations

import datetime
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.datamodules.demo._util import (
    cap,
    gaussian_blur,
    pick,
    rng_for,
    smooth_noise,
    soft,
    write_csv,
    write_json,
)

CXR_FINDINGS = ["Cardiomegaly", "Pleural Effusion", "Consolidation", "Pneumothorax", "Lung Lesion"]
CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]  # fmt: skip
METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip
TRUTH_COLUMNS = [
    "dicom_id", "study_id", "subject_id", "split", "view", "width", "height", "cardiomegaly", "ctr",
    "effusion_left", "effusion_right", "consolidation", "consolidation_zone", "consolidation_x0",
    "consolidation_y0", "consolidation_x1", "consolidation_y1", "pneumothorax_left", "pneumothorax_right",
    "nodule", "nodule_x", "nodule_y", "nodule_r",
]  # fmt: skip
ZONES = ("upper_right", "lower_right", "upper_left", "lower_left")  # <level>_<patient side>
_STUDY_STREAM, _IMAGE_STREAM, _TEXT_STREAM = 1, 2, 3

# ---------------------------------------------------------------------------------------------- findings


@dataclass
class CxrFindings:
    """Ground truth of one chest X-ray study.

    Sides are the patient's sides; zones are ``"<upper|lower>_<left|right>"``.
    """

    cardiomegaly: bool = False
    effusion: str = ""  # "", "left", "right", "bilateral"
    effusion_size: str = ""  # small | moderate | large
    consolidation: str = ""  # "" or a zone
    pneumothorax: str = ""  # "", "left", "right"
    pneumothorax_size: str = ""  # small | moderate
    nodule: str = ""  # "" or a zone
    nodule_mm: int = 0
    hedged: tuple[str, ...] = ()  # CXR_FINDINGS names that the report states with uncertainty

    def present(self) -> list[str]:
        """Names (``CXR_FINDINGS`` order) of the findings in this study."""
        flags = [self.cardiomegaly, self.effusion, self.consolidation, self.pneumothorax, self.nodule]
        return [name for name, flag in zip(CXR_FINDINGS, flags) if flag]


def sample_findings(rng: np.random.Generator, normal: bool | None = None) -> CxrFindings:
    """Draw the findings of one study: ~30 % normal, otherwise each finding with p = 1/3 (>= 1).

    Args:
        rng: the study's generator.
        normal: force a normal (True) or an abnormal (False) study; None draws.

    Returns:
        The sampled :class:`CxrFindings`; about 3 % of present findings are marked as hedged.
    """
    is_normal = rng.random() < 0.3
    if normal or (normal is None and is_normal):
        return CxrFindings()
    flags = rng.random(5) < 1 / 3
    while not flags.any():
        flags = rng.random(5) < 1 / 3
    f = CxrFindings(cardiomegaly=bool(flags[0]))
    if flags[1]:
        f.effusion = pick(rng, ("left", "right", "left", "right", "bilateral"))
        f.effusion_size = pick(rng, ("small", "moderate", "large"))
    if flags[2]:
        f.consolidation = pick(rng, ZONES)
    if flags[3]:
        f.pneumothorax = pick(rng, ("left", "right"))
        f.pneumothorax_size = pick(rng, ("small", "moderate"))
    if flags[4]:
        f.nodule = pick(rng, ZONES)
        f.nodule_mm = int(rng.integers(8, 16))
    # a large effusion would hide a lower-zone opacity on the same side
    lower_sides = {z.split("_")[1] for z in (f.consolidation, f.nodule) if z.startswith("lower")}
    if f.effusion_size == "large" and (f.effusion in lower_sides or (f.effusion == "bilateral" and lower_sides)):
        f.effusion_size = "moderate"
    f.hedged = tuple(name for name in f.present() if rng.random() < 0.03)
    return f


# ---------------------------------------------------------------------------------------------- reports
# Each template is (text, extra labels the sentence implies). Texts are ours; {fields} come from _fields.

_BANK: dict[str, dict[str, list[tuple[str, dict[str, float]]]]] = {
    "Cardiomegaly": {
        "pos": [("The heart is enlarged.", {}), ("Moderate cardiomegaly.", {}), ("The cardiac silhouette is enlarged.", {}),
                ("Enlarged cardiac silhouette consistent with cardiomegaly.", {}), ("Cardiomegaly is present.", {}),
                ("Heart size is enlarged.", {})],
        "impr": [("Cardiomegaly.", {}), ("Enlarged cardiac silhouette.", {}), ("The heart is enlarged.", {})],
        "neg": [("Heart size is normal.", {}), ("No cardiomegaly.", {}), ("The cardiac silhouette is normal in size.", {}),
                ("Normal heart size.", {})],
        "hedge": [("Heart size is borderline, possible mild cardiomegaly.", {}), ("Cannot exclude mild cardiomegaly.", {})],
    },
    "Pleural Effusion": {
        "pos": [("{esize} {eside} pleural {effusion}.", {}), ("There {be_a} {esize} {eside} pleural {effusion}.", {}),
                ("{esize} {eside} pleural {effusion} with blunting of the costophrenic {angle}.", {}),
                ("Layering {eside} pleural {effusion}, {esize} in size.", {})],
        "impr": [("{esize} {eside} pleural {effusion}.", {}), ("{eside} pleural {effusion}.", {})],
        "neg": [("No pleural effusion.", {}), ("There is no pleural effusion.", {}), ("No pleural effusions.", {})],
        "hedge": [("Possible small {eside} pleural {effusion}.", {}), ("Questionable {eside} pleural {effusion}.", {})],
    },
    "Consolidation": {
        "pos": [("Focal consolidation in the {clobe}.", {}), ("{clobe} consolidation.", {}),
                ("Patchy opacity in the {czone} concerning for consolidation.", {"Lung Opacity": 1.0}),
                ("There is an area of consolidation in the {clobe}.", {}), ("Airspace consolidation in the {czone}.", {})],
        "impr": [("{clobe} consolidation.", {}), ("Consolidation in the {clobe}.", {}),
                 ("Focal consolidation in the {clobe}, concerning for pneumonia.", {"Pneumonia": -1.0})],
        "neg": [("No focal consolidation.", {}), ("There is no consolidation.", {}), ("No airspace consolidation.", {})],
        "hedge": [("Possible early consolidation in the {clobe}.", {}), ("Cannot exclude consolidation in the {czone}.", {})],
    },
    "Pneumothorax": {
        "pos": [("{psize} {pside} apical pneumothorax.", {}),
                ("There is a {psize} {pside} pneumothorax with a visible pleural line.", {}),
                ("{pside} pneumothorax, {psize} in size.", {}), ("A {psize} {pside} pneumothorax is present.", {})],
        "impr": [("{psize} {pside} pneumothorax.", {}), ("{pside} pneumothorax.", {})],
        "neg": [("No pneumothorax.", {}), ("There is no pneumothorax.", {}), ("No evidence of pneumothorax.", {})],
        "hedge": [("Cannot exclude a small {pside} apical pneumothorax.", {}), ("Possible tiny {pside} pneumothorax.", {})],
    },
    "Lung Lesion": {
        "pos": [("A {mm} mm nodule in the {nzone}.", {}), ("Pulmonary nodule in the {nlobe}.", {}),
                ("Nodular opacity in the {nzone}, measuring {mm} mm.", {"Lung Opacity": 1.0}),
                ("There is a {mm} mm pulmonary nodule in the {nlobe}.", {})],
        "impr": [("{mm} mm nodule in the {nlobe}; chest CT is recommended.", {}), ("Pulmonary nodule in the {nlobe}.", {}),
                 ("{nlobe} pulmonary nodule.", {})],
        "neg": [("No pulmonary nodules.", {}), ("No suspicious pulmonary nodule.", {}), ("No focal nodule or mass.", {})],
        "hedge": [("Possible nodule in the {nzone}.", {}),
                  ("Questionable nodular opacity in the {nzone}.", {"Lung Opacity": -1.0})],
    },
}  # fmt: skip
_JOINT_NEG = [("No pleural effusion or pneumothorax.", {}), ("No pneumothorax or pleural effusion.", {})]
_EXTRA_NEG = {  # negations of CheXpert labels the world does not draw
    "Edema": ["No pulmonary edema.", "There is no pulmonary vascular congestion or edema."],
    "Atelectasis": ["No atelectasis.", "No basilar atelectasis."],
    "Fracture": ["No acute rib fracture.", "No displaced fracture is seen."],
    "Enlarged Cardiomediastinum": ["The mediastinal contours are normal.", "The cardiomediastinal silhouette is normal."],
    "Pleural Other": ["No pleural thickening.", "No apical pleural thickening."],
    "Pneumonia": ["No evidence of pneumonia."],
    "Lung Opacity": ["No focal opacity."],
    "Support Devices": ["No lines or tubes.", "No support devices are seen."],
}
_CLEAR_LUNGS = ["The lungs are clear.", "The lungs are well aerated and clear.", "Both lungs are clear."]
_NORMAL_IMPRESSION = [
    "No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
    "No acute intrathoracic process.",
]  # fmt: skip
_COMPLAINTS = ["cough", "fever", "shortness of breath", "chest pain", "hypoxia", "weakness", "a fall"]
_QUESTIONS = ["eval for acute process", "evaluate for pneumonia", "assess for interval change", "r/o infiltrate"]
STYLES = ("standard", "findings_only", "impressions", "conclusion", "combined")  # report layouts, drawn
STYLE_P = (0.80, 0.10, 0.03, 0.03, 0.04)
TRAP_STYLES = ("typo", "numbered", "no_headers", "too_short")  # forced on a few studies


def _zone_words(zone: str) -> tuple[str, str]:
    """(lobe phrase, zone phrase) of a zone, e.g. ``("left lower lobe", "left lower lung zone")``."""
    level, side = zone.split("_")
    return f"{side} {level} lobe", f"{side} {level} lung zone"


def _fields(f: CxrFindings) -> dict[str, str]:
    plural = f.effusion == "bilateral"
    clobe, czone = _zone_words(f.consolidation) if f.consolidation else ("", "")
    nlobe, nzone = _zone_words(f.nodule) if f.nodule else ("", "")
    return {
        "eside": f.effusion, "esize": f.effusion_size, "effusion": "effusions" if plural else "effusion",
        "be_a": "are" if plural else "is a", "angle": "angles" if plural else "angle",
        "pside": f.pneumothorax, "psize": f.pneumothorax_size, "clobe": clobe, "czone": czone,
        "nlobe": nlobe, "nzone": nzone, "mm": str(f.nodule_mm),
    }  # fmt: skip


def _say(rng: np.random.Generator, options: list[tuple[str, dict[str, float]]], fields: dict[str, str], labels: dict, name: str, value: float) -> str:
    text, extra = pick(rng, options)
    labels[name] = value
    for k, v in extra.items():
        labels.setdefault(k, v)
    return cap(text.format(**fields))


def compose_report(f: CxrFindings, rng: np.random.Generator) -> tuple[list[str], list[str], dict[str, float]]:
    """Sentences of the FINDINGS and IMPRESSION sections and the labels a labeller reads from them.

    Every present finding is stated with its side / zone (hedged ones with uncertainty); a random
    subset of absent findings is negated; a few CheXpert labels the world never draws are negated
    too, so that every prompt word occurs in the corpus.

    Args:
        f: the study's findings.
        rng: generator for the wording.

    Returns:
        ``(findings sentences, impression sentences, labels)`` where labels maps CheXpert names to
        1.0 (present), 0.0 (negated) or -1.0 (uncertain); absent names are "not mentioned".
    """
    fields, labels = _fields(f), {}
    present = f.present()
    cardiac, lung, pleural, other, impression = [], [], [], [], []
    groups = {"Cardiomegaly": cardiac, "Consolidation": lung, "Lung Lesion": lung, "Pleural Effusion": pleural,
              "Pneumothorax": pleural}  # fmt: skip
    for name in present:
        hedged = name in f.hedged
        bank = _BANK[name]
        if hedged:
            groups[name].append(_say(rng, bank["hedge"], fields, labels, name, -1.0))
            impression.append(_say(rng, bank["hedge"], fields, labels, name, -1.0))
        else:
            groups[name].append(_say(rng, bank["pos"], fields, labels, name, 1.0))
            impression.append(_say(rng, bank["impr"], fields, labels, name, 1.0))
    absent = [n for n in CXR_FINDINGS if n not in present]
    p_neg = 0.75 if not present else 0.55
    negated = [n for n in absent if rng.random() < p_neg]
    if "Pleural Effusion" in negated and "Pneumothorax" in negated and rng.random() < 0.5:
        pleural.append(_say(rng, _JOINT_NEG, fields, labels, "Pleural Effusion", 0.0))
        labels["Pneumothorax"] = 0.0
        negated = [n for n in negated if n not in ("Pleural Effusion", "Pneumothorax")]
    for name in negated:
        groups[name].append(_say(rng, _BANK[name]["neg"], fields, labels, name, 0.0))
    lungs_clear = not (f.consolidation or f.nodule or f.pneumothorax or f.effusion)
    if lungs_clear and rng.random() < 0.7:
        lung.insert(0, pick(rng, _CLEAR_LUNGS))
    for name, options in _EXTRA_NEG.items():
        blocked = (name in ("Pneumonia", "Lung Opacity") and (f.consolidation or f.nodule)) or name in labels
        if blocked or rng.random() > 0.12:
            continue
        text = options[0] if name == "Enlarged Cardiomediastinum" and f.cardiomegaly else pick(rng, options)
        labels[name] = 0.0
        other.append(text)
    for group in (cardiac, lung, pleural, other):
        rng.shuffle(group)
    if not (cardiac or lung or pleural or other):
        lung.append(pick(rng, _CLEAR_LUNGS))
    if not impression:
        impression.append(pick(rng, _NORMAL_IMPRESSION))
    elif len(impression) > 1:
        rng.shuffle(impression)
    return cardiac + lung + pleural + other, impression, labels


def no_finding(labels: dict[str, float]) -> dict[str, float]:
    """``labels`` plus ``No Finding = 1.0`` when nothing but Support Devices is positive or uncertain."""
    abnormal = any(v != 0.0 for k, v in labels.items() if k != "Support Devices")
    return labels if abnormal else {**labels, "No Finding": 1.0}


def _wrap(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=78, break_long_words=False)]


def _section(header: str, sentences: list[str]) -> list[str]:
    return [f" {header}: ", " ", *_wrap("  ".join(sentences)), " "]


def report_text(f: CxrFindings, rng: np.random.Generator, style: str = "standard", view: str = "PA",
                has_lateral: bool = False) -> tuple[str, dict[str, float]]:  # fmt: skip
    """A complete report file (``s<study_id>.txt`` content) and its labels (§1.8 format).

    Args:
        f: the study's findings.
        rng: generator for the wording.
        style: ``standard`` | ``findings_only`` | ``impressions`` / ``conclusion`` (header variants) |
            ``combined`` (``FINDINGS AND IMPRESSION:``) | ``typo`` (``IMPRESSON:``) | ``numbered``
            (impression as ``1. ... 2. ...``) | ``no_headers`` | ``too_short`` (impression "Stable.").
        view: ``PA`` or ``AP`` (names the examination); anything else is treated as PA.
        has_lateral: whether the study has a lateral view.

    Returns:
        ``(text, labels)``; labels as in :func:`compose_report` plus ``No Finding``; empty for
        ``too_short`` (a labeller finds nothing in "Stable.").
    """
    findings, impression, labels = compose_report(f, rng)
    exam = "CHEST (PORTABLE AP)" if view == "AP" else "CHEST (PA AND LAT)"
    technique = "Portable AP chest radiograph." if view == "AP" else (
        "Chest PA and lateral." if has_lateral else "Single frontal view of the chest.")
    sex = pick(rng, ("man", "woman"))
    indication = f"___ year old {sex} with {pick(rng, _COMPLAINTS)}  // {pick(rng, _QUESTIONS)}"
    lines = [" " * 33 + "FINAL REPORT"]
    if style == "no_headers":
        lines += [" CHEST RADIOGRAPH", " ", *_wrap("  ".join(findings)), " ", *_wrap("  ".join(impression))]
        return "\n".join(lines) + "\n", no_finding(labels)
    lines += [*_wrap(f"EXAMINATION:  {exam}"), " ", *_wrap(f"INDICATION:  {indication}"), " ",
              *_wrap(f"TECHNIQUE:  {technique}"), " ", f" COMPARISON:  {pick(rng, ('___', 'None.'))}", " "]  # fmt: skip
    if style == "too_short":
        lines += _section("IMPRESSION", [pick(rng, ("Stable.", "No change."))])
        return "\n".join(lines).rstrip() + "\n", {}
    if style == "combined":
        lines += _section("FINDINGS AND IMPRESSION", findings + impression)
    else:
        lines += _section("FINDINGS", findings)
        if style == "numbered":
            items = impression if len(impression) > 1 else impression + findings[:1]
            lines += [" IMPRESSION: ", " ", *_wrap("  ".join(f"{i}. {s}" for i, s in enumerate(items, 1))), " "]
        elif style != "findings_only":
            header = {"impressions": "IMPRESSIONS", "conclusion": "CONCLUSION", "typo": "IMPRESSON"}.get(style, "IMPRESSION")
            lines += _section(header, impression)
    return "\n".join(lines).rstrip() + "\n", no_finding(labels)


# ---------------------------------------------------------------------------------------------- pixels


class _Canvas:
    """Pixel grid of one radiograph with a small random pose (shift, scale, rotation).

    ``u, v`` are normalised anatomical coordinates (0..1 across the width / height of the patient),
    ``x, y`` the pixel centres.
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = h, w, rng
        self.y, self.x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        ang, self.scale = float(rng.normal(0, 0.03)), float(rng.uniform(0.95, 1.04))
        self.shift = (w * (0.5 + float(rng.normal(0, 0.015))), h * (0.5 + float(rng.normal(0, 0.015))))
        self.cos, self.sin = float(np.cos(ang)), float(np.sin(ang))
        px, py = self.x - self.shift[0], self.y - self.shift[1]
        self.u = ((self.cos * px + self.sin * py) / self.scale + 0.5 * w) / w
        self.v = ((-self.sin * px + self.cos * py) / self.scale + 0.5 * h) / h

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        """Pixel position (x, y) of the anatomical point (u, v)."""
        a, b = (u - 0.5) * self.w * self.scale, (v - 0.5) * self.h * self.scale
        return self.cos * a - self.sin * b + self.shift[0], self.sin * a + self.cos * b + self.shift[1]

    def ellipse(self, cu: float, cv: float, au: float, av: float, p: float = 2.0) -> np.ndarray:
        """Normalised (super-)elliptic radius: < 1 inside the shape, 1 on its border."""
        return (np.abs((self.u - cu) / au) ** p + np.abs((self.v - cv) / av) ** p) ** (1.0 / p)

    def finish(self, img: np.ndarray, noise: float) -> np.ndarray:
        """Contrast / brightness / gamma jitter, slight blur and quantum noise -> uint8."""
        rng = self.rng
        img = (img - 100.0) * rng.uniform(0.88, 1.12) + 100.0 + rng.uniform(-8, 8)
        img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.9, 1.1)
        img = gaussian_blur(img, 0.55) + rng.normal(0, noise, img.shape)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass
class _Lung:
    cu: float
    cv: float
    au: float
    av: float
    sgn: float  # +1: patient's left (image right), -1: patient's right
    r: np.ndarray  # normalised radius map


def _blend(img: np.ndarray, value: float | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return img * (1.0 - alpha) + value * alpha


def _segment(cv_: _Canvas, out: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], width: float, amp: float) -> None:
    """Draw (max-composite) a tapering bright line (vessel) from ``p0`` to ``p1`` (pixel x, y) into ``out``."""
    pad = 3.0 * width
    x0, x1 = int(max(min(p0[0], p1[0]) - pad, 0)), int(min(max(p0[0], p1[0]) + pad + 1, cv_.w))
    y0, y1 = int(max(min(p0[1], p1[1]) - pad, 0)), int(min(max(p0[1], p1[1]) + pad + 1, cv_.h))
    if x1 <= x0 or y1 <= y0:
        return
    x, y = cv_.x[y0:y1, x0:x1], cv_.y[y0:y1, x0:x1]
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d = np.hypot(x - (p0[0] + t * dx), y - (p0[1] + t * dy))
    prof = amp * (1.0 - 0.6 * t) * np.exp(-((d / (width * (1.0 - 0.55 * t))) ** 2))
    np.maximum(out[y0:y1, x0:x1], prof, out=out[y0:y1, x0:x1])


def _vessels(cv_: _Canvas, lung: _Lung) -> np.ndarray:
    """Lung markings: 8 branching vessels radiating from the hilum of one lung."""
    rng = cv_.rng
    hilum = cv_.to_pixel(0.5 + lung.sgn * 0.085, 0.47)
    out = np.zeros_like(cv_.x)
    for _ in range(8):
        theta, length = rng.uniform(-1.25, 1.3), rng.uniform(0.6, 1.0) * lung.au * 2 * cv_.w
        width, amp = rng.uniform(1.1, 1.9), rng.uniform(22, 32)
        d = (lung.sgn * np.cos(theta), np.sin(theta))
        _segment(cv_, out, hilum, (hilum[0] + length * d[0], hilum[1] + length * d[1]), width, amp)
        mid = (hilum[0] + 0.45 * length * d[0], hilum[1] + 0.45 * length * d[1])
        b = theta + pick(rng, (-0.5, 0.5))
        tip = (mid[0] + 0.5 * length * lung.sgn * np.cos(b), mid[1] + 0.5 * length * np.sin(b))
        _segment(cv_, out, mid, tip, width * 0.7, amp * 0.7)
    return out


def _place(rng: np.random.Generator, candidates: np.ndarray, fallback: np.ndarray) -> int:
    """A random flat index among ``candidates`` (or ``fallback`` when fewer than 10 pixels)."""
    idx = np.flatnonzero(candidates)
    if idx.size < 10:
        idx = np.flatnonzero(fallback)
    return int(idx[rng.integers(idx.size)])


def draw_frontal(f: CxrFindings, h: int, w: int, view: str, rng: np.random.Generator) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
    """Paint a frontal (PA / AP) chest radiograph showing the findings ``f``.

    Args:
        f: findings to draw.
        h, w: image height and width in pixels.
        view: ``PA`` or ``AP`` (AP: lower lung volumes, scapulae over the lungs, more noise).
        rng: the image's generator.

    Returns:
        ``(image uint8 [h, w], truth, masks)``: truth holds the TRUTH_COLUMNS geometry (pixel units,
        consolidation box ``x0, y0, x1, y1`` with exclusive ends); masks maps ``"pneumothorax"`` /
        ``"consolidation"`` to uint8 0/255 arrays for the findings that are present.
    """
    cv_ = _Canvas(h, w, rng)
    u, v, ap = cv_.u, cv_.v, view == "AP"
    body = soft(1.0 - cv_.ellipse(0.5, 0.58, 0.47, 0.50, 4.0), 0.03)
    neck = soft(0.085 - np.abs(u - 0.5), 0.01) * soft(0.2 - v, 0.02)
    img = _blend(np.full((h, w), 10.0, np.float32), 118.0, np.maximum(body, neck))
    lungs = {}
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        cu, cvv = 0.5 + sgn * rng.uniform(0.19, 0.21), 0.46 + rng.normal(0, 0.008) + (0.01 if sgn > 0 else 0.0)
        au, av = rng.uniform(0.145, 0.165), 0.30 * (0.93 if ap else 1.0) * rng.uniform(0.96, 1.04)
        lungs[side] = _Lung(cu, cvv, au, av, sgn, cv_.ellipse(cu, cvv, au, av, 2.4))
    lung_soft = {s: soft(1.0 - lg.r, 0.04) for s, lg in lungs.items()}
    thorax_w = (lungs["left"].cu + lungs["left"].au) - (lungs["right"].cu - lungs["right"].au)
    ctr = rng.uniform(0.58, 0.68) if f.cardiomegaly else rng.uniform(0.38, 0.47)
    heart_r = cv_.ellipse(0.5 + 0.16 * ctr * thorax_w, 0.665, ctr * thorax_w / 2, 0.115 + 0.02 * f.cardiomegaly)

    # lung content: base density, fine texture, vessels; a pneumothorax replaces it by air
    field_ = 60.0 + 9.0 * smooth_noise(rng, (h, w), 0.8)
    for side, lung in lungs.items():
        field_ += _vessels(cv_, lung) * lung_soft[side]
    masks, ptx = {}, np.zeros((h, w), bool)
    if f.pneumothorax:
        lung = lungs[f.pneumothorax]
        k = rng.uniform(0.55, 0.65) if f.pneumothorax_size == "moderate" else rng.uniform(0.68, 0.78)
        ccu, ccv = lung.cu - lung.sgn * lung.au * (1 - k) * 0.9, lung.cv + lung.av * (1 - k) * 0.7
        rc = cv_.ellipse(ccu, ccv, lung.au * k, lung.av * k, 2.4)
        air = lung_soft[f.pneumothorax] * soft(rc - 1.0, 0.03)
        line = np.exp(-(((rc - 1.0) * lung.au * k * w / 0.8) ** 2)) * lung_soft[f.pneumothorax]
        field_ = _blend(field_, 22.0, air) + 42.0 * line
        ptx = air > 0.5
        masks["pneumothorax"] = ptx
    img = _blend(img, field_, np.maximum(lung_soft["right"], lung_soft["left"]))

    # ribs and clavicles over the thorax
    thorax = soft(1.12 - np.minimum(lungs["right"].r, lungs["left"].r), 0.05) * soft(v - 0.08, 0.02) * soft(0.8 - v, 0.02)
    phase = (v + 0.55 * (np.abs(u - 0.5) - 0.2) ** 2) / 0.072 + rng.uniform(0, 1)
    img += 16.0 * (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6 * thorax
    du = np.abs(u - 0.5)
    img += 38.0 * np.exp(-(((v - (0.155 - 0.09 * (du - 0.05))) / 0.012) ** 2)) * soft(du - 0.04, 0.01) * soft(0.32 - du, 0.02)

    # pleural effusion: dependent fluid with a meniscus rising towards the lateral wall
    fluid = np.zeros((h, w), bool)
    for side in (("left", "right") if f.effusion == "bilateral" else (f.effusion,) if f.effusion else ()):
        lung = lungs[side]
        frac = {"small": (0.22, 0.30), "moderate": (0.32, 0.42), "large": (0.45, 0.55)}[f.effusion_size]
        height = rng.uniform(*frac) * 2 * lung.av
        top = lung.cv + lung.av - height
        meniscus = top - 0.06 * np.clip((u - lung.cu) * lung.sgn / lung.au + 0.2, 0, 1.2) ** 2
        wet = soft(v - meniscus, 0.012) * soft(1.06 - lung.r, 0.04)
        depth = np.clip((v - meniscus) / height, 0, 1)
        img = _blend(img, 132.0 + 3.0 * rng.standard_normal((h, w)), wet * (0.78 + 0.2 * depth))
        fluid |= wet > 0.5

    # where an opacity can be seen: aerated lung away from heart, mediastinum, air and fluid
    visible = {s: (lg.r < 0.92) & ~ptx & ~fluid & (heart_r > 1.08) & (du > 0.1) for s, lg in lungs.items()}

    def zone_mask(zone: str, strict: bool) -> np.ndarray:
        level, side = zone.split("_")
        lung = lungs[side]
        band = (v < lung.cv) if level == "upper" else (v >= lung.cv) & (v < lung.cv + 0.75 * lung.av)
        return band & (visible[side] & (lung.r < 0.8) if strict else lung.r < 0.92)

    truth = {"ctr": round(ctr, 3)}
    if f.consolidation:
        zm = zone_mask(f.consolidation, True)
        fb = zone_mask(f.consolidation, False)
        sigma = rng.uniform(0.06, 0.075) * w
        i = _place(rng, zm, fb)
        blobs = np.zeros((h, w), np.float32)
        for bx, by in rng.normal(0, 1.1 * sigma, (4, 2)) + (cv_.x.flat[i], cv_.y.flat[i]):
            blobs += np.exp(-((bx - cv_.x) ** 2 + (by - cv_.y) ** 2) / (2 * sigma**2))
        blobs *= 1.0 + 0.25 * smooth_noise(rng, (h, w), 1.5)
        alpha = np.clip((blobs - 0.45) / 0.35, 0, 1) * lung_soft[f.consolidation.split("_")[1]]
        img += 85.0 * alpha
        cons = alpha > 0.35
        ys, xs = np.nonzero(cons)
        truth.update(consolidation_x0=int(xs.min()), consolidation_y0=int(ys.min()),
                     consolidation_x1=int(xs.max()) + 1, consolidation_y1=int(ys.max()) + 1)  # fmt: skip
        masks["consolidation"] = cons
    if f.nodule:
        i = _place(rng, zone_mask(f.nodule, True), zone_mask(f.nodule, False))
        nx, ny, nr = float(cv_.x.flat[i]), float(cv_.y.flat[i]), rng.uniform(0.03, 0.05) * w
        img += 80.0 * soft(nr - np.hypot(cv_.x - nx, cv_.y - ny), 0.6)
        truth.update(nodule_x=round(nx, 1), nodule_y=round(ny, 1), nodule_r=round(nr, 2))

    # mediastinum, trachea, aortic knob, heart (in front of everything)
    med = soft(0.062 + 0.018 * soft(0.36 - v, 0.03) - np.abs(u - 0.51), 0.008) * soft(v - 0.05, 0.02) * soft(0.8 - v, 0.03)
    img = _blend(img, 168.0, 0.9 * med) + 10.0 * soft(0.035 - du, 0.006) * body
    img = _blend(img, 70.0, 0.6 * soft(0.016 - du, 0.005) * soft(0.36 - v, 0.02) * soft(v - 0.03, 0.02))
    img = _blend(img, 165.0, soft(1.0 - cv_.ellipse(0.565, 0.31, 0.035, 0.03), 0.1))
    img = _blend(img, 158.0 + 3.0 * rng.standard_normal((h, w)), 0.92 * soft(1.0 - heart_r, 0.04))
    if ap:
        for sgn in (-1.0, 1.0):
            img += 10.0 * soft(1.0 - cv_.ellipse(0.5 + sgn * 0.37, 0.3, 0.07, 0.14), 0.1)
    return cv_.finish(img, 3.0 if ap else 2.2), truth, {k: m.astype(np.uint8) * 255 for k, m in masks.items()}


def draw_lateral(f: CxrFindings, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Paint a lateral view (anterior on the image left): lung field, heart, spine, dependent fluid."""
    cv_ = _Canvas(h, w, rng)
    u, v = cv_.u, cv_.v
    img = _blend(np.full((h, w), 10.0, np.float32), 118.0, soft(1.0 - cv_.ellipse(0.5, 0.56, 0.44, 0.5, 3.5), 0.03))
    lung_r = cv_.ellipse(0.5, 0.46, 0.30, 0.31, 2.6)
    field_ = 58.0 + 6.0 * smooth_noise(rng, (h, w), 0.9)
    img = _blend(img, field_, soft(1.0 - lung_r, 0.04))
    img = _blend(img, 150.0, 0.75 * soft(1.0 - cv_.ellipse(0.36, 0.63, 0.15 * (1.35 if f.cardiomegaly else 1.0), 0.15), 0.05))
    discs = 0.5 + 0.5 * np.cos(2 * np.pi * v / 0.055)
    img = _blend(img, 150.0 + 30.0 * discs, soft(0.05 - np.abs(u - 0.83), 0.01) * soft(v - 0.08, 0.02))
    if f.effusion:
        top = 0.46 + 0.31 - {"small": 0.15, "moderate": 0.22, "large": 0.3}[f.effusion_size]
        img = _blend(img, 130.0, 0.85 * soft(v - top + 0.1 * (0.75 - u), 0.015) * soft(1.05 - lung_r, 0.04))
    return cv_.finish(img, 2.5)


# ---------------------------------------------------------------------------------------------- dataset


@dataclass
class _CxrImage:
    dicom_id: str
    view: str  # PA, AP, LATERAL, LL, AP AXIAL or "" (blank ViewPosition)
    width: int
    height: int


@dataclass
class _CxrStudy:
    index: int
    subject_id: int
    study_id: int
    split: str = "train"
    date: int = 0
    time: float = 0.0
    findings: CxrFindings = field(default_factory=CxrFindings)
    images: list[_CxrImage] = field(default_factory=list)
    style: str = "standard"
    label_row: str = "labels"  # labels | missing (no chexpert row) | blank (all 14 blank)


# Traps forced on the first studies (every size exercises all of them).
_FORCED_VIEWS = [("PA", "LATERAL"), ("AP",), ("",), ("PA", "LL"), ("PA", "AP AXIAL")]
_FORCED_STYLES = ["no_headers", "typo", "numbered", "too_short", "findings_only", "impressions", "conclusion", "no_headers"]
_VIEW_META = {  # ViewPosition -> (procedure, view code meaning, orientation)
    "PA": ("CHEST (PA AND LAT)", "postero-anterior", "Erect"),
    "AP": ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent"),
    "LATERAL": ("CHEST (PA AND LAT)", "lateral", "Erect"),
    "LL": ("CHEST (PA AND LAT)", "left lateral", "Erect"),
    "AP AXIAL": ("CHEST (PORTABLE AP)", "antero-posterior", ""),
    "": ("", "", ""),
}


def _unique_ints(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    out, seen = [], set()
    while len(out) < n:
        x = int(rng.integers(low, high))
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, 5, dtype=np.uint64))


def _assign_splits(counts: list[int], rng: np.random.Generator) -> list[str]:
    """Patient-level splits: patients in random order fill test (~15 % of studies), validate (~5 %), then train."""
    total = sum(counts)
    targets = {"test": max(1, round(0.15 * total)), "validate": max(1, round(0.05 * total))}
    filled, splits = {"test": 0, "validate": 0, "train": 0}, [""] * len(counts)
    for p in rng.permutation(len(counts)):
        split = next((s for s in ("test", "validate") if filled[s] < targets[s]), "train")
        splits[p] = split
        filled[split] += counts[p]
    return splits


def _views(i: int, rng: np.random.Generator) -> tuple[str, ...]:
    """ViewPositions of study ``i``: one PA/AP frontal, sometimes a lateral, rarely an odd view."""
    if i < len(_FORCED_VIEWS):
        return _FORCED_VIEWS[i]
    views = ("AP",) if rng.random() < 0.3 else ("PA",)
    r = rng.random()
    if views == ("PA",) and r < 0.10:
        return ("PA", "LATERAL")
    if r > 0.997:
        return pick(rng, [("PA", "LL"), ("PA", "AP AXIAL"), ("",)])
    return views


def plan_studies(n_studies: int, seed: int) -> list[_CxrStudy]:
    """Patients, studies, splits, images, report styles and label traps of the whole dataset.

    Args:
        n_studies: number of studies (1-4 per patient).
        seed: dataset seed.

    Returns:
        Studies in creation order; ``index`` keys every per-study random stream.
    """
    rng = rng_for(seed, _STUDY_STREAM)
    counts = []
    while sum(counts) < n_studies:
        counts.append(min(int(rng.choice([1, 2, 3, 4], p=[0.62, 0.25, 0.09, 0.04])), n_studies - sum(counts)))
    subjects = _unique_ints(rng, len(counts), 10_000_000, 20_000_000)
    study_ids = _unique_ints(rng, n_studies, 50_000_000, 60_000_000)
    splits = _assign_splits(counts, rng)
    studies, dicom_seen = [], set()
    for p, count in enumerate(counts):
        day = datetime.date(2110, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 90 * 365)))  # shifted dates
        for _ in range(count):
            i = len(studies)
            secs = int(rng.integers(0, 86400))
            hhmmss = (secs // 3600) * 10000 + (secs % 3600 // 60) * 100 + secs % 60  # float: leading zeros lost
            st = _CxrStudy(i, subjects[p], study_ids[i], splits[p], int(day.strftime("%Y%m%d")),
                           hhmmss + int(rng.integers(0, 8)) / 8)  # fmt: skip
            day += datetime.timedelta(days=int(rng.integers(1, 400)))
            for view in _views(i, rng):
                dicom = _dicom_id(rng)
                while dicom in dicom_seen:
                    dicom = _dicom_id(rng)
                dicom_seen.add(dicom)
                st.images.append(_CxrImage(dicom, view, int(rng.integers(128, 145)), int(rng.integers(150, 171))))
            st.style = _FORCED_STYLES[i] if i < len(_FORCED_STYLES) else str(rng.choice(STYLES, p=STYLE_P))
            if i == 0:
                st.label_row, st.time = "missing", 80556.875  # no chexpert row; 08:05:56.875
            elif st.style == "too_short":
                st.label_row = "blank"
            elif i >= len(_FORCED_STYLES) and rng.random() < 0.005:
                st.label_row = pick(rng, ("missing", "blank"))
            forced_normal = {3: True, 5: False}.get(i)  # 3: the "Stable." report; 5: carries a hedged finding
            st.findings = sample_findings(rng_for(seed, _STUDY_STREAM, i), normal=forced_normal)
            if i == 5:
                st.findings.hedged = tuple(st.findings.present()[:1])
            studies.append(st)
    return studies


def _files_dir(st: _CxrStudy) -> str:
    return f"files/p{str(st.subject_id)[:2]}/p{st.subject_id}"


def _fmt_label(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def write_dataset(root: Path, n_studies: int, seed: int) -> dict[str, int]:
    """Write the whole MIMIC-CXR-JPG demo under ``root``.

    Args:
        root: dataset root (created).
        n_studies: number of studies.
        seed: dataset seed.

    Returns:
        Counts: ``studies``, ``images``, ``frontal`` (PA/AP images), ``test_studies``.
    """
    studies = plan_studies(n_studies, seed)
    meta_rows, split_rows, label_rows, test_rows, truth_rows, filenames = [], [], [], [], [], []
    for st in sorted(studies, key=lambda s: (s.subject_id, s.study_id)):
        folder = root / _files_dir(st)
        (folder / f"s{st.study_id}").mkdir(parents=True, exist_ok=True)
        frontal = next((im.view for im in st.images if im.view in ("PA", "AP")), "PA")
        has_lateral = any(im.view in ("LATERAL", "LL") for im in st.images)
        text, labels = report_text(st.findings, rng_for(seed, _TEXT_STREAM, st.index), st.style, frontal, has_lateral)
        (folder / f"s{st.study_id}.txt").write_text(text, encoding="utf-8")
        if st.label_row != "missing":
            values = [labels.get(k) if st.label_row == "labels" else None for k in CHEXPERT_LABELS]
            label_rows.append([st.subject_id, st.study_id, *(_fmt_label(x) for x in values)])
        f = st.findings
        if st.split == "test":
            sim = {"Cardiomegaly": f.cardiomegaly, "Pleural Effusion": f.effusion, "Consolidation": f.consolidation,
                   "Pneumothorax": f.pneumothorax, "Lung Lesion": f.nodule, "No Finding": not f.present()}  # fmt: skip
            test_rows.append([st.study_id, *(_fmt_label(float(bool(sim[k]))) if k in sim else "" for k in CHEXPERT_LABELS)])
        for j, im in enumerate(st.images):
            rng = rng_for(seed, _IMAGE_STREAM, st.index, j)
            rel = f"{_files_dir(st)}/s{st.study_id}/{im.dicom_id}.jpg"
            truth = {}
            if im.view in ("PA", "AP"):
                pixels, truth, masks = draw_frontal(f, im.height, im.width, im.view, rng)
                for name, mask in masks.items():
                    (root / "demo_truth" / "masks").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(root / "demo_truth" / "masks" / f"{im.dicom_id}_{name}.png")
            else:
                pixels = draw_lateral(f, im.height, im.width, rng)
            Image.fromarray(pixels).save(root / rel, quality=95)
            filenames.append(rel)
            proc, code, orient = _VIEW_META[im.view]
            meta_rows.append([im.dicom_id, st.subject_id, st.study_id, proc, im.view, im.height, im.width, st.date,
                              repr(st.time), proc, code, orient])  # fmt: skip
            split_rows.append([im.dicom_id, st.study_id, st.subject_id, st.split])
            truth_rows.append([
                im.dicom_id, st.study_id, st.subject_id, st.split, im.view, im.width, im.height, int(f.cardiomegaly),
                truth.get("ctr"), int(f.effusion in ("left", "bilateral")), int(f.effusion in ("right", "bilateral")),
                int(bool(f.consolidation)), f.consolidation, truth.get("consolidation_x0"), truth.get("consolidation_y0"),
                truth.get("consolidation_x1"), truth.get("consolidation_y1"), int(f.pneumothorax == "left"),
                int(f.pneumothorax == "right"), int(bool(f.nodule)), truth.get("nodule_x"), truth.get("nodule_y"),
                truth.get("nodule_r"),
            ])  # fmt: skip
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    for name in ("chexpert", "negbio"):
        write_csv(root / f"mimic-cxr-2.0.0-{name}.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS], label_rows)
    write_csv(root / "mimic-cxr-2.1.0-test-set-labeled.csv", ["study_id", *CHEXPERT_LABELS], test_rows)
    (root / "IMAGE_FILENAMES").write_text("".join(p + "\n" for p in filenames), encoding="utf-8")
    write_csv(root / "demo_truth" / "cxr_findings.csv", TRUTH_COLUMNS, truth_rows)
    counts = {
        "studies": len(studies),
        "images": len(filenames),
        "frontal": sum(im.view in ("PA", "AP") for st in studies for im in st.images),
        "test_studies": len(test_rows),
    }
    write_json(root / "demo_truth" / "info.json", {"kind": "cxr", "seed": seed, "counts": counts})
    return counts
