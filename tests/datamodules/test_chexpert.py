"""CheXpert datamodule on the synthetic fixture of specs/datasets.md §2.7 (every §2.8 trap)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from format_fixtures import chexpert_fixture_items, write_chexpert_fixture

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.chexpert import (
    COMPETITION,
    LABELS,
    CheXpertConfig,
    CheXpertDataModule,
    apply_uncertain,
    relative_path,
)
from medvlp.datamodules.demo.chexpert import CheXpertItem, write_chexpert
from medvlp.registry import DATAMODULES

SIZE = 32
NAN = np.nan


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The fixture in a folder that is *not* called CheXpert-v1.0-small (users rename it)."""
    return write_chexpert_fixture(tmp_path_factory.mktemp("chexpert") / "my_chexpert_copy")


def make(root, **kw) -> CheXpertDataModule:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("per_class", 3)
    kw.setdefault("val_size", 4)
    return CheXpertDataModule(CheXpertConfig(root=str(root), **kw))


def by_patient(records) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(r.meta["patient_id"], []).append(r)
    return out


def labels_of(dm, patient: str, split: str = "train"):
    return by_patient(dm.records(split))[patient][0].labels


def test_registered_contract_and_light_import():
    assert DATAMODULES.get("chexpert") is CheXpertDataModule
    assert CheXpertDataModule.Config is CheXpertConfig and CheXpertDataModule.modality == "2d"
    assert "train/patient00001/study1/view1_frontal.jpg" in CheXpertDataModule.EXPECTED_LAYOUT
    code = "import sys, medvlp.datamodules.chexpert; print(sorted(m for m in ('torch', 'pandas', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # check_root must stay cheap (base.py)


def test_check_root(root, tmp_path):
    t0 = time.perf_counter()
    CheXpertDataModule.check_root(CheXpertConfig(root=str(root)))
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(DataRootError, match="does not exist") as err:
        CheXpertDataModule.check_root(CheXpertConfig(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value) and "valid/patient64541/study1/view1_frontal.jpg" in str(err.value)
    with pytest.raises(DataRootError, match=r"has no train.csv \(but .*my_chexpert_copy has it"):
        CheXpertDataModule.check_root(CheXpertConfig(root=str(root.parent)))  # the parent folder given
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(root / "train.csv", broken / "train.csv")
    with pytest.raises(DataRootError, match="has no valid.csv"):
        CheXpertDataModule.check_root(CheXpertConfig(root=str(broken)))


def test_relative_path_any_prefix():
    tail = "train/patient00001/study1/view1_frontal.jpg"
    for p in (f"CheXpert-v1.0-small/{tail}", f"CheXpert-v1.0/{tail}", f"renamed/{tail}", f"/data/x/CheXpert-v1.0/{tail}", tail):
        assert relative_path(p) == tail
    assert relative_path("CheXpert-v1.0/valid/patient64541/study1/view2_lateral.jpg") == "valid/patient64541/study1/view2_lateral.jpg"
    assert relative_path("top/odd/layout.jpg") == "odd/layout.jpg"  # MGCA rule: strip the first component


def test_full_release_prefix(tmp_path):
    items = [it for it in chexpert_fixture_items() if it.patient in ("patient00001", "patient00019", "patient64543")]
    folder = write_chexpert(tmp_path / "chexpert_full_renamed", items, prefix="CheXpert-v1.0")
    assert (folder / "train.csv").read_text().splitlines()[1].startswith("CheXpert-v1.0/train/patient00001/")
    dm = make(folder, split_protocol="official", views=[], val_fraction=0.5)
    recs = dm.records("train") + dm.records("val")
    assert len(recs) == 3 and all(Path(r.image_path).is_file() for r in recs)


def train_and_val(dm):
    """The official protocol's train + val records (all of train.csv), by patient."""
    return sorted(dm.records("train") + dm.records("val"), key=lambda r: (r.meta["patient_id"], r.meta["path"]))


def test_official_protocol_validates_on_train_patients(root):
    dm = make(root, split_protocol="official")
    train, val, test = (dm.records(s) for s in ("train", "val", "test"))
    patients = [{r.meta["patient_id"] for r in recs} for recs in (train, val, test)]
    assert val and not patients[0] & patients[1]  # whole patients
    assert all(r.meta["path"].startswith("train/") for r in train + val)
    assert all(r.meta["path"].startswith("valid/") for r in test)  # valid.csv tests, never validates
    assert not {r.image_path for r in val} & {r.image_path for r in test}
    assert len({r.meta["patient_id"] for r in train_and_val(dm)}) * 0.1 == pytest.approx(len(patients[1]), abs=0.5)
    other = make(root, split_protocol="official", val_seed=1)
    assert {r.meta["patient_id"] for r in other.records("val")} != patients[1]
    with pytest.raises(DataError, match="data.val_fraction=0.99 .* leaves no training patient"):
        make(root, split_protocol="official", val_fraction=0.99).records("train")


def test_official_protocol_counts_views_and_meta(root):
    dm = make(root, split_protocol="official")
    train = train_and_val(dm)
    assert len(train) == 26  # 29 rows, 3 laterals
    assert all(r.meta["view"] == "Frontal" and Path(r.image_path).is_file() for r in train)
    assert len(train_and_val(make(root, split_protocol="official", views=[]))) == 29
    lateral = make(root, split_protocol="official", views=["Lateral"]).records("train")
    assert lateral and all(r.meta["view"] == "Lateral" for r in lateral)
    lateral = [r for r in train_and_val(make(root, split_protocol="official", views=[])) if r.meta["view"] == "Lateral"]
    assert [r.meta["patient_id"] for r in lateral] == ["patient00019", "patient00020", "patient00024"]
    assert all(r.meta["ap_pa"] == "" for r in lateral)  # blank for laterals
    p = by_patient(train)
    assert p["patient00023"][0].meta["ap_pa"] == "LL" and p["patient00026"][0].meta["ap_pa"] == "RL"
    assert p["patient00022"][0].meta["sex"] == "Unknown" and p["patient00022"][0].meta["age"] == "0"
    assert p["patient00025"][0].study_id == "patient00025/study2"
    assert all(r.text == "" and r.labels.dtype == np.float32 and r.labels.shape == (5,) for r in train)
    test = dm.records("test")
    assert [r.meta["patient_id"] for r in test] == ["patient64541", "patient64542", "patient64543", "patient64544"]
    assert dm.label_names == COMPETITION
    np.testing.assert_array_equal(by_patient(test)["patient64542"][0].labels, [0, 0, 0, 1, 1])


def test_apply_uncertain_hand_made_rows():
    names = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumonia", "Fracture"]
    raw = np.array([[-1, -1, -1, -1, -1, -1, NAN], [NAN, 1, 0, NAN, -1, 1, 0]], dtype=np.float32)
    np.testing.assert_array_equal(apply_uncertain(raw, names, "mgca"), [[1, 0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(apply_uncertain(raw, names, "zeros"), [[0, 0, 0, 0, 0, 0, NAN], [NAN, 1, 0, NAN, 0, 1, 0]])
    np.testing.assert_array_equal(apply_uncertain(raw, names, "ones"), [[1, 1, 1, 1, 1, 1, NAN], [NAN, 1, 0, NAN, 1, 1, 0]])
    ignored = apply_uncertain(raw, names, "ignore")
    assert np.isnan(ignored[0]).all()
    np.testing.assert_array_equal(ignored[1], [NAN, 1, 0, NAN, NAN, 1, 0])
    # the mix is per column: the same -1 in Edema-first order maps by name, not position
    np.testing.assert_array_equal(apply_uncertain(np.array([[-1, -1]]), ["Edema", "Cardiomegaly"], "mgca"), [[1, 0]])
    assert not np.shares_memory(apply_uncertain(raw, names, "zeros"), raw)


def test_uncertainty_policies_on_records(root):
    # patient00021: -1 in the 5 competition labels and Pneumonia, blank Fracture; patient00022: all blank
    expected = {"mgca": ([1, 0, 0, 1, 1], [0] * 5), "zeros": ([0] * 5, [NAN] * 5), "ones": ([1] * 5, [NAN] * 5),
                "ignore": ([NAN] * 5, [NAN] * 5)}  # fmt: skip
    for policy, (p21, p22) in expected.items():
        dm = make(root, split_protocol="official", uncertain=policy)
        np.testing.assert_array_equal(labels_of(dm, "patient00021"), p21, err_msg=policy)
        np.testing.assert_array_equal(labels_of(dm, "patient00022"), p22, err_msg=policy)
        np.testing.assert_array_equal(labels_of(dm, "patient64542", "test"), [0, 0, 0, 1, 1])  # valid: only 0/1
    every = make(root, split_protocol="official", labels="all")
    assert every.label_names == LABELS
    lab = dict(zip(LABELS, labels_of(every, "patient00021")))
    assert lab["Pneumonia"] == 0 and lab["Fracture"] == 0 and lab["No Finding"] == 0  # U-Zeros beyond the 5; blank -> 0
    lab = dict(zip(LABELS, labels_of(make(root, split_protocol="official", labels="all", uncertain="zeros"), "patient00024")))
    assert lab["Pleural Effusion"] == 0 and lab["Edema"] == 1 and lab["Support Devices"] == 1 and lab["Lung Opacity"] == 0
    assert np.isnan(lab["Fracture"]) and np.isnan(lab["No Finding"])
    chosen = make(root, split_protocol="official", labels=["Edema", "Pneumonia"])
    assert chosen.label_names == ["Edema", "Pneumonia"]
    np.testing.assert_array_equal(labels_of(chosen, "patient00021"), [1, 0])


def mgca_5x200(train_csv: Path, per_class: int) -> list[str]:
    """MGCA's mgca/preprocess/chexpert.py recipe, as written there (default dtypes)."""
    df = pd.read_csv(train_csv).fillna(0)
    df = df[df["Frontal/Lateral"] == "Frontal"]
    others = [n for n in LABELS if n != "No Finding"]
    out = []
    for c in COMPETITION:
        mask = (df[c] == 1) & (df[[o for o in others if o != c]] == 0).all(axis=1)
        out += list(df[mask].sample(n=per_class, random_state=0)["Path"])
    return out


def test_5x200_construction_and_csv(root, tmp_path, caplog):
    a, b = tmp_path / "a" / "chexpert_5x3.csv", tmp_path / "b.csv"
    dm = make(root, csv_5x200=str(a))
    recs = dm.records("5x200")
    assert a.is_file() and len(recs) == 15
    paths = pd.read_csv(a)["Path"].tolist()
    assert paths == mgca_5x200(root / "train.csv", 3)
    assert [r.meta["class"] for r in recs] == [c for c in COMPETITION for _ in range(3)]
    for r in recs:
        np.testing.assert_array_equal(r.labels, np.eye(5, dtype=np.float32)[COMPETITION.index(r.meta["class"])])
        assert r.meta["view"] == "Frontal" and Path(r.image_path).is_file()
    pids = {r.meta["patient_id"] for r in recs}
    assert pids <= {f"patient{i:05d}" for i in range(1, 17)}  # never 17 (-1 elsewhere), 18 (two), 20 (lateral)
    assert len(pids & {"patient00010", "patient00011", "patient00012", "patient00013"}) == 3  # 3 of the 4 Edema rows
    make(root, csv_5x200=str(b)).records("5x200")
    assert a.read_bytes() == b.read_bytes()  # a second build writes the identical file
    first = a.read_text().splitlines()
    assert first[0].startswith(",Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding")  # MGCA's layout: index column first
    with caplog.at_level(logging.INFO, logger="medvlp.datamodules.chexpert"):
        again = make(root, csv_5x200=str(a), labels="all").records("5x200")
    assert "reading the 5x3 zero-shot set" in caplog.text
    row = dict(zip(LABELS, again[3].labels))
    assert again[3].meta["class"] == "Cardiomegaly" and row["Cardiomegaly"] == 1
    assert sum(v for v in row.values()) == 1  # every other finding 0 by construction, No Finding 0 here


def test_5x200_default_location_and_errors(root, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    dm = make(root)
    dm.records("5x200")
    cached = list((tmp_path / "cache" / "chexpert").glob("chexpert_5x3_*.csv"))
    assert len(cached) == 1 and dm.csv_path_5x200() == cached[0]
    copy = tmp_path / "root_with_csv"
    shutil.copytree(root, copy)
    shutil.copy(cached[0], copy / "chexpert_5x3.csv")
    assert make(copy).csv_path_5x200() == copy / "chexpert_5x3.csv"  # a file at the root wins (e.g. MGCA's own)
    with pytest.raises(DataError, match="data.per_class=2 needs 2"):
        make(root, per_class=2, csv_5x200=str(cached[0])).records("5x200")
    with pytest.raises(DataError, match=r"only 3 frontal rows with Atelectasis = 1.*needs 4"):
        make(root, per_class=4, csv_5x200=str(tmp_path / "x.csv")).records("5x200")
    stray = tmp_path / "stray.csv"
    stray.write_text(cached[0].read_text().replace("patient00001/", "patient09999/"))
    with pytest.raises(DataError, match="not in .*train.csv"):
        make(root, csv_5x200=str(stray)).records("5x200")
    with pytest.raises(DataError, match="needs the labels"):
        make(root, labels=["Edema"], csv_5x200=str(cached[0])).records("5x200")


def test_mgca_protocol_split(root, tmp_path):
    dm = make(root, views=[], csv_5x200=str(tmp_path / "5x3.csv"))  # views=[]: compare whole rows
    held = {r.meta["path"] for r in dm.records("5x200")}
    train, val = dm.records("train"), dm.records("val")
    rows = pd.read_csv(root / "train.csv")["Path"].map(relative_path).tolist()
    pool = [i for i, p in enumerate(rows) if p not in held]
    assert len(pool) == 14
    picked = np.random.RandomState(0).choice(len(pool), size=4, replace=False)  # MGCA: seed(0) + np.random.choice
    assert [r.meta["path"] for r in val] == [rows[pool[i]] for i in picked]
    assert [r.meta["path"] for r in train] == [rows[i] for i in pool if i not in {pool[j] for j in picked}]
    assert not ({r.meta["path"] for r in train} & {r.meta["path"] for r in val})  # disjoint (MGCA's are not)
    assert not ({r.meta["path"] for r in train + val} & held)
    assert [r.meta["patient_id"] for r in dm.records("test")][:2] == ["patient64541", "patient64541"]  # valid.csv
    frontal = make(root, csv_5x200=str(tmp_path / "5x3.csv"))
    assert {r.meta["path"] for r in frontal.records("train")} == {r.meta["path"] for r in train if r.meta["view"] == "Frontal"}
    other_seed = make(root, views=[], val_seed=1, csv_5x200=str(tmp_path / "5x3.csv")).records("val")
    assert [r.meta["path"] for r in other_seed] != [r.meta["path"] for r in val]
    with pytest.raises(DataError, match="val_size=14 leaves no training rows"):
        make(root, val_size=14, csv_5x200=str(tmp_path / "5x3.csv")).records("train")


def test_load_image_geometry(root):
    dm = make(root, split_protocol="official", augment=False)
    rec = dm.records("train")[0]
    h, w = np.asarray(chexpert_fixture_items()[0].image).shape
    assert h > w  # portrait: padded left and right
    img = dm.load_image(rec, train=False)
    assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32
    assert torch.all(img[:, :, 0] == -1) and (img[:, 0, :] > -1).any()
    assert torch.equal(img, dm.load_image(rec, train=True))  # augment off


def test_broken_inputs(root, tmp_path, tiny_tokenizer):
    copy = tmp_path / "c"
    shutil.copytree(root, copy)
    dm = make(copy, split_protocol="official")
    recs = dm.records("train")
    Path(recs[0].image_path).write_bytes(Path(recs[0].image_path).read_bytes()[:100])
    Path(recs[1].image_path).unlink()
    with pytest.raises(DataError, match="view1_frontal.jpg is corrupt or truncated"):
        dm.load_image(recs[0], train=False)
    with pytest.raises(DataError, match=f"{recs[1].image_path} does not exist"):
        dm.load_image(recs[1], train=False)
    skip = make(copy, split_protocol="official", on_error="skip", batch_size=4)
    skip.set_tokenizer(tiny_tokenizer)
    batch = next(iter(skip._loader("train", shuffle=False, batch_size=4)))
    assert batch.skipped == 2 and batch.images.shape == (2, 3, SIZE, SIZE) and batch.labels.shape == (2, 5)
    df = pd.read_csv(copy / "train.csv", dtype=str)
    df.drop(columns="Edema").to_csv(copy / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv lacks the column\(s\) \['Edema'\]"):
        make(copy, split_protocol="official").records("train")
    df.loc[3, "Atelectasis"] = "2.0"
    df.to_csv(copy / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv column 'Atelectasis' has values \['2.0'\]"):
        make(copy, split_protocol="official").records("train")


def test_writer_validates_items(tmp_path):
    img = np.zeros((8, 6), np.uint8)
    with pytest.raises(ValueError, match="not allowed in valid.csv"):
        write_chexpert(tmp_path, [CheXpertItem("patient64541", img, {"Edema": -1.0}, split="valid")])
    with pytest.raises(ValueError, match="unknown CheXpert labels"):
        write_chexpert(tmp_path, [CheXpertItem("patient00001", img, {"Edma": 1.0})])


def test_invalid_config_values(root):
    for key, value, match in (
        ("uncertain", "zero", "data.uncertain"),
        ("split_protocol", "gloria", "data.split_protocol"),
        ("views", ["PA"], "data.views"),
        ("labels", "five", "data.labels"),
        ("labels", ["Effusion"], "data.labels"),
        ("per_class", 0, "data.per_class"),
        ("channels", 2, "channels"),
    ):
        with pytest.raises(ValueError, match=match):
            make(root, **{key: value})
    with pytest.raises(ValueError, match="Unknown split"):
        make(root).build_records("valid")


def test_yaml_matches_dataclass(root):
    from omegaconf import OmegaConf

    from medvlp.config import config_dir

    schema = OmegaConf.structured(CheXpertConfig)
    OmegaConf.set_struct(schema, True)
    merged = OmegaConf.merge(schema, OmegaConf.load(config_dir() / "data" / "chexpert.yaml").data)
    assert merged.name == "chexpert" and OmegaConf.is_missing(merged, "root")
    assert merged.labels == "competition" and merged.uncertain == "mgca" and merged.per_class == 200
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"root={root}", "labels=[Edema,Atelectasis]", "image_size=32"]))
    assert CheXpertDataModule(merged).label_names == ["Edema", "Atelectasis"]


def test_label_fraction_uses_the_split_key(root, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    full = make(root, split_protocol="official").records("train")
    half = make(root, split_protocol="official", label_fraction=0.5).records("train")
    studies = {r.study_id for r in full}
    assert {r.study_id for r in half} < studies and len({r.study_id for r in half}) == round(0.5 * len(studies))
    make(root, label_fraction=0.5, csv_5x200=str(tmp_path / "5x3.csv")).records("train")  # mgca: its own file
    assert len(list((tmp_path / "cache" / "label_fractions").iterdir())) == 2
    assert make(root).split_key() != make(root, val_seed=1).split_key() != make(root, split_protocol="official").split_key()
