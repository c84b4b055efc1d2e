"""DICOM-series reading (formats/dicom_series.py) and the CQ500 datamodule on the fixture of §10.5."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp import preprocess as P
from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.cq500 import FINDINGS, CQ500Config, CQ500DataModule
from medvlp.datamodules.demo.cq500 import write_cq500_fixture
from medvlp.datamodules.demo.dicom import write_dicom
from medvlp.datamodules.formats.dicom_series import dicom_files, read_series
from medvlp.registry import DATAMODULES

THIN = "CQ500-CT-12/CQ500CT12 CQ500CT12/Unknown Study/CT PLAIN THIN"


@pytest.fixture(scope="module")
def cq_root(tmp_path_factory):
    return write_cq500_fixture(tmp_path_factory.mktemp("cq500") / "CQ500")


def make(root, **kw) -> CQ500DataModule:
    return CQ500DataModule(CQ500Config(root=str(root), **{"spacing": [], "size": [], **kw}))


def test_series_sorted_by_position_with_geometry_and_hu(cq_root):
    import pydicom

    folder = cq_root / THIN
    files = dicom_files(folder)
    numbers = [int(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2] / 1.25) for f in files]
    assert numbers != sorted(numbers)  # file numbering does not follow anatomy
    img = read_series(folder)
    assert img.GetSize() == (32, 32, 8)
    assert img.GetSpacing() == pytest.approx((0.5, 0.5, 1.25))
    assert img.GetOrigin() == pytest.approx((-80.0, -90.0, 0.0))
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(img)
    assert hu[-1, 0, :].min() == pytest.approx(1000, abs=1)  # the superior marker row: last after sorting
    assert hu[:-1, 0, 5:].max() < 0  # ... and only there
    assert np.median(hu[:, 14:18, 14:18]) == pytest.approx(35, abs=10)  # brain, after RescaleIntercept -1024


def _copy(cq_root, tmp_path) -> Path:
    dst = tmp_path / "series"
    shutil.copytree(cq_root / THIN, dst)
    return dst


def test_missing_duplicated_and_inconsistent_slices_are_named(cq_root, tmp_path):
    import pydicom

    folder = _copy(cq_root, tmp_path)
    by_pos = sorted(dicom_files(folder), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    shutil.copy(by_pos[3], folder / "CT000099.dcm")  # an exact copy: dropped
    assert sitk_size(read_series(folder)) == 8
    ds = pydicom.dcmread(by_pos[3])
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.save_as(folder / "CT000098.dcm")  # a different slice at the same position
    with pytest.raises(DataError, match="two different slices at the same position"):
        read_series(folder)
    (folder / "CT000098.dcm").unlink()
    Path(by_pos[4]).unlink()
    with pytest.raises(DataError, match="missing slice"):
        read_series(folder)
    folder = _copy(cq_root, tmp_path / "b")
    by_pos = sorted(dicom_files(folder), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    ds = pydicom.dcmread(by_pos[4])
    ds.ImagePositionPatient = [-80.0, -90.0, 4 * 1.25 + 0.4]
    ds.save_as(by_pos[4])
    with pytest.raises(DataError, match="inconsistent slice spacing"):
        read_series(folder)
    folder = _copy(cq_root, tmp_path / "c")
    write_dicom(folder / "CT000097.dcm", np.zeros((32, 32), np.int16), bits_stored=16,
                tags={"SeriesInstanceUID": "9.9.9", "ImagePositionPatient": [-80.0, -90.0, 50.0],
                      "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "PixelSpacing": [0.5, 0.5]})
    with pytest.raises(DataError, match="mixes 2 series"):
        read_series(folder)
    (folder / "CT000097.dcm").write_bytes(b"not a dicom")
    with pytest.raises(DataError, match="CT000097.dcm is not a readable DICOM"):
        read_series(folder)


def sitk_size(img) -> int:
    return img.GetSize()[2]


def test_records_labels_and_series_choice(cq_root):
    assert DATAMODULES.get("cq500") is CQ500DataModule and CQ500DataModule.modality == "3d"
    dm = make(cq_root)
    recs = dm.records("test")
    assert [r.study_id for r in recs] == ["CQ500-CT-0", "CQ500-CT-12"]  # reads.csv names, not folder names
    assert recs[1].image_path.endswith("CT PLAIN THIN") and recs[1].meta["series"] == ["CT PLAIN THIN"]
    lab = dict(zip(FINDINGS, recs[1].labels.tolist(), strict=True))
    assert lab["ICH"] == lab["IPH"] == 1 and lab["Fracture"] == 0  # 2 of 3 readers vs 1 of 3
    with pytest.raises(DataError, match="no usable records"):
        dm.records("train")
    five = make(cq_root, series="5MM").records("test")[0]
    assert five.image_path.endswith("CT 5mm")
    both = make(cq_root, series="all").records("test")[0]
    assert [Path(p).name for p in both.image_path] == ["CT 5mm", "CT PLAIN THIN"]
    with pytest.raises(DataError, match="no series matching data.series='contrast'"):
        make(cq_root, series="contrast").records("test")


def test_volume_pipeline_and_cache(cq_root, tmp_path):
    dm = make(cq_root, spacing=[2.5, 1.0, 1.0], size=[4, 16, 16])
    rec = dm.records("test")[1]
    img = dm.load_image(rec, train=False)
    assert img.shape == (1, 4, 16, 16) and img.dtype == torch.float32
    cache = tmp_path / "cache"
    cfg = CQ500Config(root=str(cq_root), spacing=[2.5, 1.0, 1.0], size=[4, 16, 16], preprocessed_dir=str(cache))
    assert P.preprocess(cfg, splits=("test",), workers=1, progress=False).done == 2
    cached = CQ500DataModule(CQ500Config(root=str(cq_root), spacing=[2.5, 1.0, 1.0], size=[4, 16, 16],
                                         preprocessed_dir=str(cache), use_preprocessed="true"))
    torch.testing.assert_close(cached.load_image(cached.records("test")[1], train=False), img,
                               atol=0.5 / 80 / 0.226 + 1e-5, rtol=0)


def test_layout_errors(cq_root, tmp_path):
    with pytest.raises(DataRootError, match="reads.csv"):
        CQ500DataModule.check_root(CQ500Config(root=str(tmp_path)))
    (tmp_path / "reads.csv").write_text("name,Category\n")
    (tmp_path / "CQ500-CT-3.zip").write_bytes(b"PK")
    with pytest.raises(DataRootError, match="unzip them in place"):
        CQ500DataModule.check_root(CQ500Config(root=str(tmp_path)))
    root = tmp_path / "partial"
    shutil.copytree(cq_root, root)
    shutil.rmtree(root / "CQ500-CT-0")
    with pytest.raises(DataError, match="CQ500-CT-0 is in reads.csv but no extracted scan folder"):
        make(root).records("test")
    skip = make(root, on_error="skip")
    assert [r.study_id for r in skip.records("test")] == ["CQ500-CT-12"] and skip.counts["test"] == 1
    inner_only = tmp_path / "inner"  # extracted without the outer CQ500-CT-<n> folder
    (inner_only).mkdir()
    shutil.copy(cq_root / "reads.csv", inner_only)
    for n in (0, 12):
        shutil.copytree(cq_root / f"CQ500-CT-{n}" / f"CQ500CT{n} CQ500CT{n}", inner_only / f"CQ500CT{n} CQ500CT{n}")
    assert [r.study_id for r in make(inner_only).records("test")] == ["CQ500-CT-0", "CQ500-CT-12"]
