"""MedBLIP list format (§13.4): TSV lists with a .csv name, label spellings, subject splits, volume geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.demo.medblip_mri import write_medblip_fixture
from medvlp.datamodules.medblip_mri import MedBLIPMRIConfig, MedBLIPMRIDataModule, parse_text, resize_geometry
from medvlp.registry import DATAMODULES


@pytest.fixture(scope="module")
def mb_root(tmp_path_factory):
    return write_medblip_fixture(tmp_path_factory.mktemp("medblip") / "mri")


def make(root, **kw) -> MedBLIPMRIDataModule:
    kw.setdefault("train_lists", ["ADNI-train", "OASIS2-train"])
    kw.setdefault("test_lists", ["ADNI-test", "AIBL-test"])
    return MedBLIPMRIDataModule(MedBLIPMRIConfig(root=str(root), **{"size": 24, **kw}))


@pytest.mark.parametrize("shape,new,offsets", [
    ((160, 192, 224), [160, 192, 224], [32, 16, 0]), ((256, 256, 170), [224, 224, 148], [0, 0, 38]),
    ((256, 240, 160), [224, 210, 140], [0, 7, 42]), ((193, 229, 193), [188, 224, 188], [18, 0, 18]),
])
def test_resize_geometry_matches_the_spec_values(shape, new, offsets):
    assert resize_geometry(shape, 224) == (new, offsets)


def test_text_labels_and_spellings(mb_root):
    assert DATAMODULES.get("medblip_mri") is MedBLIPMRIDataModule
    assert parse_text("A man. The diagnosis is Dementia. Extra.") == ("A man. ", "Dementia")
    assert parse_text("No label here.") == ("No label here.", "")
    dm = make(mb_root, val_fraction=0.0)
    train = dm.records("train")
    by_text = {r.meta["answer"]: r for r in train}
    assert by_text["CN"].labels.tolist() == [1, 0, 0] and by_text["AD"].labels.tolist() == [0, 0, 1]  # Dementia -> AD
    converted = next(r for r in train if r.meta["list"] == "OASIS2-train" and "Converted" in r.text)
    assert np.isnan(converted.labels).all() and dm.counts["unmapped_diagnosis"] == 1
    test = dm.records("test")
    assert [r.meta["answer"] for r in test] == ["AD", "", "CN", "AD"]  # AD, none, NC -> CN, Demented -> AD
    assert np.isnan(test[1].labels).all() and dm.counts["no_diagnosis"] == 1
    assert test[0].meta["description"] == "A 69-year-old female, MMSE 24. "


def test_split_by_subject_keeps_visits_together(mb_root):
    for seed in range(6):
        dm = make(mb_root, val_fraction=0.5, split_seed=seed)
        split = {r.meta["subject"]: s for s in ("train", "val") for r in dm.records(s) if dm.records(s)}
        visits = [r for s in ("train", "val") for r in dm.records(s) if r.meta["subject"] == "002_S_0295"]
        assert len(visits) == 2 and len({split[v.meta["subject"]] for v in visits}) == 1


def test_volume_pipeline_and_visible_diagnosis(mb_root):
    dm = make(mb_root, val_fraction=0.0)
    recs = {r.meta["answer"]: r for r in dm.records("train")}
    cn = dm.load_image(recs["CN"], train=False)
    ad = dm.load_image(recs["AD"], train=False)
    assert cn.shape == (1, 24, 24, 24) and cn.dtype == torch.float32
    new, off = resize_geometry((16, 20, 24), 24)
    assert new == [16, 20, 24] and off == [4, 2, 0]
    assert cn[0, : off[0]].abs().max() == 0 and cn.max() == pytest.approx(1.0) and cn.min() == 0  # padding = min
    centre = (slice(6, 18), slice(6, 18), slice(6, 18))
    dark_ad, dark_cn = int((ad[0][centre] < 0.3).sum()), int((cn[0][centre] < 0.3).sum())
    assert dark_ad > 2 * dark_cn > 0  # larger dark ventricles in dementia


def test_bad_input(mb_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(mb_root, root)
    lst = root / "local_data" / "ADNI-test.csv"
    lst.write_text(lst.read_text() + "ADNI/x.nii.gz\tA man.\tThe diagnosis is AD.\n")
    with pytest.raises(DataError, match=r"ADNI-test.csv, line 3: 3 tab-separated fields"):
        make(root).records("test")
    lst.write_text("ADNI/027_S_0120/visit1.nii.gz\tThe diagnosis is Probable.\n")
    with pytest.raises(DataError, match="diagnosis 'Probable' is not one of the known spellings"):
        make(root).records("test")
    lst.write_text("ADNI/missing.nii.gz\tThe diagnosis is AD.\nADNI/027_S_0120/visit1.nii.gz\tThe diagnosis is CN.\n")
    with pytest.raises(DataError, match="missing.nii.gz"):
        make(root).records("test")
    skip = make(root, on_error="skip")
    assert len(skip.records("test")) == 3 and skip.counts["missing_test"] == 1
    with pytest.raises(DataRootError, match="NACC-train.csv"):
        MedBLIPMRIDataModule.check_root(MedBLIPMRIConfig(root=str(root)))
