"""The synthetic Alzheimer's world (demo/adni.py) read by the MedBLIP list datamodule."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medvlp.datamodules import demo
from medvlp.datamodules.demo import adni
from medvlp.datamodules.demo._util import rng_for
from medvlp.datamodules.medblip_mri import CLASSES, SYNONYMS, UNMAPPED, MedBLIPMRIConfig, MedBLIPMRIDataModule

TRAIN = ["ADNI-train", "NACC-train", "OASIS2-train"]
TEST = ["ADNI-test", "NACC-test", "AIBL-test", "MIRIAD-test"]
CENTRE = (slice(10, 22), slice(10, 22), slice(10, 22))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adni") / "tiny"
    adni.write_dataset(root, demo.SIZES["tiny"].adni_subjects, 0)
    return root


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """Large enough for class statistics (10 rows per class in ADNI-test), still a few seconds."""
    root = tmp_path_factory.mktemp("adni") / "medium"
    adni.write_dataset(root, 120, 0)
    return root


def make(root: Path, **kw) -> MedBLIPMRIDataModule:
    kw = {"train_lists": TRAIN, "test_lists": TEST, "size": 32, "val_fraction": 0.0, **kw}
    return MedBLIPMRIDataModule(MedBLIPMRIConfig(root=str(root), **kw))


def lists(root: Path) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for path in sorted((root / "local_data").glob("*.csv")):
        out[path.stem] = [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


def dark_fraction(volume) -> float:
    """Fraction of CSF-dark voxels in the centre of a loaded [1, 32, 32, 32] volume (the ventricles)."""
    return float((volume[0][CENTRE] < 0.2).float().mean())


def nearest_mean_accuracy(train: list[tuple[int, float]], test: list[tuple[int, float]]) -> float:
    means = {c: np.mean([x for y, x in train if y == c]) for c in {y for y, _ in train}}
    return float(np.mean([min(means, key=lambda c: abs(means[c] - x)) == y for y, x in test]))


def test_world_is_registered(tmp_path, monkeypatch):
    assert "adni" in demo.KINDS and demo.SIZES["default"].adni_subjects >= 300
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path))
    root = demo.ensure_demo("adni", size="tiny")
    assert root.name.startswith("adni-tiny-s0-")
    assert {p.stem for p in (root / "local_data").glob("*.csv")} == set(TRAIN + TEST)
    info = json.loads((root / "demo_truth" / "info.json").read_text())
    assert info["world"] == "adni" and info["counts"]["lists"] == 7
    assert sum(v["rows"] for v in info["lists"].values()) == info["counts"]["volumes"]


def test_demo_config_matches_the_datamodule():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "data" / "demo_medblip.yaml").data
    assert cfg.name == "medblip_mri" and cfg.root == "demo" and cfg.size == 32
    assert list(cfg.train_lists) == TRAIN and list(cfg.test_lists) == ["ADNI-test"]
    MedBLIPMRIConfig(**{**OmegaConf.to_container(cfg), "root": "/nonexistent"})  # every key is a config field


def test_lists_parse_and_every_label_maps(tiny):
    rows = lists(tiny)
    assert set(rows) == set(TRAIN + TEST)
    for name, entries in rows.items():
        assert entries and all(len(e) == 2 for e in entries), name  # tab-separated, exactly two fields
        assert all(not Path(image).is_absolute() and (tiny / image).is_file() for image, _ in entries)
    texts = [text for entries in rows.values() for _, text in entries]
    words = {text.split("The diagnosis is ", 1)[1].rstrip(".") for text in texts if "The diagnosis is " in text}
    assert {w.lower() for w in words} == set(SYNONYMS) | UNMAPPED  # every accepted spelling, and Converted
    assert {"Control", "control"} <= words
    assert any("The diagnosis is " not in text for name in TRAIN for _, text in rows[name])

    dm = make(tiny)
    train, test = dm.records("train"), dm.records("test")
    assert len(train) == sum(len(rows[n]) for n in TRAIN) and len(test) == sum(len(rows[n]) for n in TEST)
    for r in train + test:
        if r.meta["answer"] in CLASSES:
            assert r.labels.sum() == 1 and r.labels[CLASSES.index(r.meta["answer"])] == 1
        else:
            assert np.isnan(r.labels).all() and r.meta["answer"] in ("", "Converted") and r.meta["list"] in TRAIN
    assert dm.counts["unmapped_diagnosis"] >= 1 and dm.counts["no_diagnosis"] >= 1
    assert all(not np.isnan(r.labels).any() for r in test)
    # stored grids: non-cubic, one per cohort, int16 and float32; loaded: padded to 32^3 in [0, 1]
    shapes, types = {}, set()
    for name in rows:
        image = sitk.ReadImage(str(tiny / rows[name][0][0]))
        shapes[name.split("-")[0]] = sitk.GetArrayFromImage(image).shape
        types.add(image.GetPixelIDTypeAsString())
    assert all(len(set(s)) == 3 for s in shapes.values()) and len(set(shapes.values())) == 5
    assert types == {"16-bit signed integer", "32-bit float"}
    volume = dm.load_image(test[0], train=False)
    assert tuple(volume.shape) == (1, 32, 32, 32) and float(volume.min()) == 0 and 0.5 < float(volume.max()) <= 1  # resized


def test_test_lists_are_class_balanced(tiny, medium):
    for root, n in ((tiny, demo.SIZES["tiny"].adni_subjects), (medium, 120)):
        sizes = adni.per_class_sizes(n)
        dm = make(root)
        for name in TEST:
            labels = [r.meta["answer"] for r in dm.read_list(name)]
            classes = ["CN", "AD"] if name == "MIRIAD-test" else CLASSES
            assert sorted(set(labels)) == sorted(classes), name
            assert all(labels.count(c) == sizes[name] for c in classes), (name, labels)
    assert adni.per_class_sizes(demo.SIZES["default"].adni_subjects) == {
        "ADNI-test": 30, "NACC-test": 15, "AIBL-test": 15, "MIRIAD-test": 15}


def test_visits_of_a_subject_stay_together(medium):
    rows = lists(medium)
    subject_lists: dict[str, set[str]] = {}
    for name, entries in rows.items():
        for image, _ in entries:
            subject_lists.setdefault(image.split("/")[1].split("_MR")[0], set()).add(name)
    assert all(len(v) == 1 for v in subject_lists.values())  # one list per subject
    visits: dict[str, int] = {}
    for seed in range(3):
        dm = make(medium, val_fraction=0.3, split_seed=seed)
        split = {}
        for s in ("train", "val"):
            for r in dm.records(s):
                assert split.setdefault(r.meta["subject"], s) == s, r.meta["subject"]
                visits[r.meta["subject"]] = visits.get(r.meta["subject"], 0) + (seed == 0)
        assert set(split.values()) == {"train", "val"}
    assert any(re.fullmatch(r"\d{3}_S_\d{4}", s) and n >= 2 for s, n in visits.items())  # ADNI follow-ups
    assert any(s.startswith("OAS2_") and n >= 2 for s, n in visits.items())
    assert any(s.startswith("sub-NACC") for s in visits)


def test_same_seed_same_world(tiny, tmp_path):
    adni.write_dataset(tmp_path / "again", demo.SIZES["tiny"].adni_subjects, 0)
    adni.write_dataset(tmp_path / "other", demo.SIZES["tiny"].adni_subjects, 1)
    for path in sorted((tiny / "local_data").glob("*.csv")):
        assert (tmp_path / "again" / "local_data" / path.name).read_bytes() == path.read_bytes()
    assert (tmp_path / "again" / "demo_truth" / "vqa.csv").read_bytes() == (tiny / "demo_truth" / "vqa.csv").read_bytes()
    assert lists(tmp_path / "other") != lists(tiny)
    images = [image for entries in lists(tiny).values() for image, _ in entries]
    for image in images:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny / image)))
        assert np.array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again" / image))))
    first = lists(tmp_path / "other")["ADNI-train"][0][0]
    other = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "other" / first)))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny / images[0])))
    assert other.shape != ours.shape or not np.array_equal(other, ours)
    assert not np.array_equal(adni.render((26, 30, 28), 1.0, rng_for(0, 1)), adni.render((26, 30, 28), 1.0, rng_for(1, 1)))


def test_descriptions_hold_no_diagnosis_and_no_nan(medium):
    spellings = {w.lower() for w in SYNONYMS} | UNMAPPED
    dm = make(medium)
    missing = {"age": 0, "sex": 0, "education": 0, "mmse": 0}
    for r in dm.records("train") + dm.records("test"):
        d = r.meta["description"]
        assert d.strip() and "nan" not in d.lower() and "diagnos" not in d.lower() and "cdr" not in d.lower()
        assert not {w.lower() for w in re.findall(r"[A-Za-z]+", d)} & spellings, d
        missing["age"] += "-year-old" not in d
        missing["sex"] += not re.search(r"\b(male|female)\b", d)
        missing["education"] += "years of education" not in d
        missing["mmse"] += "MMSE score" not in d
        assert r.text.startswith(d.strip())
    assert all(missing.values())  # a few rows miss each field (MIRIAD has no education at all)


def test_mmse_follows_the_diagnosis_with_overlap():
    scans = [s for s in adni.plan_world(demo.SIZES["default"].adni_subjects, 0) if s.diagnosis and s.word != "Converted"]
    mmse = {c: [s.ehr["mmse"] for s in scans if s.diagnosis == c and s.ehr["mmse"] is not None] for c in CLASSES}
    for c, (lo, hi) in adni.MMSE_RANGE.items():
        assert lo <= min(mmse[c]) and max(mmse[c]) <= hi
    assert np.mean(mmse["CN"]) > np.mean(mmse["MCI"]) > np.mean(mmse["AD"])
    assert max(mmse["AD"]) >= min(mmse["MCI"]) and max(mmse["MCI"]) >= min(mmse["CN"])  # ranges overlap
    counts = {n: sum(s.list_name == n for s in adni.plan_world(demo.SIZES["default"].adni_subjects, 0)) for n in TRAIN}
    assert 350 <= counts["ADNI-train"] <= 450 and counts["NACC-train"] >= 100 and counts["OASIS2-train"] >= 60


def test_the_diagnosis_is_visible_and_not_a_global_cue(medium):
    dm = make(medium)
    feats = {"train": [], "test": []}
    for split in feats:
        for r in dm.records(split):
            if np.isnan(r.labels).any():
                continue
            v = dm.load_image(r, train=False)
            feats[split].append((int(np.argmax(r.labels)), dark_fraction(v), float(v.mean()), float((v > 0.05).float().mean())))
    train = feats["train"]
    means = [np.mean([f[1] for f in train if f[0] == c]) for c in range(3)]
    assert means[0] < means[1] < means[2]
    acc = {k: nearest_mean_accuracy([(f[0], f[k]) for f in train], [(f[0], f[k]) for f in feats["test"]]) for k in (1, 2, 3)}
    assert acc[1] >= 0.7, acc  # ventricles: far above chance (1/3)
    assert acc[2] < 0.6 and acc[3] < 0.6, acc  # mean intensity, head size: near chance


def test_vqa_truth_names_test_images(tiny):
    rows = lists(tiny)
    label = {image: text.rsplit("The diagnosis is ", 1)[1].rstrip(".") for n in TEST for image, text in rows[n]}
    with open(tiny / "demo_truth" / "vqa.csv", newline="", encoding="utf-8") as f:
        vqa = list(csv.DictReader(f))
    assert vqa and set(vqa[0]) == {"image", "question", "answer"}
    assert {r["image"] for r in vqa} == set(label)
    assert all((tiny / r["image"]).is_file() for r in vqa)
    for r in vqa:
        cls = SYNONYMS[label[r["image"]].lower()]
        if r["question"] == adni.QUESTION:
            assert r["answer"] == adni.ANSWERS[cls]
        elif r["question"] == "Is the subject demented?":
            assert r["answer"] == ("yes" if cls == "AD" else "no")
        else:
            assert r["question"] == "Are the ventricles enlarged?" and r["answer"] in ("yes", "no")
    enlarged = [r["answer"] for r in vqa if r["question"] == "Are the ventricles enlarged?"]
    assert {"yes", "no"} <= set(enlarged)


def test_ehr_corpus():
    texts = adni.ehr_corpus(seed=0, n=200)
    assert len(texts) >= 200 and all(isinstance(t, str) and t.strip() for t in texts)
    question = "Question: What will this subject be diagnosed with? Answer: "
    for answer in ("Not demented", "mild cognitive impairment (MCI)", "Dementia"):
        assert question + answer in texts and answer in texts
    joined = "\n".join(texts)
    for word in list(SYNONYMS) + list(UNMAPPED):
        assert re.search(rf"The diagnosis is {word}\.", joined, re.IGNORECASE), word
    assert "Is the subject demented?" in joined and "Are the ventricles enlarged?" in joined
    assert "nan" not in joined.lower().split() and "MMSE score" in joined
    assert adni.ehr_corpus(seed=0, n=200) == texts and adni.ehr_corpus(seed=1, n=200) != texts
