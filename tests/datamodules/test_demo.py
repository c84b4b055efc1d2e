"""The synthetic radiology world: official layouts, traps, determinism, visible findings, caching."""

from __future__ import annotations

import ast
import gzip
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from PIL import Image

from medvlp.datamodules import demo
from medvlp.datamodules.demo import ct, cxr
from medvlp.datamodules.demo._util import gaussian_blur, rng_for

PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "prompts"
CXR_KEYWORDS = {"Cardiomegaly": ("cardiomegaly", "enlarged"), "Pleural Effusion": ("effusion",),
                "Consolidation": ("consolidation",), "Pneumothorax": ("pneumothorax",), "Lung Lesion": ("nodul",)}  # fmt: skip
CT_KEYWORDS = {"Cardiomegaly": ("cardiomegaly", "enlarged"), "Pleural effusion": ("pleural effusion",),
               "Lung nodule": ("nodule",), "Consolidation": ("consolidation",), "Emphysema": ("emphysema",),
               "Arterial wall calcification": ("calcif",), "Hiatal hernia": ("hiatal hernia",)}  # fmt: skip
CT_ANATOMY = {"Cardiomegaly": "heart", "Pleural effusion": "lung", "Lung nodule": "lung", "Consolidation": "lung",
              "Emphysema": "lung", "Arterial wall calcification": "aorta", "Hiatal hernia": "esophagus"}  # fmt: skip


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny worlds written through the CLI entry point."""
    return demo.main_demo(tmp_path_factory.mktemp("demo"), kind="all", size="tiny", seed=0)


def _read(path: Path, **kw) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- MIMIC-CXR


def test_cxr_layout_and_csv_schemas(worlds: dict[str, Path]) -> None:
    root = worlds["cxr"]
    meta = _read(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns) == cxr.METADATA_COLUMNS
    split = _read(root / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    for name in ("chexpert", "negbio"):
        labels = _read(root / f"mimic-cxr-2.0.0-{name}.csv.gz")
        assert list(labels.columns) == ["subject_id", "study_id", *sorted(cxr.CHEXPERT_LABELS)]
        assert set(labels[cxr.CHEXPERT_LABELS].to_numpy().ravel()) <= {"1.0", "0.0", "-1.0", ""}
    test = _read(root / "mimic-cxr-2.1.0-test-set-labeled.csv")
    assert list(test.columns) == ["study_id", *cxr.CHEXPERT_LABELS]
    assert meta.dicom_id.str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    assert meta.subject_id.str.fullmatch(r"1\d{7}").all() and meta.study_id.str.fullmatch(r"5\d{7}").all()
    assert set(split.split) == {"train", "validate", "test"}
    assert split.groupby("subject_id").split.nunique().max() == 1  # patient-disjoint
    listed = (root / "IMAGE_FILENAMES").read_text().splitlines()
    assert len(listed) == len(meta) and all((root / p).is_file() for p in listed)
    for r in meta.itertuples():
        patient = root / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}"
        with Image.open(patient / f"s{r.study_id}" / f"{r.dicom_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (int(r.Columns), int(r.Rows))
            assert im.size[0] != im.size[1] and 128 <= im.size[0] <= 144 and 150 <= im.size[1] <= 170
        assert (patient / f"s{r.study_id}.txt").is_file()
    truth = _read(root / "demo_truth" / "cxr_findings.csv")
    assert list(truth.columns) == cxr.TRUTH_COLUMNS and set(truth.dicom_id) == set(meta.dicom_id)
    for mask_path in (root / "demo_truth" / "masks").glob("*.png"):
        dicom_id = mask_path.name.split("_")[0]
        row = meta.set_index("dicom_id").loc[dicom_id]
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == (int(row.Rows), int(row.Columns)) and set(np.unique(mask)) <= {0, 255}


def test_cxr_reports_have_the_mimic_text_format(worlds: dict[str, Path]) -> None:
    reports = sorted((worlds["cxr"] / "files").glob("p1*/p1*/s5*.txt"))
    assert reports
    for path in reports:
        lines = path.read_text().split("\n")
        assert lines[0].strip() == "FINAL REPORT" and lines[0].startswith(" " * 30)
        assert lines[-1] == "" and all(line.startswith(" ") and len(line) <= 79 for line in lines[:-1])
        assert all(line == " " or line.strip() for line in lines[:-1])  # blank lines are a single space


def test_cxr_traps_are_present(worlds: dict[str, Path]) -> None:
    root = worlds["cxr"]
    meta = _read(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert {"PA", "AP", "LATERAL", "LL", "AP AXIAL", ""} <= set(meta.ViewPosition)
    assert (meta.StudyTime.astype(float) < 100000).any() and (meta.StudyDate.astype(int) > 21000000).all()
    lateral = meta[meta.ViewPosition == "LATERAL"].study_id
    assert meta[meta.study_id.isin(lateral)].ViewPosition.isin(["PA", "AP"]).any()  # frontal + lateral share a study
    texts = [p.read_text() for p in (root / "files").glob("p1*/p1*/s5*.txt")]
    assert any("IMPRESSON:" in t for t in texts)
    assert any(re.search(r"IMPRESSION: \n \n 1\. .* 2\. ", t, re.S) for t in texts)
    assert any(":" not in t for t in texts)  # no section headers at all
    assert any("IMPRESSION:" not in t and "FINDINGS:" in t for t in texts)  # findings only
    assert any("IMPRESSIONS:" in t for t in texts) and any("CONCLUSION:" in t for t in texts)
    assert any(t.rstrip().endswith(("Stable.", "No change.")) and "FINDINGS" not in t for t in texts)
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert labels.study_id.nunique() == meta.study_id.nunique() - 1  # one study without a row
    assert labels[cxr.CHEXPERT_LABELS].isna().all(axis=1).sum() == 1  # one row with all 14 blank
    values = set(labels[cxr.CHEXPERT_LABELS].to_numpy().ravel().tolist())
    assert {1.0, 0.0, -1.0} <= values and any(np.isnan(v) for v in values)


def test_cxr_labels_follow_reports_and_truth(worlds: dict[str, Path]) -> None:
    root = worlds["cxr"]
    truth = _read(root / "demo_truth" / "cxr_findings.csv").drop_duplicates("study_id").set_index("study_id")
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype={"study_id": str}).set_index("study_id")
    flags = {"Cardiomegaly": ["cardiomegaly"], "Pleural Effusion": ["effusion_left", "effusion_right"],
             "Consolidation": ["consolidation"], "Pneumothorax": ["pneumothorax_left", "pneumothorax_right"],
             "Lung Lesion": ["nodule"]}  # fmt: skip
    for study_id, row in truth.iterrows():
        text = (root / "files" / f"p{row.subject_id[:2]}" / f"p{row.subject_id}" / f"s{study_id}.txt").read_text().lower()
        for name, cols in flags.items():
            present = any(row[c] == "1" for c in cols)
            if present:
                assert any(k in text for k in CXR_KEYWORDS[name]), (study_id, name)
            if study_id in labels.index and labels.loc[study_id, name] == 1.0:
                assert present
    test = _read(root / "mimic-cxr-2.1.0-test-set-labeled.csv").set_index("study_id")
    for study_id, row in test.iterrows():
        for name, cols in flags.items():
            assert row[name] == ("1.0" if any(truth.loc[study_id, c] == "1" for c in cols) else "0.0")


def test_cxr_report_generator_states_every_finding() -> None:
    for i in range(300):
        rng = rng_for(7, i)
        f = cxr.sample_findings(rng)
        text, labels = cxr.report_text(f, rng, str(rng.choice(cxr.STYLES)))
        for name in f.present():
            assert labels[name] == (-1.0 if name in f.hedged else 1.0)
            assert any(k in text.lower() for k in CXR_KEYWORDS[name])
        assert ("No Finding" in labels) == (not f.present())


def _box_mean(img: np.ndarray, u: tuple[float, float], v: tuple[float, float]) -> float:
    h, w = img.shape
    return float(img[int(v[0] * h) : int(v[1] * h), int(u[0] * w) : int(u[1] * w)].mean())


def _high_pass(img: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(img - gaussian_blur(img, 1.5))[mask].mean())


@pytest.mark.parametrize("seed", range(4))
def test_cxr_findings_are_visible_in_pixels(seed: int) -> None:
    def draw(f: cxr.CxrFindings) -> tuple[np.ndarray, dict, dict]:
        img, truth, masks = cxr.draw_frontal(f, 160, 136, "PA", rng_for(seed, 0))
        return img.astype(np.float32), truth, masks

    def left_minus_right_base(img: np.ndarray) -> float:
        return _box_mean(img, (0.72, 0.8), (0.64, 0.72)) - _box_mean(img, (0.2, 0.28), (0.64, 0.72))

    normal, truth_n, _ = draw(cxr.CxrFindings())
    effusion, _, _ = draw(cxr.CxrFindings(effusion="left", effusion_size="moderate"))  # patient left = image right
    assert left_minus_right_base(effusion) > left_minus_right_base(normal) + 25
    _, truth_c, _ = draw(cxr.CxrFindings(cardiomegaly=True))
    assert truth_c["ctr"] > 0.55 > 0.5 > truth_n["ctr"]
    ptx, _, masks = draw(cxr.CxrFindings(pneumothorax="right", pneumothorax_size="moderate"))
    m = masks["pneumothorax"] > 0
    assert m[:, : 136 // 2].sum() > 0.9 * m.sum() > 0  # patient right = image left
    m = gaussian_blur(m.astype(np.float32), 1.5) > 0.99  # away from the pleural line
    assert _high_pass(ptx, m) < 0.85 * _high_pass(normal, m) and ptx[m].mean() < normal[m].mean() - 15
    cons, truth_o, masks = draw(cxr.CxrFindings(consolidation="lower_right"))
    m = masks["consolidation"] > 0
    assert cons[m].mean() > normal[m].mean() + 30 and truth_o["consolidation_x1"] <= 136 // 2 + 10
    nod, truth_d, _ = draw(cxr.CxrFindings(nodule="upper_left", nodule_mm=10))
    yy, xx = np.mgrid[:160, :136] + 0.5
    disk = np.hypot(xx - truth_d["nodule_x"], yy - truth_d["nodule_y"]) < truth_d["nodule_r"] * 0.7
    assert 0.03 * 136 <= truth_d["nodule_r"] <= 0.05 * 136 and truth_d["nodule_x"] > 136 / 2
    assert nod[disk].mean() > normal[disk].mean() + 30


# ---------------------------------------------------------------------------------------------- CT-RATE


def _volume_path(root: Path, split: str, name: str) -> Path:
    return root / split / name.rsplit("_", 2)[0] / name.rsplit("_", 1)[0] / name


def test_ct_layout_and_csv_schemas(worlds: dict[str, Path]) -> None:
    root = worlds["ct"]
    for split, word in (("train", "train"), ("valid", "validation")):
        reports = _read(root / "radiology_text_reports" / f"{word}_reports.csv")
        labels = pd.read_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv")
        meta = _read(root / "metadata" / f"{word}_metadata.csv")
        assert list(reports.columns) == ct.REPORT_COLUMNS and list(meta.columns) == ct.METADATA_COLUMNS
        assert list(labels.columns) == ["VolumeName", *ct.CT_RATE_LABELS] and len(ct.METADATA_COLUMNS) == 44
        assert list(reports.VolumeName) == list(labels.VolumeName) == list(meta.VolumeName)
        assert reports.VolumeName.str.fullmatch(rf"{split}_\d+_[a-z]_\d+\.nii\.gz").all()
        assert set(labels[ct.CT_RATE_LABELS].to_numpy().ravel()) <= {0, 1}
        assert (labels[[c for c in ct.CT_RATE_LABELS if c not in ct.CT_FINDINGS]] == 0).all().all()
        for name in reports.VolumeName:
            assert _volume_path(root, split, name).is_file()
            assert (root / "anatomy_masks" / split / name).is_file()
        scans = reports.assign(scan=reports.VolumeName.str.rsplit("_", n=1).str[0]).groupby("scan")
        assert (scans[ct.REPORT_COLUMNS[1:]].nunique() == 1).all().all()  # reconstructions repeat the report
        for r in meta.itertuples():
            assert len(ast.literal_eval(r.XYSpacing)) == 2 and len(ast.literal_eval(r.ImagePositionPatient)) == 3
            assert len(ast.literal_eval(r.ImageOrientationPatient)) == 6 and r.RescaleSlope == "1"
            assert r.RescaleIntercept == ("-8192" if r.Manufacturer == "Siemens Healthineers" else "-1024")
            assert re.fullmatch(r"(\d{3}Y)?", r.PatientAge) and re.fullmatch(r"20\d{6}", r.StudyDate)
    train_reports = _read(root / "radiology_text_reports" / "train_reports.csv")
    assert (train_reports.ClinicalInformation_EN == "Not given.").any()
    assert (train_reports.Findings_EN == "").any() and (train_reports.Impressions_EN == "").any()
    names = set(train_reports.VolumeName)
    assert {"train_3_a_10.nii.gz", "train_2_a_1.nii.gz", "train_2_b_1.nii.gz", "train_1_a_2.nii.gz"} <= names
    meta = _read(root / "metadata" / "train_metadata.csv")
    assert meta.ConvolutionKernel.str.startswith("['").any() and (meta.RescaleIntercept == "-1024").any()
    assert json.loads((root / "anatomy_masks" / "labels.json").read_text()) == {str(k): v for k, v in ct.ANATOMY_LABELS.items()}
    assert list(_read(root / "demo_truth" / "ct_findings.csv").columns) == ct.TRUTH_COLUMNS


def test_ct_v1_and_v2_volumes_give_plausible_hu(worlds: dict[str, Path]) -> None:
    root = worlds["ct"]
    for split, word in (("train", "train"), ("valid", "validation")):
        meta = _read(root / "metadata" / f"{word}_metadata.csv").set_index("VolumeName")
        for name, r in meta.iterrows():
            img = sitk.ReadImage(str(_volume_path(root, split, name)))
            stored = sitk.GetArrayFromImage(img)
            assert img.GetSpacing() == (1.0, 1.0, 1.0) and img.GetOrigin() == (0.0, 0.0, 0.0)
            assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            assert stored.dtype in (np.int16, np.uint16) and stored.min() >= 0
            assert stored.shape == (int(r.NumberofSlices), int(r.Rows), int(r.Columns))
            hu = stored.astype(np.float32) * float(r.RescaleSlope) + float(r.RescaleIntercept)
            mask_img = sitk.ReadImage(str(root / "anatomy_masks" / split / name))
            mask = sitk.GetArrayFromImage(mask_img)
            assert mask.dtype == np.uint8 and mask.shape == stored.shape
            assert (mask_img.GetSpacing(), mask_img.GetOrigin(), mask_img.GetDirection()) == (
                img.GetSpacing(), img.GetOrigin(), img.GetDirection())  # fmt: skip
            assert set(np.unique(mask)) <= {0, *ct.ANATOMY_LABELS} and {10, 11, 12, 13, 14, 51, 52} <= set(np.unique(mask))
            lung = (mask >= 10) & (mask <= 14)
            assert -1100 <= np.median(hu[lung]) <= -500
            fixed = root / f"{split}_fixed" / _volume_path(root, split, name).relative_to(root / split)
            if fixed.is_file():
                v2 = sitk.ReadImage(str(fixed))
                xy = ast.literal_eval(r.XYSpacing)
                assert v2.GetSpacing() == pytest.approx((xy[0], xy[1], float(r.ZSpacing)))
                assert v2.GetOrigin() == pytest.approx(ast.literal_eval(r.ImagePositionPatient), abs=1e-3)
                v2_hu = sitk.GetArrayFromImage(v2)
                assert v2_hu.dtype == np.int16 and np.array_equal(v2_hu, hu.astype(np.int16))
    assert len(list(root.glob("*_fixed/*/*/*.nii.gz"))) >= 3
    assert any(_read(root / "metadata" / "train_metadata.csv").RescaleIntercept == "-8192")


def test_ct_labels_follow_reports(worlds: dict[str, Path]) -> None:
    root = worlds["ct"]
    truth = _read(root / "demo_truth" / "ct_findings.csv").set_index("VolumeName")
    for split, word in (("train", "train"), ("valid", "validation")):
        reports = _read(root / "radiology_text_reports" / f"{word}_reports.csv").set_index("VolumeName")
        labels = pd.read_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv").set_index("VolumeName")
        for name, row in labels.iterrows():
            text = (reports.loc[name, "Findings_EN"] + " " + reports.loc[name, "Impressions_EN"]).lower()
            for finding in ct.CT_FINDINGS:
                assert row[finding] == int(truth.loc[name, finding])
                if row[finding]:
                    assert any(k in text for k in CT_KEYWORDS[finding]), (name, finding)
    for i in range(200):
        rng = rng_for(3, i)
        f = ct.sample_findings(rng)
        f.hernia = bool(rng_for(4, i).random() < 0.25)
        findings, impression = ct.compose_report(f, rng)
        assert len(f.labels()) == len(ct.CT_FINDINGS) == 7
        for finding, flag in f.labels().items():
            if flag:
                assert any(k in findings.lower() for k in CT_KEYWORDS[finding])
                assert any(k in impression.lower() for k in CT_KEYWORDS[finding])


def test_ct_hernia_is_drawn_from_its_own_stream(worlds: dict[str, Path]) -> None:
    root = worlds["ct"]
    scans = ct.plan_scans(demo.SIZES["tiny"].ct_patients, 0)
    for scan in scans:  # the other findings do not depend on the hernia draw
        redrawn = ct.sample_findings(rng_for(0, ct._SCAN_STREAM, *scan.stream))
        redrawn.hernia = scan.findings.hernia
        assert scan.findings == redrawn
    hernia = {s.name for s in scans if s.findings.hernia}
    assert hernia  # the tiny world has at least one, so every fVLM anatomy has an abnormal scan
    labels = pd.concat([pd.read_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv")
                        for split in ("train", "valid")])  # fmt: skip
    flagged = set(labels[labels["Hiatal hernia"] == 1].VolumeName.str.rsplit("_", n=1).str[0])
    assert flagged == hernia
    counts = {}
    for path in (root / "anatomy_masks").glob("*/*.nii.gz"):
        eso = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 15
        counts[path.name.rsplit("_", 1)[0]] = (int(eso.sum()), int(eso.sum(axis=(1, 2)).max()))
    normal = [c for scan, c in counts.items() if scan not in hernia]
    for scan in hernia:  # the hernia sac is labelled esophagus: a wide bulge above the diaphragm
        assert counts[scan][0] > 1.5 * np.median([c[0] for c in normal])
        assert counts[scan][1] > 3 * max(c[1] for c in normal)


def _anatomies(names: list[str] | set[str]) -> set[str]:
    return {CT_ANATOMY[n] for n in names}


def test_ct_anatomy_report_files(worlds: dict[str, Path]) -> None:
    """fVLM's desc_info.json / conc_info.json: {scan: {anatomy: sentences}} taken from the report row."""
    root = worlds["ct"]
    desc = json.loads((root / "desc_info.json").read_text())
    conc = json.loads((root / "conc_info.json").read_text())
    truth = _read(root / "demo_truth" / "ct_findings.csv")
    reports = pd.concat([_read(root / "radiology_text_reports" / f"{w}_reports.csv") for w in ("train", "validation")])
    reports = reports.assign(scan=reports.VolumeName.str.rsplit("_", n=1).str[0]).drop_duplicates("scan").set_index("scan")
    assert set(desc) <= set(reports.index) and set(conc) <= set(reports.index)
    assert {s.split("_")[0] for s in desc} == {"train", "valid"}
    for table, column in ((desc, "Findings_EN"), (conc, "Impressions_EN")):
        for scan, organs in table.items():
            assert organs and set(organs) <= set(ct.FVLM_ANATOMIES), (scan, organs)
            assert all(isinstance(t, str) and t and "  " not in t for t in organs.values())
            cell = reports.loc[scan, column]
            for text in organs.values():  # the anatomy's sentences, in report order
                pos = 0
                for sentence in re.findall(r"[^.]+\.(?= |$)", text):
                    pos = cell.find(sentence.strip(), pos)
                    assert pos >= 0, (scan, sentence)
        assert set(table) <= {s for s in reports.index if reports.loc[s, column]}  # an empty cell has no entry
    assert any("esophagus" in organs for organs in desc.values())  # "No hiatal hernia." is an esophagus sentence
    for scan, rows in truth.assign(scan=truth.VolumeName.str.rsplit("_", n=1).str[0]).groupby("scan"):
        present = [name for name in ct.CT_FINDINGS if rows[name].iloc[0] == "1"]
        if not reports.loc[scan, "Impressions_EN"]:  # the emptied-impression trap: nothing to decompose
            assert scan not in conc
            continue
        assert set(conc.get(scan, {})) == _anatomies(present), (scan, present)  # normal impressions: no entry
    assert any(conc.values())


def test_ct_anatomy_report_generator() -> None:
    keywords = {"lung": ("lung", "pleural", "emphysema", "nodule", "consolidation", "atelectasis", "opacity", "fibrotic",
                         "mosaic", "peribronchial", "bronchiectasis", "septal"),
                "heart": ("heart", "cardiomegaly", "pericardial", "coronary"), "esophagus": ("hiatal",),
                "aorta": ("aorta", "aortic", "arterial"),
                "": ("trachea", "mediastin", "lymphadenopathy", "liver", "abdominal", "bone", "bony", "medical material", "pathology",
                     "normal chest")}  # fmt: skip
    for i in range(300):
        f = ct.sample_findings(rng_for(5, i))
        f.hernia = i % 3 == 0
        row, desc, conc = ct.anatomy_report(f, rng_for(6, i), 6.0)
        assert row == ct.report_row(f, rng_for(6, i), 6.0)
        findings, impression = ct.compose_sentences(f, rng_for(6, i))
        assert (row["Findings_EN"], row["Impressions_EN"]) == ct.compose_report(f, rng_for(6, i))
        assert row["Findings_EN"] == " ".join(s for s, _ in findings)
        assert (desc, conc) == (ct.anatomy_texts(findings), ct.anatomy_texts(impression))
        for sentence, anatomy in findings + impression:
            assert any(k in sentence.lower() for k in keywords[anatomy]), (sentence, anatomy)
        present = [name for name, flag in f.labels().items() if flag]
        assert set(conc) == _anatomies(present) and set(desc) <= set(ct.FVLM_ANATOMIES)
        for name in present:
            assert any(k in conc[CT_ANATOMY[name]].lower() for k in CT_KEYWORDS[name]), (name, conc)
            assert any(k in desc[CT_ANATOMY[name]].lower() for k in CT_KEYWORDS[name]), (name, desc)


def test_ct_findings_are_visible_in_hu() -> None:
    def scene(f: ct.CtFindings) -> tuple[np.ndarray, np.ndarray, dict]:
        return ct.render_scene(f, 40, (4.5, 6.0), rng_for(1, 2))

    hu0, lab0, _ = scene(ct.CtFindings())
    lung0 = (lab0 >= 10) & (lab0 <= 14)
    _, lab, _ = scene(ct.CtFindings(cardiomegaly=True))
    assert (lab == 51).sum() > 1.6 * (lab0 == 51).sum()
    hu, lab, _ = scene(ct.CtFindings(effusion="right", effusion_size="moderate"))
    right_lower = lab == 14
    assert (hu[right_lower] > -200).mean() > 0.2 > (hu0[lab0 == 14] > -200).mean()
    hu, lab, _ = scene(ct.CtFindings(emphysema=True))
    assert np.median(hu[(lab >= 10) & (lab <= 14)]) < np.median(hu0[lung0]) - 60
    hu, lab, _ = scene(ct.CtFindings(consolidation="left_lower"))
    assert np.mean(hu[lab == 11]) > np.mean(hu0[lab0 == 11]) + 200
    hu, lab, truth = scene(ct.CtFindings(nodule="right_upper", nodule_mm=22))
    z, y, x = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    dist = np.sqrt(((z - truth["nodule_z"]) * 6.0) ** 2 + (((y - truth["nodule_y"]) ** 2 + (x - truth["nodule_x"]) ** 2) * 4.5**2))
    core = dist < 0.6 * truth["nodule_radius_mm"]
    assert lab[truth["nodule_z"], truth["nodule_y"], truth["nodule_x"]] == 12
    assert hu[core].mean() > -150 and hu0[core].mean() < -500
    hu, lab, truth = scene(ct.CtFindings(calcification=True))
    assert truth["calcified_plaques"] >= 5 and (hu[lab == 52] > 400).sum() >= 20 > (hu0[lab0 == 52] > 400).sum()
    hu, lab, _ = scene(ct.CtFindings(hernia=True))
    eso, eso0 = lab == 15, lab0 == 15
    assert eso.sum() > 1.6 * eso0.sum() and (eso & ~eso0).any(axis=(1, 2)).sum() >= 4  # several 6 mm slices
    assert (hu[eso] < -500).sum() >= 20 and (hu0[eso0] < -500).sum() == 0  # air pocket
    assert ((hu[eso] > 0) & (hu[eso] < 40)).sum() >= 50  # fluid / soft tissue
    changed = lab != lab0
    assert (lab[changed] == 15).all() and not np.isin(lab0[changed], [10, 11, 12, 13, 14, 51, 52]).any()
    assert (eso & ~eso0)[: round(0.1 * 40)].sum() == 0 and (eso & ~eso0)[round(0.35 * 40) :].sum() == 0  # above the diaphragm


# ---------------------------------------------------------------------------------------------- determinism, cache, corpus


def test_same_seed_same_files_other_seed_differs(tmp_path: Path, worlds: dict[str, Path]) -> None:
    again_cxr = demo.write_cxr_demo(tmp_path / "cxr", size="tiny", seed=0)
    again_ct = demo.write_ct_demo(tmp_path / "ct", size="tiny", seed=0)
    for first, second in ((worlds["cxr"], again_cxr), (worlds["ct"], again_ct)):
        a, b = _files(first), _files(second)
        assert a.keys() == b.keys()
        for rel in a:
            if rel.endswith((".csv", ".gz", ".txt", ".json", "IMAGE_FILENAMES", ".png")) and not rel.endswith(".nii.gz"):
                assert a[rel] == b[rel], rel
    for rel in _files(worlds["cxr"]):
        if rel.endswith(".jpg"):
            assert np.array_equal(np.asarray(Image.open(worlds["cxr"] / rel)), np.asarray(Image.open(again_cxr / rel)))
    for path in (worlds["ct"] / "train").rglob("*.nii.gz"):
        other = again_ct / path.relative_to(worlds["ct"])
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(sitk.ReadImage(str(other))))
    meta = gzip.decompress((worlds["cxr"] / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes())
    other_seed = demo.write_cxr_demo(tmp_path / "cxr1", size="tiny", seed=1)
    assert gzip.decompress((other_seed / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()) != meta
    ct1 = demo.write_ct_demo(tmp_path / "ct1", size="tiny", seed=1)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(_volume_path(ct1, "train", "train_1_a_1.nii.gz"))))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(_volume_path(worlds["ct"], "train", "train_1_a_1.nii.gz"))))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_ensure_demo_generates_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    assert demo.cache_dir() == tmp_path / "cache"
    root = demo.ensure_demo("cxr", size="tiny", seed=0)
    assert root == tmp_path / "cache" / "demo" / f"cxr-tiny-s0-v{demo.GEN_VERSION}"
    assert (root / "mimic-cxr-2.0.0-metadata.csv.gz").is_file()
    stamp = (root / "IMAGE_FILENAMES").stat().st_mtime_ns
    start = time.perf_counter()
    assert demo.ensure_demo("cxr", size="tiny", seed=0) == root
    assert time.perf_counter() - start < 0.1 and (root / "IMAGE_FILENAMES").stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary folder left behind
    ct_root = demo.ensure_demo("ct", size="tiny", seed=0)
    assert (ct_root / "train").is_dir() and (ct_root / "metadata" / "validation_metadata.csv").is_file()
    with pytest.raises(ValueError, match="tiny"):
        demo.ensure_demo("cxr", size="huge")
    with pytest.raises(ValueError, match="cxr"):
        demo.ensure_demo("mri")
    monkeypatch.delenv("MEDVLP_CACHE")
    assert demo.cache_dir() == Path.home() / ".cache" / "medvlp"


@pytest.fixture(scope="module")
def corpus_vocab() -> set[str]:
    corpus = demo.report_corpus(seed=0, n=3000)
    assert len(corpus) > 3800 and corpus[:50] == demo.report_corpus(seed=0, n=50)[:50]
    assert sum(t.startswith("This MRI study shows: ") for t in corpus) > 800
    assert any("FINAL REPORT" in t for t in corpus) and any("Not given." in t or "slice thickness" in t for t in corpus)
    return {w for text in corpus for w in re.findall(r"[a-z0-9]+", text.lower())}


@pytest.mark.parametrize("prompt_file", ["cxr.yaml", "ct_rate.yaml", "ct_rate_impressions.yaml", "nih14.yaml", "brain_mri.yaml"])
def test_report_corpus_covers_every_prompt_word(prompt_file: str, corpus_vocab: set[str]) -> None:
    vocab = corpus_vocab
    prompts = yaml.safe_load((PROMPTS / prompt_file).read_text())
    from medvlp.datamodules.nih14 import LABELS as NIH_LABELS

    expected = {"cxr.yaml": cxr.CHEXPERT_LABELS, "ct_rate.yaml": ct.CT_RATE_LABELS,
                "ct_rate_impressions.yaml": ct.CT_RATE_LABELS, "nih14.yaml": NIH_LABELS,
                "brain_mri.yaml": demo.BRAIN_FINDINGS}[prompt_file]
    assert sorted(prompts) == sorted(expected)
    for label, sides in prompts.items():
        assert set(sides) == {"positive", "negative"} and all(2 <= len(sides[s]) <= 6 for s in sides)
        for phrase in sides["positive"] + sides["negative"]:
            missing = [w for w in re.findall(r"[a-z0-9]+", phrase.lower()) if w not in vocab]
            assert not missing, (label, phrase, missing)


def test_format_examples_and_brain_world_are_readable_by_their_datamodules(worlds: dict[str, Path]) -> None:
    """``medvlp demo --kind all`` also writes the brain-MRI world and the format examples of §9-13."""
    from medvlp.cli import _parser
    from medvlp.datamodules.base import DataError
    from medvlp.registry import DATAMODULES

    demo_action = next(a for a in _parser()._subparsers._group_actions[0].choices["demo"]._actions if a.dest == "kind")
    assert sorted(demo_action.choices) == sorted(("all", *demo.KINDS))
    for kind in ("brain_mri", *demo.FORMAT_KINDS):
        root = worlds[kind]
        assert json.loads((root / "demo_truth" / "info.json").read_text())["counts"]
        cls = DATAMODULES.get(kind)
        lists = {"train_lists": ["ADNI-train", "OASIS2-train"]} if kind == "medblip_mri" else {}  # no NACC list in it
        cfg = cls.Config(root=str(root), **lists)
        cls.check_root(cfg)
        dm = cls(cfg)
        found = 0
        for split in ("train", "val", "test"):
            try:
                found += len(dm.records(split))
            except DataError:
                pass
        assert found > 0, kind
