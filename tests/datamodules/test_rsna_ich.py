"""RSNA intracranial haemorrhage: CSV pivot, header index, series regrouping, the 12-bit wrap fix (§11.5)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.demo.rsna_ich import write_rsna_ich_fixture
from medvlp.datamodules.formats.dicom_series import read_series
from medvlp.datamodules.rsna_ich import SUBTYPES, RSNAICHConfig, RSNAICHDataModule, read_labels
from medvlp.registry import DATAMODULES

ALL_TRAIN = {"val_fraction": 0.0, "test_fraction": 0.0, "spacing": [], "size": []}


@pytest.fixture()
def ich_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))  # the header index goes here
    return write_rsna_ich_fixture(tmp_path / "rsna-ich")


def make(root, **kw) -> RSNAICHDataModule:
    return RSNAICHDataModule(RSNAICHConfig(root=str(root), **{**ALL_TRAIN, **kw}))


def test_csv_pivot_drops_duplicates_and_excluded(ich_root, tmp_path):
    labels, dupes = read_labels(ich_root / "stage_2_train.csv", {"ID_6431af929"})
    assert dupes == 6 and "ID_6431af929" not in labels and len(labels) == 4
    assert labels["ID_9f8e7d6c5"].tolist() == [1, 0, 0, 0, 0, 1]  # SUBTYPES order: any first
    assert SUBTYPES[0] == "any"
    bad = tmp_path / "bad.csv"
    lines = (ich_root / "stage_2_train.csv").read_text().splitlines()
    bad.write_text("\n".join([lines[0], *lines[1:6]]) + "\n")  # an image with five of its six rows
    with pytest.raises(DataError, match="lacks some of the six subtype rows"):
        read_labels(bad, set())
    bad.write_text("\n".join([lines[0], *lines[1:7], lines[1].replace(",0", ",1")]) + "\n")
    with pytest.raises(DataError, match="conflicting labels"):
        read_labels(bad, set())


def test_series_regrouped_sorted_and_labelled(ich_root, monkeypatch):
    assert DATAMODULES.get("rsna_ich") is RSNAICHDataModule
    dm = make(ich_root)
    recs = {r.study_id: r for r in dm.records("train")}
    assert sorted(recs) == ["ID_se000001", "ID_se000002"]
    one = recs["ID_se000001"]
    assert len(one.meta["slices"]) == 3 and one.meta["study"] == "ID_st000001"
    assert one.labels.tolist() == [1, 0, 0, 0, 0, 1]  # max over slices: subdural on one slice
    assert recs["ID_se000002"].labels.tolist() == [1, 1, 0, 0, 0, 0]
    assert dm.counts["duplicate_csv_rows"] == 6
    # the header index is read once: a second datamodule does not open the DICOMs again
    import medvlp.datamodules.rsna_ich as mod

    monkeypatch.setattr(mod, "_header_row", lambda path: pytest.fail(f"re-read {path}"))
    assert len(make(ich_root).records("train")) == 2


def test_wrapped_12bit_slice_is_fixed_and_slices_follow_position(ich_root):
    import SimpleITK as sitk

    rec = {r.study_id: r for r in make(ich_root).records("train")}["ID_se000001"]
    img = read_series(rec.meta["slices"], fix_wrapped_12bit=True)
    hu = sitk.GetArrayFromImage(img)
    assert img.GetSpacing() == pytest.approx((0.5, 0.5, 5.0))
    for k in range(3):  # marker of the slice at z = 5 k mm sits in column 1 + k
        assert hu[k, 0, 1 + k] == pytest.approx(1000)
    assert np.median(hu[0, 12:20, 12:20]) == pytest.approx(35, abs=8)  # the wrapped slice, fixed
    assert hu[0, 31, 0] == pytest.approx(-1000, abs=5)  # air, stored as 3096 before the fix
    raw = sitk.GetArrayFromImage(read_series(rec.meta["slices"], fix_wrapped_12bit=False))
    assert raw[0, 31, 0] > 3000  # without the fix, air reads as bone-bright


def test_volumes_splits_and_errors(ich_root, tmp_path):
    dm = make(ich_root, spacing=[5.0, 1.0, 1.0], size=[3, 16, 16])
    rec = dm.records("train")[0]
    img = dm.load_image(rec, train=False)
    assert img.shape == (1, 3, 16, 16) and img.dtype == torch.float32
    split = make(ich_root, val_fraction=0.5, test_fraction=0.5 - 1e-9)
    where = {split.split_of(s) for s in ("ID_st000001", "ID_st000002")}
    assert where <= {"train", "val", "test"} and split.split_of("ID_st000001") == split.split_of("ID_st000001")
    with pytest.raises(DataError, match="ID_6431af929"):
        make(ich_root, exclude=[]).records("train")  # the corrupt file is named when not excluded
    root = tmp_path / "duplicated"
    shutil.copytree(ich_root, root)
    import pydicom

    moved = root / "stage_2_train" / "ID_0a1b2c3d4.dcm"
    ds = pydicom.dcmread(moved)
    ds.ImagePositionPatient = [-125.0, -110.0, 5.0]  # now at the position of another slice
    ds.save_as(moved)
    with pytest.raises(DataError, match="two different slices at the same position"):
        dm2 = make(root, spacing=[], size=[])
        dm2.load_volume(dm2.records("train")[0].image_path, dm2.records("train")[0].meta["slices"])
    with pytest.raises(DataRootError, match="stage_2_train.csv"):
        RSNAICHDataModule.check_root(RSNAICHConfig(root=str(tmp_path)))
    with pytest.raises(ValueError, match="val_fraction"):
        make(ich_root, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction=1"):
        make(ich_root, val_fraction=0.1, test_fraction=1.0)
    full = make(ich_root, val_fraction=0.0, test_fraction=1.0)  # HLIP's zero-shot protocol: every study tests
    everything = make(ich_root, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError, match="split 'train' .* has no usable records"):
        full.records("train")
    assert sorted(r.study_id for r in full.records("test")) == sorted(r.study_id for r in everything.records("train"))
