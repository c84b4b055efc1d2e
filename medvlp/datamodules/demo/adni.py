"""The synthetic Alzheimer's world: T1 brain MRI with EHR text in MedBLIP's list format (``specs/datasets.md`` §13).

Layout written (MedBLIP's ``local_data`` lists, image paths relative to the root)::

    <root>/local_data/<list>.csv                 no header, TAB-separated: <image path>\\t<text>
    <root>/ADNI/<PTID>/<VISCODE>/t1.nii.gz       ADNI-train / ADNI-test (PTID like 027_S_0120; bl, m06, ...)
    <root>/NACC/sub-NACC<id>/ses-<k>/t1.nii.gz   NACC-train / NACC-test
    <root>/OASIS2/OAS2_<id>_MR<k>/mpr-1.nii.gz   OASIS2-train
    <root>/AIBL/sub-<id>/t1.nii.gz               AIBL-test (a cohort never seen in training)
    <root>/MIRIAD/miriad_<id>/t1.nii.gz          MIRIAD-test (unseen; CN / AD only)
    <root>/demo_truth/info.json, vqa.csv         counts and settings; reference answers of the test images

Lists: ``ADNI-train``, ``NACC-train``, ``OASIS2-train`` (training cohorts; every visit of a subject in one
list, the diagnosis may progress between visits) and ``ADNI-test``, ``NACC-test``, ``AIBL-test``,
``MIRIAD-test`` (class-balanced, one diagnosis per subject). Label spellings follow the cohorts' own
tables: ADNI ``CN`` / ``MCI`` / ``Dementia`` (ADNIMERGE ``DX``), NACC ``Control`` / ``MCI`` / ``AD``,
OASIS-2 ``Nondemented`` / ``Demented`` plus ``Converted`` (no MedBLIP mapping), AIBL ``NC`` / ``MCI`` /
``AD``, MIRIAD ``control`` / ``AD``. Some ADNI visits carry no diagnosis (blank ``DX``): their text has
no diagnosis sentence (always the last visit of the first ADNI-train subject).

Text: one sentence per EHR field, in a fixed order, each skipped when the field is missing (a few rows
miss one; MIRIAD has no education), then the diagnosis sentence::

    A 74-year-old female. 16 years of education. MMSE score 28. The diagnosis is CN.

CDR is never written (OASIS defines its groups from it; ``specs/methods/medblip.md`` §3.3). MMSE depends
on the diagnosis with overlapping ranges (CN 26-30, MCI 23-29, AD 16-26); age weakly.

Volumes: a T1-like head (scalp, skull, cortical CSF rim, grey and white matter, two lateral
ventricles, hippocampi with temporal horns) on a small non-cubic grid of about 26 x 30 x 28 voxels
(z, y, x) whose shape, spacing and stored type (int16 or float32) depend on the cohort. A latent
severity (CN ~0, MCI ~1, AD ~2, with a subject effect and a weak age effect) enlarges the ventricles
and temporal horns, widens the CSF rim and shrinks the hippocampi. Head size, shape and position vary
per scan independently of the diagnosis, and the grey / white-matter intensity is scaled so that the
mean intensity inside the head does not depend on it either: the diagnosis is seen in the anatomy,
not in the volume's size or total brightness. The same seed gives identical lists and voxel arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import gaussian_blur, pick, rng_for, smooth_noise, write_csv, write_json

CLASSES = ("CN", "MCI", "AD")
ANSWERS = {"CN": "Not demented", "MCI": "mild cognitive impairment (MCI)", "AD": "Dementia"}
QUESTION = "What will this subject be diagnosed with?"
QA_PREFIX = f"Question: {QUESTION} Answer: "
VQA_QUESTIONS = (QUESTION, "Is the subject demented?", "Are the ventricles enlarged?")
SEVERITY = {"CN": 0.0, "MCI": 1.0, "AD": 2.0}  # mean latent severity per class
VENTRICLE_GROWTH = 0.5  # lateral-ventricle scale = 1 + VENTRICLE_GROWTH * severity
ENLARGED = 1.6  # ventricle scale above which the ventricles count as enlarged (VQA reference answers)
MMSE_RANGE = {"CN": (26, 30), "MCI": (23, 29), "AD": (16, 26)}
_PLAN_STREAM, _ID_STREAM, _PIXEL_STREAM, _CORPUS_STREAM = 41, 42, 43, 44


@dataclass(frozen=True)
class Cohort:
    """One source study: its grid, stored type, label spellings and demographics."""

    name: str
    shape: tuple[int, int, int]  # stored array (z, y, x)
    spacing: tuple[float, float, float]  # SimpleITK order (x, y, z), mm
    dtype: str  # int16 or float32
    labels: dict[str, str]  # class -> spelling in the lists
    prior: tuple[float, float, float]  # class frequencies (CN, MCI, AD) of the training subjects
    visits: tuple[float, ...]  # probabilities of 1, 2, ... visits of a training subject
    age: float = 73.0  # mean baseline age of the controls
    has_education: bool = True


COHORTS = {
    "ADNI": Cohort("ADNI", (26, 30, 28), (1.0, 1.0, 1.2), "int16", {"CN": "CN", "MCI": "MCI", "AD": "Dementia"},
                   (0.35, 0.40, 0.25), (0.3, 0.4, 0.3)),
    "NACC": Cohort("NACC", (25, 30, 27), (1.05, 1.05, 1.25), "int16", {"CN": "Control", "MCI": "MCI", "AD": "AD"},
                   (0.45, 0.25, 0.30), (0.7, 0.3), age=71.0),
    "OASIS2": Cohort("OASIS2", (27, 31, 28), (1.0, 1.0, 1.25), "float32", {"CN": "Nondemented", "AD": "Demented"},
                     (0.5, 0.0, 0.5), (0.3, 0.45, 0.25), age=76.0),
    "AIBL": Cohort("AIBL", (25, 29, 27), (1.1, 1.1, 1.2), "int16", {"CN": "NC", "MCI": "MCI", "AD": "AD"},
                   (0.5, 0.25, 0.25), (1.0,), age=72.0),
    "MIRIAD": Cohort("MIRIAD", (26, 31, 29), (0.95, 0.95, 1.2), "float32", {"CN": "control", "AD": "AD"},
                     (0.4, 0.0, 0.6), (1.0,), age=69.0, has_education=False),
}
CONVERTED = "Converted"  # OASIS-2 group without a MedBLIP mapping (these subjects are drawn between CN and MCI)
OASIS_CONVERTED = 0.1  # fraction of OASIS-2 subjects in the Converted group
NO_DIAGNOSIS = 0.02  # fraction of ADNI-train visits with a blank DX
MISSING = 0.04  # chance that one EHR field of a row is missing
_DROPPED = {(0, 1): "mmse", (0, 2): "age", (1, 0): "education", (1, 1): "sex"}  # (train list, subject): field
# training lists: (name, cohort, share of the training subjects); test lists: (name, cohort, per-class divisor)
TRAIN_LISTS = (("ADNI-train", "ADNI", 0.555), ("NACC-train", "NACC", 0.28), ("OASIS2-train", "OASIS2", 0.165))
TEST_LISTS = (("ADNI-test", "ADNI", 12), ("NACC-test", "NACC", 24), ("AIBL-test", "AIBL", 24), ("MIRIAD-test", "MIRIAD", 24))
VISIT_CODES = {"ADNI": ("bl", "m06", "m12", "m24"), "NACC": ("ses-1", "ses-2", "ses-3"), "OASIS2": ("MR1", "MR2", "MR3")}
VISIT_YEARS = {"bl": 0.0, "m06": 0.5, "m12": 1.0, "m24": 2.0}


@dataclass
class Scan:
    """One list row: a visit's volume, its EHR fields and its diagnosis."""

    list_name: str
    cohort: str
    subject: str
    image: str  # path relative to the root, as written in the list
    diagnosis: str | None  # the true class CN / MCI / AD (also when the text has no diagnosis); None: OASIS-2 Converted
    word: str | None  # the spelling after "The diagnosis is" (None: no diagnosis sentence)
    severity: float
    ehr: dict[str, int | str | None] = field(default_factory=dict)  # age, sex, education, mmse

    @property
    def text(self) -> str:
        return list_text(self.ehr, self.word)

    @property
    def enlarged(self) -> bool:
        return 1.0 + VENTRICLE_GROWTH * self.severity > ENLARGED


def description(ehr: dict[str, int | str | None]) -> str:
    """The EHR sentences of one row (fixed order, missing fields skipped; never empty for a drawn row)."""
    age, sex, educ, mmse = (ehr.get(k) for k in ("age", "sex", "education", "mmse"))
    parts = []
    if age is not None:
        article = "An" if str(age).startswith("8") or age in (11, 18) else "A"
        parts.append(f"{article} {age}-year-old {sex or 'subject'}.")
    elif sex:
        parts.append(f"A {sex} subject.")
    if educ is not None:
        parts.append(f"{educ} years of education.")
    if mmse is not None:
        parts.append(f"MMSE score {mmse}.")
    return " ".join(parts)


def list_text(ehr: dict[str, int | str | None], word: str | None) -> str:
    """A list row's text: the description, then ``The diagnosis is <word>.`` when a word is given."""
    text = description(ehr)
    return f"{text} The diagnosis is {word}." if word else text


def _draw_mmse(rng: np.random.Generator, cls: str) -> int:
    lo, hi = MMSE_RANGE[cls]
    if cls == "CN":
        return int(hi - min(hi - lo, rng.poisson(0.9)))
    mean, sd = (26.3, 1.6) if cls == "MCI" else (21.5, 2.8)
    return int(np.clip(np.rint(rng.normal(mean, sd)), lo, hi))


def _draw_subject(rng: np.random.Generator, cohort: Cohort, cls: str) -> dict:
    """Subject-level fields: baseline age, sex, education, severity offset."""
    age = float(np.clip(rng.normal(cohort.age + {"CN": 0.0, "MCI": 1.0, "AD": 2.5}[cls], 6.5), 56, 93))
    sex = "female" if rng.random() < (0.56 if cls == "AD" else 0.5) else "male"
    educ = int(np.clip(np.rint(rng.normal(15.5 - (0.8 if cls == "AD" else 0.0), 2.8)), 6, 22))
    return {"age": age, "sex": sex, "education": educ if cohort.has_education else None,
            "offset": float(rng.normal(0.0, 0.15))}


def _severity(rng: np.random.Generator, cls: str, offset: float, age: float) -> float:
    s = SEVERITY[cls] + offset + 0.012 * (age - 73.0) + rng.normal(0.0, 0.05)
    return float(np.clip(s, -0.4, 2.6))


def _ehr(rng: np.random.Generator, subject: dict, age: float, cls: str) -> dict:
    ehr = {"age": int(age), "sex": subject["sex"], "education": subject["education"], "mmse": _draw_mmse(rng, cls)}
    for key in ("age", "sex", "education", "mmse"):
        if rng.random() < MISSING:
            ehr[key] = None
    if not description(ehr):
        ehr["age"] = int(age)
    return ehr


def _ids(cohort: str, n: int, seed: int) -> list[str]:
    """``n`` distinct subject ids in the cohort's own spelling (shared by its train and test lists)."""
    rng = rng_for(seed, _ID_STREAM, list(COHORTS).index(cohort))
    if cohort == "ADNI":
        rids = rng.choice(np.arange(1, 7000), size=n, replace=False)
        return [f"{int(rng.integers(2, 142)):03d}_S_{int(r):04d}" for r in rids]
    if cohort == "NACC":
        return [f"sub-NACC{int(r):06d}" for r in rng.choice(np.arange(100000, 1000000), size=n, replace=False)]
    if cohort == "OASIS2":
        return [f"OAS2_{int(r):04d}" for r in np.sort(rng.choice(np.arange(1, max(200, 2 * n)), size=n, replace=False))]
    if cohort == "AIBL":
        return [f"sub-{int(r)}" for r in rng.choice(np.arange(1, 2000), size=n, replace=False)]
    return [f"miriad_{int(r):03d}" for r in rng.choice(np.arange(188, 900), size=n, replace=False)]


def _image(cohort: str, subject: str, visit: str) -> str:
    if cohort == "ADNI":
        return f"ADNI/{subject}/{visit}/t1.nii.gz"
    if cohort == "NACC":
        return f"NACC/{subject}/{visit}/t1.nii.gz"
    if cohort == "OASIS2":
        return f"OASIS2/{subject}_{visit}/mpr-1.nii.gz"
    return f"{cohort}/{subject}/t1.nii.gz"


def _train_subject(list_name: str, cohort: Cohort, subject_id: str, index: int, seed: int, list_index: int) -> list[Scan]:
    rng = rng_for(seed, _PLAN_STREAM, list_index, index)
    classes = [c for c in CLASSES if c in cohort.labels]
    group = None
    if cohort.name == "OASIS2":
        forced = ("CN", "AD", CONVERTED)
        group = forced[index] if index < 3 else CONVERTED if rng.random() < OASIS_CONVERTED else None
    cls = classes[index] if index < len(classes) else str(rng.choice(CLASSES, p=cohort.prior))
    if group == CONVERTED:
        cls = "CN"
    elif group is not None:
        cls = group
    subject = _draw_subject(rng, cohort, cls)
    n_visits = 1 + int(rng.choice(len(cohort.visits), p=cohort.visits))
    codes = VISIT_CODES[cohort.name]
    if cohort.name == "ADNI":
        later = sorted(rng.choice(np.arange(1, len(codes)), size=n_visits - 1, replace=False).tolist())
        visits = [codes[0], *(codes[k] for k in later)]
        years = [VISIT_YEARS[v] for v in visits]
    else:
        visits = list(codes[:n_visits])
        years = list(np.cumsum([0.0, *rng.uniform(1.0, 2.2, n_visits - 1)]))
    scans = []
    for k, (visit, dt) in enumerate(zip(visits, years, strict=True)):
        if k and group is None:  # progression between visits
            if cls == "CN" and "MCI" in cohort.labels and rng.random() < 0.1:
                cls = "MCI"
            elif cls == "MCI" and rng.random() < 0.2:
                cls = "AD"
        age = subject["age"] + dt
        if group == CONVERTED:
            severity = float(np.clip(0.45 + 0.3 * k + subject["offset"] + rng.normal(0, 0.05), 0.2, 1.3))
            word, diagnosis = CONVERTED, None
        else:
            severity = _severity(rng, cls, subject["offset"], age)
            word, diagnosis = cohort.labels[cls], cls
        ehr = _ehr(rng, subject, age, "MCI" if group == CONVERTED and k else cls)
        if k == 0 and (list_index, index) in _DROPPED:  # first subjects: one missing field each, always
            ehr[_DROPPED[(list_index, index)]] = None
        if cohort.name == "ADNI" and (rng.random() < NO_DIAGNOSIS or (index == 0 and k == len(visits) - 1)):
            word = None  # blank DX: no diagnosis sentence (the pixels still follow the disease)
        scans.append(Scan(list_name, cohort.name, subject_id, _image(cohort.name, subject_id, visit), diagnosis,
                          word, severity, ehr))
    return scans


def _test_list(list_name: str, cohort: Cohort, per_class: int, ids: list[str], seed: int, list_index: int) -> list[Scan]:
    """Class-balanced rows: ``per_class`` per class of the cohort, all visits of a subject in the list."""
    rng = rng_for(seed, _PLAN_STREAM, list_index, 0)
    subjects: list[tuple[str, int]] = []  # (class, number of visits)
    for cls in (c for c in CLASSES if c in cohort.labels):
        left = per_class
        while left:
            n = min(left, 1 + int(rng.choice(len(cohort.visits), p=cohort.visits)) if cohort.name == "ADNI" else 1)
            subjects.append((cls, n))
            left -= n
    order = rng.permutation(len(subjects))
    scans = []
    for j, i in enumerate(order):
        cls, n = subjects[int(i)]
        srng = rng_for(seed, _PLAN_STREAM, list_index, j + 1)
        subject = _draw_subject(srng, cohort, cls)
        codes = VISIT_CODES.get(cohort.name, ("",))
        for visit in codes[:n]:
            age = subject["age"] + VISIT_YEARS.get(visit, 0.0)
            scans.append(Scan(list_name, cohort.name, ids[j], _image(cohort.name, ids[j], visit), cls,
                              cohort.labels[cls], _severity(srng, cls, subject["offset"], age), _ehr(srng, subject, age, cls)))
    return scans


def per_class_sizes(n_subjects: int) -> dict[str, int]:
    """Rows per class of each test list for a world of ``n_subjects`` training subjects."""
    return {name: max(2 if div == 12 else 1, round(n_subjects / div)) for name, _, div in TEST_LISTS}


def plan_world(n_subjects: int, seed: int) -> list[Scan]:
    """Every list row of a world with ``n_subjects`` training subjects (deterministic in ``seed``)."""
    counts = {}
    left = n_subjects
    for name, _, share in TRAIN_LISTS:
        counts[name] = left if name == TRAIN_LISTS[-1][0] else max(3, round(n_subjects * share))
        left -= counts[name]
    counts[TRAIN_LISTS[-1][0]] = max(3, counts[TRAIN_LISTS[-1][0]])
    per_class = per_class_sizes(n_subjects)
    ids = {}
    for cohort in COHORTS:
        n_train = sum(counts[n] for n, c, _ in TRAIN_LISTS if c == cohort)
        n_test = sum(3 * per_class[n] for n, c, _ in TEST_LISTS if c == cohort)
        ids[cohort] = _ids(cohort, n_train + n_test, seed)
    scans: list[Scan] = []
    for li, (name, cohort, _) in enumerate(TRAIN_LISTS):
        for i in range(counts[name]):
            scans += _train_subject(name, COHORTS[cohort], ids[cohort][i], i, seed, li)
    for li, (name, cohort, _) in enumerate(TEST_LISTS, len(TRAIN_LISTS)):
        n_train = sum(counts[n] for n, c, _ in TRAIN_LISTS if c == cohort)
        scans += _test_list(name, COHORTS[cohort], per_class[name], ids[cohort][n_train:], seed, li)
    return scans


def _ellipsoid(u: tuple[np.ndarray, np.ndarray, np.ndarray], centre: tuple[float, float, float],
               axes: tuple[float, float, float]) -> np.ndarray:
    """Squared ellipsoidal radius in the head's normalised coordinates ``u`` (<= 1 inside)."""
    return sum(((ui - c) / a) ** 2 for ui, c, a in zip(u, centre, axes, strict=True))


# T1-like intensities (arbitrary units) of background, scalp, skull, CSF, grey and white matter, orbital fat (brightest)
INTENSITY = (0.0, 0.85, 0.10, 0.12, 0.45, 0.70, 1.0)
_SCALP, _BONE, _CSF, _GREY, _WHITE, _FAT = 1, 2, 3, 4, 5, 6
HEAD_MEAN = 0.46  # the head's mean intensity (before noise) that the brain-tissue scaling aims at
COMPENSATE = 0.75  # exponent of that scaling: the share of the atrophy's darkening that it undoes


def render(shape: tuple[int, int, int], severity: float, rng: np.random.Generator) -> np.ndarray:
    """float32 ``(z, y, x)`` T1-like head, roughly in [0, 1]; anatomy graded by ``severity``.

    Atrophy with severity ``s`` (CN ~0, MCI ~1, AD ~2): lateral ventricles scaled by ``1 + 0.5 s``,
    the cortical CSF rim ``0.04 + 0.03 s`` of the head radius (about 0.5 to 1.3 voxels, modulated by a
    sulcal pattern), temporal horns by ``0.7 + 0.5 s`` and hippocampi by ``1 - 0.18 s``. Head size,
    shape, position, bias field, noise and the grey / white contrast vary independently of ``s``. Grey
    and white matter are brightened by ``f ** COMPENSATE``, ``f`` being the factor that would bring the
    head's mean intensity to ``HEAD_MEAN``, so the mean intensity says little about ``s``; the orbital
    fat (random brightness) is the brightest tissue and sets the min-max range.
    """
    s = float(severity)
    centre = [(n - 1) / 2 + rng.uniform(-1.0, 1.0) for n in shape]
    size = float(np.clip(rng.normal(1.0, 0.025), 0.95, 1.04))
    radii = [f * n * size * float(rng.uniform(0.98, 1.02)) for f, n in zip((0.43, 0.45, 0.43), shape, strict=True)]
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    u = tuple(((g.astype(np.float32) - c) / r) for g, c, r in zip(grids, centre, radii, strict=True))
    d = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    sulci = smooth_noise(rng, shape, 1.5)
    surface = 0.83 - (0.04 + 0.03 * s) * np.clip(1.0 + 0.5 * sulci, 0.2, None)
    tissue = np.zeros(shape, np.int8)  # index into INTENSITY
    head = d <= 1.0
    tissue[head] = _SCALP
    tissue[d <= 0.91] = _BONE
    tissue[d <= 0.83] = _CSF
    tissue[d <= surface] = _GREY
    tissue[d <= surface - 0.17] = _WHITE
    vs, horn, hippo = 1.0 + VENTRICLE_GROWTH * s, 0.7 + 0.5 * s, 1.0 - 0.18 * s
    for side in (-1.0, 1.0):
        vent = _ellipsoid(u, (0.10, -0.03, side * (0.11 + 0.03 * s)), (0.14 * vs, 0.34 * vs, 0.10 * vs))
        tissue[vent <= 1.0] = _CSF
        tissue[_ellipsoid(u, (-0.28, 0.02, side * 0.42), (0.07 * horn, 0.2 * horn, 0.07 * horn)) <= 1.0] = _CSF
        tissue[_ellipsoid(u, (-0.30, 0.02, side * 0.40), (0.085 * hippo, 0.24 * hippo, 0.085 * hippo)) <= 1.0] = _GREY
        tissue[_ellipsoid(u, (-0.30, -0.86, side * 0.32), (0.16, 0.13, 0.16)) <= 1.0] = _FAT  # orbital fat
    values = np.array(INTENSITY, np.float64)
    values[_WHITE] *= rng.uniform(0.96, 1.04)  # the grey / white contrast varies per scan
    values[_FAT] *= rng.uniform(0.95, 1.25)  # the brightest tissue, which sets the min-max range
    # brain tissue brightened as atrophy replaces it by CSF (the head's mean intensity hardly depends on the
    # diagnosis), times a per-scan factor
    n = np.bincount(tissue[head].ravel(), minlength=len(values)).astype(np.float64)
    brain = n[_GREY] * values[_GREY] + n[_WHITE] * values[_WHITE]
    rest = float(n @ values) - brain
    full = float(np.clip((HEAD_MEAN * float(n.sum()) - rest) / max(brain, 1e-6), 0.5, 2.0))
    values[[_GREY, _WHITE]] *= full**COMPENSATE * float(rng.uniform(0.93, 1.07))
    vol = values.astype(np.float32)[tissue]
    vol = gaussian_blur(vol, 0.6)
    vol *= 1.0 + 0.05 * smooth_noise(rng, shape, 4.0)
    vol += rng.normal(0.0, 0.03, shape).astype(np.float32) * (d <= 1.05)
    vol += np.abs(rng.normal(0.0, 0.012, shape)).astype(np.float32)
    return np.clip(vol, 0.0, None).astype(np.float32)


def _write_volume(path: Path, vol: np.ndarray, cohort: Cohort, rng: np.random.Generator) -> None:
    import SimpleITK as sitk

    gain = float(rng.uniform(0.8, 1.25))
    if cohort.dtype == "int16":
        arr = np.clip(np.rint(vol * 900.0 * gain), 0, 32767).astype(np.int16)
    else:
        arr = (np.round(vol * 400.0 * gain) / 4.0).astype(np.float32)  # quarter units: smaller files
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(cohort.spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def vqa_rows(scans: list[Scan]) -> list[tuple[str, str, str]]:
    """``(image, question, answer)`` reference rows of the test images (diagnosis, dementia, ventricles)."""
    rows = []
    for s in scans:
        if s.list_name.endswith("-test") and s.diagnosis:
            rows += [(s.image, VQA_QUESTIONS[0], ANSWERS[s.diagnosis]),
                     (s.image, VQA_QUESTIONS[1], "yes" if s.diagnosis == "AD" else "no"),
                     (s.image, VQA_QUESTIONS[2], "yes" if s.enlarged else "no")]
    return rows


def write_dataset(root: Path, n_subjects: int, seed: int) -> dict[str, int]:
    """Write the world with ``n_subjects`` training subjects under ``root``; returns its counts."""
    root = Path(root)
    scans = plan_world(n_subjects, seed)
    for i, s in enumerate(scans):
        rng = rng_for(seed, _PIXEL_STREAM, i)
        _write_volume(root / s.image, render(COHORTS[s.cohort].shape, s.severity, rng), COHORTS[s.cohort], rng)
    lists: dict[str, list[str]] = {}
    per_list: dict[str, dict[str, int]] = {}
    for s in scans:
        lists.setdefault(s.list_name, []).append(f"{s.image}\t{s.text}")
        key = "no_diagnosis" if s.word is None else CONVERTED if s.word == CONVERTED else str(s.diagnosis)
        counts = per_list.setdefault(s.list_name, {"rows": 0, "subjects": 0})
        counts["rows"] += 1
        counts[key] = counts.get(key, 0) + 1
    for name in per_list:
        per_list[name]["subjects"] = len({s.subject for s in scans if s.list_name == name})
    (root / "local_data").mkdir(parents=True, exist_ok=True)
    for name, lines in lists.items():
        (root / "local_data" / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vqa = vqa_rows(scans)
    write_csv(root / "demo_truth" / "vqa.csv", ["image", "question", "answer"], vqa)
    counts = {"lists": len(lists), "subjects": len({(s.cohort, s.subject) for s in scans}), "volumes": len(scans),
              "train_volumes": sum(s.list_name.endswith("-train") for s in scans),
              "test_volumes": sum(s.list_name.endswith("-test") for s in scans), "vqa_questions": len(vqa)}
    settings = {
        "severity": {**SEVERITY, "subject_sd": 0.15, "visit_sd": 0.05, "age_per_year": 0.012},
        "ventricle_scale": f"1 + {VENTRICLE_GROWTH} * severity", "enlarged_above": ENLARGED,
        "cortical_rim": "0.04 + 0.03 * severity (head radii)", "hippocampus_scale": "1 - 0.18 * severity",
        "mmse_range": {k: list(v) for k, v in MMSE_RANGE.items()}, "head_mean": HEAD_MEAN,
        "cohorts": {c.name: {"shape_zyx": list(c.shape), "spacing_xyz": list(c.spacing), "dtype": c.dtype,
                             "labels": dict(c.labels)} for c in COHORTS.values()},
    }
    write_json(root / "demo_truth" / "info.json", {"world": "adni", "seed": seed, "n_subjects": n_subjects,
                                                   "counts": counts, "lists": per_list, "settings": settings})
    return counts


def ehr_corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Texts of the world without pixels, e.g. to train a tokenizer.

    ``n`` drawn rows (even: the full list text with its diagnosis sentence; odd: the description
    alone) from every cohort, then each label spelling in a diagnosis sentence, the diagnosis question
    with each canonical answer, the canonical answers alone and the VQA questions with their answers.
    """
    rng = rng_for(seed, _CORPUS_STREAM)
    cohorts = list(COHORTS.values())
    texts = []
    for i in range(n):
        cohort = pick(rng, cohorts)
        cls = str(rng.choice(CLASSES, p=cohort.prior))
        subject = _draw_subject(rng, cohort, cls)
        ehr = _ehr(rng, subject, subject["age"] + float(rng.uniform(0, 2)), cls)
        word = CONVERTED if cohort.name == "OASIS2" and rng.random() < OASIS_CONVERTED else cohort.labels[cls]
        texts.append(list_text(ehr, word) if i % 2 == 0 else description(ehr))
    spellings = sorted({w for c in cohorts for w in c.labels.values()} | {CONVERTED})
    texts += [f"The diagnosis is {w}." for w in spellings]
    texts += [QA_PREFIX + a for a in ANSWERS.values()] + list(ANSWERS.values())
    texts += [f"Question: {q} Answer: {a}" for q in VQA_QUESTIONS[1:] for a in ("yes", "no")]
    return texts


__all__ = ["ANSWERS", "CLASSES", "COHORTS", "QUESTION", "Scan", "description", "ehr_corpus", "list_text",
           "plan_world", "render", "per_class_sizes", "vqa_rows", "write_dataset"]
