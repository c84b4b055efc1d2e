"""Tiny synthetic fixtures in the exact on-disk formats of MIMIC-CXR-JPG and CT-RATE.

Recipes: ``specs/datasets.md`` §1.11 (MIMIC) and §8.7 (CT-RATE). Every ID, report sentence and
pixel is made up; each trap of §1.12 / §8.8 has at least one row that exercises it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

# --------------------------------------------------------------------------------------------- MIMIC

MIMIC_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]


def mimic_report(**sections: str) -> str:
    """A report in the MIMIC shape: centred title, every line starting with one space."""
    lines = ["                                 FINAL REPORT"]
    for header, body in sections.items():
        lines.append(f" {header.replace('_', ' ')}:  {body}" if body and "\n" not in body else f" {header.replace('_', ' ')}: ")
        if body and "\n" in body:
            lines.append(" ")
            lines.extend(f" {line}" for line in body.split("\n"))
        lines.append(" ")
    return "\n".join(lines) + "\n"


REPORT_FULL = mimic_report(
    EXAMINATION="CHEST (PA AND LAT)",
    INDICATION="___ year old with cough  // eval for infiltrate",
    COMPARISON="___",
    FINDINGS="Lungs are well expanded and clear.  No focal consolidation,\npleural effusion or pneumothorax.  Heart size is normal.",
    IMPRESSION="No acute cardiopulmonary process.",
)
REPORT_FINDINGS_ONLY = mimic_report(
    EXAMINATION="CHEST (PORTABLE AP)",
    FINDINGS="Portable view of the chest.  Small left pleural effusion is new.\nMild cardiomegaly.",
)
REPORT_TYPO = mimic_report(
    INDICATION="Shortness of breath.",
    FINIDNGS="Right basal opacity has increased in size.",
    IMPRESSON="Worsening right lower lobe consolidation.",
)
REPORT_NUMBERED = mimic_report(
    TECHNIQUE="Single frontal view.",
    IMPRESSION="1. No pneumothorax. 2. Mild edema.",
)
REPORT_NO_HEADER = (
    "                                 FINAL REPORT\n"
    " Frontal chest radiograph was obtained.\n"
    " \n"
    " The lungs are clear without effusion.  Cardiac silhouette is stable.\n"
)
REPORT_TOO_SHORT = mimic_report(EXAMINATION="CHEST", IMPRESSION="Normal.")
REPORT_TWO_FRONTAL = mimic_report(
    FINDINGS="Endotracheal tube tip sits above the carina.",
    IMPRESSION="Support devices in standard position.",
)


@dataclass
class MimicImage:
    subject: str
    study: str
    dicom: str
    view: str  # "" = blank ViewPosition
    split: str
    size: tuple[int, int] = (64, 80)  # (W, H)


@dataclass
class MimicFixture:
    root: Path
    reports_root: Path
    images: list[MimicImage] = field(default_factory=list)


def _dicom(i: int) -> str:
    h = f"{i:08x}"
    return "-".join(f"{int(h, 16) * (k + 7) % 0xFFFFFFFF:08x}" for k in range(5))


# studies: (subject, study, split, report, [(view, (W, H))], labels or None = no label row)
MIMIC_STUDIES = [
    ("10000001", "50000001", "train", REPORT_FULL, [("PA", (64, 80)), ("LATERAL", (64, 80))],
     {"No Finding": "1.0", "Edema": "0.0", "Pneumonia": "-1.0"}),
    ("10000001", "50000002", "train", REPORT_FINDINGS_ONLY, [("AP", (80, 64))],
     {"Pleural Effusion": "1.0", "Cardiomegaly": "-1.0", "No Finding": ""}),
    ("10000004", "50000007", "train", REPORT_TOO_SHORT, [("PA", (64, 80))], {"No Finding": "1.0"}),
    ("10000004", "50000008", "train", REPORT_TWO_FRONTAL, [("PA", (64, 80)), ("AP", (72, 80))], None),
    ("11000002", "50000003", "validate", REPORT_FULL, [("", (64, 80))], {"No Finding": "1.0"}),
    ("11000002", "50000004", "validate", REPORT_TYPO, [("PA", (64, 80))], {"Consolidation": "1.0"}),
    ("12000003", "50000005", "test", REPORT_NUMBERED, [("PA", (64, 80))], {"Edema": "1.0", "Pneumothorax": "0.0"}),
    ("12000003", "50000006", "test", REPORT_NO_HEADER, [("PA", (80, 64))], {"No Finding": "1.0"}),
]
# v2.1.0 radiologist labels of the test studies (columns deliberately not in alphabetical order)
MIMIC_TEST_SET = {"50000005": {"Edema": "0.0", "Pneumothorax": "1.0"}, "50000006": {"Atelectasis": "1.0"}}


def write_mimic(root: Path, *, gz: bool = True, reports_root: Path | None = None, test_set: bool = True) -> MimicFixture:
    """Write the MIMIC-CXR-JPG fixture (§1.11) under ``root``; reports go to ``reports_root`` or root."""
    root.mkdir(parents=True, exist_ok=True)
    reports_root = reports_root or root
    rng = np.random.default_rng(0)
    fx = MimicFixture(root=root, reports_root=reports_root)
    meta_rows, split_rows, label_rows, negbio_rows = [], [], [], []
    counter = 0
    for subject, study, split, report, images, labels in MIMIC_STUDIES:
        rep = reports_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        rep.parent.mkdir(parents=True, exist_ok=True)
        rep.write_text(report)
        for view, (w, h) in images:
            counter += 1
            dicom = _dicom(counter)
            path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = np.clip(60 + 120 * (yy / h) + rng.normal(0, 10, (h, w)) + 40 * (xx / w), 1, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(path, quality=95)
            fx.images.append(MimicImage(subject, study, dicom, view, split, (w, h)))
            time = "80556.875" if counter == 1 else f"{120000 + counter}.5"  # leading zero lost
            meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, h, w, 21800506, time,
                              "CHEST (PA AND LAT)", "postero-anterior" if view == "PA" else "", "Erect"])
            split_rows.append([dicom, study, subject, split])
        if labels is not None:
            label_rows.append([subject, study] + [labels.get(n, "") for n in MIMIC_LABELS])
            negbio_rows.append([subject, study] + ["0.0" if labels.get(n) == "-1.0" else labels.get(n, "") for n in MIMIC_LABELS])
    meta_cols = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                 "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                 "PatientOrientationCodeSequence_CodeMeaning"]
    ext = ".csv.gz" if gz else ".csv"
    comp = "gzip" if gz else None
    pd.DataFrame(meta_rows, columns=meta_cols).to_csv(root / f"mimic-cxr-2.0.0-metadata{ext}", index=False, compression=comp)
    pd.DataFrame(split_rows, columns=["dicom_id", "study_id", "subject_id", "split"]).to_csv(
        root / f"mimic-cxr-2.0.0-split{ext}", index=False, compression=comp)
    pd.DataFrame(label_rows, columns=["subject_id", "study_id", *MIMIC_LABELS]).to_csv(
        root / f"mimic-cxr-2.0.0-chexpert{ext}", index=False, compression=comp)
    pd.DataFrame(negbio_rows, columns=["subject_id", "study_id", *MIMIC_LABELS]).to_csv(
        root / f"mimic-cxr-2.0.0-negbio{ext}", index=False, compression=comp)
    if test_set:
        cols = ["study_id", *reversed(MIMIC_LABELS)]
        rows = [[s] + [v.get(n, "0.0") for n in reversed(MIMIC_LABELS)] for s, v in MIMIC_TEST_SET.items()]
        pd.DataFrame(rows, columns=cols).to_csv(root / "mimic-cxr-2.1.0-test-set-labeled.csv", index=False)
    (root / "IMAGE_FILENAMES").write_text(
        "".join(f"files/p{i.subject[:2]}/p{i.subject}/s{i.study}/{i.dicom}.jpg\n" for i in fx.images))
    return fx


# ------------------------------------------------------------------------------------------ CT-RATE

CT_LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
CT_META_COLUMNS = [
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex", "PatientAge",
    "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt",
    "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType", "GeneratorPower",
    "FocalSpots", "ConvolutionKernel", "PatientPosition", "RevolutionTime", "SingleCollimationWidth",
    "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor",
    "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "NumberofSlices", "ZSpacing", "StudyDate",
]
CT_SHAPE = (16, 32, 32)  # (z, y, x) voxels


def phantom_hu(shape: tuple[int, int, int] = CT_SHAPE, seed: int = 0) -> np.ndarray:
    """A chest-like HU volume (z, y, x): air, a soft-tissue body, two lungs, a spine, and a marker
    bright block in the (low z, low y, low x) corner of the body so that flips are detectable."""
    d, h, w = shape
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.48 * w)) ** 2 <= 1
    hu[body] = 40.0
    for side in (-1, 1):
        lung = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx - side * 0.22 * w) / (0.16 * w)) ** 2 <= 1
        hu[lung] = -850.0
    spine = ((yy - (cy + 0.33 * h)) / (0.07 * h)) ** 2 + ((xx - cx) / (0.07 * w)) ** 2 <= 1
    hu[spine] = 700.0
    hu[: d // 4, int(0.2 * h) : int(0.3 * h), int(0.2 * w) : int(0.3 * w)] = 300.0
    hu += np.random.default_rng(seed).normal(0, 5, shape).astype(np.float32)
    return np.round(hu)


def write_nifti(path: Path, array: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


@dataclass
class CTVolume:
    name: str
    intercept: float = -1024.0
    spacing_xy: float = 0.8
    spacing_z: float = 2.5
    dtype: str = "int16"  # stored dtype of the v1 file
    fixed: bool = False  # also write a v2 file under <split>_fixed/
    v1: bool = True  # write the v1 file
    findings: str = "Lungs are clear. No effusion (left or right)."
    impressions: str = "No acute findings."
    clinical: str = "Not given."
    labels: tuple[int, ...] = ()
    kernel: str = "B"
    iop: str = "[1, 0, 0, 0, 1, 0]"
    seed: int = 0


def default_ct_volumes() -> list[CTVolume]:
    """§8.7: two recons, two scans of one patient, multi-digit recon id, -8192 and -1024, v2 copies,
    placeholder / empty report fields, single-quoted kernel list, float-formatted orientation."""
    return [
        CTVolume("train_1_a_1", intercept=-8192, fixed=True, kernel="['Bl57d', '3']", labels=(1, 0, 1)),
        CTVolume("train_1_a_2", intercept=-8192, labels=(1, 0, 1)),
        CTVolume("train_2_a_1", intercept=-1024, dtype="uint16", findings="", impressions="Cardiomegaly.",
                 iop="[1.000000, 0.000000, 0.000000, 0.000000, 1.000000, -0.000000]", labels=(0, 0, 1)),
        CTVolume("train_2_b_1", intercept=-1024, impressions="", findings="Small nodule in the right lung.",
                 labels=(0, 1)),
        CTVolume("train_3_a_2", spacing_xy=0.7, spacing_z=3.0, fixed=True, labels=(0, 0, 0, 1)),
        CTVolume("train_3_a_10", spacing_xy=0.7, spacing_z=3.0, labels=(0, 0, 0, 1), seed=1),
        CTVolume("train_4_a_1", findings="", impressions="Not given.", labels=()),  # no usable text
        CTVolume("train_5_a_1", labels=(1,)),
        CTVolume("train_6_a_1", labels=(0, 1)),
        CTVolume("train_7_a_1", intercept=-8192, labels=(0, 0, 1)),
        CTVolume("valid_1_a_1", intercept=-8192, fixed=True, labels=(1, 1)),
        CTVolume("valid_1_a_2", intercept=-8192, labels=(1, 1)),
        CTVolume("valid_2_a_1", intercept=-1024, labels=(0, 0, 0, 0, 1)),
    ]


def write_ct_rate(parent: Path, volumes: list[CTVolume] | None = None, *, extra_label_rows: list[str] = (),
                  skip_report: list[str] = ()) -> Path:
    """Write ``parent/dataset/`` in the CT-RATE layout (§8.7); returns the ``dataset`` folder."""
    volumes = default_ct_volumes() if volumes is None else volumes
    ds = parent / "dataset"
    rows: dict[str, dict[str, list]] = {"train": {"rep": [], "lab": [], "meta": []}, "valid": {"rep": [], "lab": [], "meta": []}}
    for v in volumes:
        split = v.name.split("_", 1)[0]
        patient, scan = v.name.rsplit("_", 2)[0], v.name.rsplit("_", 1)[0]
        hu = phantom_hu(seed=v.seed)
        rel = Path(patient) / scan / f"{v.name}.nii.gz"
        if v.v1:
            stored = (hu - v.intercept).astype(v.dtype)
            write_nifti(ds / split / rel, stored)  # default header: spacing 1, origin 0, identity
        if v.fixed:
            write_nifti(ds / f"{split}_fixed" / rel, hu.astype(np.int16), (v.spacing_z, v.spacing_xy, v.spacing_xy),
                        origin=(-166.0, 9.0, 56.3))
        file_name = f"{v.name}.nii.gz"
        if v.name not in skip_report:
            rows[split]["rep"].append([file_name, v.clinical, "Non-contrast chest CT.", v.findings, v.impressions])
        lab = list(v.labels) + [0] * (18 - len(v.labels))
        rows[split]["lab"].append([file_name, *lab])
        meta = {c: "" for c in CT_META_COLUMNS}
        meta.update(
            VolumeName=file_name, Manufacturer="Siemens Healthineers" if v.intercept == -8192 else "PHILIPS",
            PatientSex="M", PatientAge="036Y", ConvolutionKernel=v.kernel, PatientPosition="HFS",
            ImagePositionPatient="[-166, 9, 56.2998657]", ImageOrientationPatient=v.iop, SamplesPerPixel="1",
            PhotometricInterpretation="MONOCHROME2", Rows=str(CT_SHAPE[1]), Columns=str(CT_SHAPE[2]),
            XYSpacing=f"[{v.spacing_xy}, {v.spacing_xy}]", RescaleIntercept=str(int(v.intercept)), RescaleSlope="1",
            RescaleType="HU" if v.intercept == -1024 else "", NumberofSlices=str(CT_SHAPE[0]), ZSpacing=str(v.spacing_z),
            StudyDate="20200101",
        )
        rows[split]["meta"].append([meta[c] for c in CT_META_COLUMNS])
    for name in extra_label_rows:
        rows[name.split("_", 1)[0]]["lab"].append([f"{name}.nii.gz", *([0] * 18)])
    for split, rep_name, meta_name in (("train", "train", "train"), ("valid", "validation", "validation")):
        (ds / "radiology_text_reports").mkdir(parents=True, exist_ok=True)
        (ds / "multi_abnormality_labels").mkdir(parents=True, exist_ok=True)
        (ds / "metadata").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows[split]["rep"], columns=["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                                  "Impressions_EN"]).to_csv(
            ds / "radiology_text_reports" / f"{rep_name}_reports.csv", index=False)
        pd.DataFrame(rows[split]["lab"], columns=["VolumeName", *CT_LABELS]).to_csv(
            ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", index=False)
        pd.DataFrame(rows[split]["meta"], columns=CT_META_COLUMNS).to_csv(
            ds / "metadata" / f"{meta_name}_metadata.csv", index=False)
    return ds


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------------------- shared


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer over a tiny vocab written to disk (no hub access)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "volume", "shows", "looks", "like", "lung", "lungs",
             "no", "acute", "clear", "effusion", "edema", "pneumothorax", "mild", "heart", ".", ":"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    if tok.convert_tokens_to_ids("lung") == tok.unk_token_id:  # transformers >= 5 takes the path as `vocab`
        tok = BertTokenizerFast(vocab=str(vocab))
    assert tok.convert_tokens_to_ids("lung") != tok.unk_token_id
    return tok


@pytest.fixture(scope="session")
def mimic_root(tmp_path_factory) -> MimicFixture:
    return write_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg" / "2.0.0")


@pytest.fixture(scope="session")
def ct_root(tmp_path_factory) -> Path:
    """The parent folder holding ``dataset/`` (read-only for tests: copy before modifying)."""
    parent = tmp_path_factory.mktemp("ctrate")
    write_ct_rate(parent)
    return parent
