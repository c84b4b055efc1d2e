"""A catalogue of bad inputs: each one gets a named error, or is tolerated and read correctly.

Every case builds a tiny synthetic copy of an official layout (``tests/format_fixtures.py``), breaks
one thing, and checks that

* the error is ours (``DataError`` / ``DataRootError``, or a ``ValueError`` of a config check), not a
  bare library traceback, and its message names the file, row or key and what was expected;
* with ``data.on_error=skip`` loading finishes, and the item is counted and listed: in ``dm.dropped``
  (build time) or in ``ImageTextBatch.skipped_ids`` and the ``dropped.csv`` that
  :class:`~medvlp.datamodules.dropped.DroppedItems` writes (load time);
* a legitimate quirk (a UTF-8 byte-order mark, CRLF line endings, an extra column) reads exactly
  as the plain file does.

Tests run as root, where ``chmod 000`` does not stop reads: a permission problem is simulated by
making ``open`` raise ``PermissionError`` for one path (what the OS raises for a non-root user).
"""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from format_fixtures import (
    CTVolume,
    mimic_report,
    phantom_hu,
    truncate,
    write_ct_rate,
    write_mimic,
    write_nifti,
    write_nih14_fixture,
    write_rsna_fixture,
)

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.ct_rate import CTRateConfig, CTRateDataModule
from medvlp.datamodules.dropped import DroppedItems, read_dropped, write_dropped

SPACING, SIZE = [5.0, 1.6, 1.6], [8, 16, 16]
OURS = (DataError, DataRootError, ValueError)


# --------------------------------------------------------------------------------------------- helpers
def fake_tokenizer(texts, padding=None, truncation=None, max_length=8, return_tensors=None):
    import torch

    n = len(texts)
    return {"input_ids": torch.zeros(n, max_length, dtype=torch.long),
            "attention_mask": torch.ones(n, max_length, dtype=torch.long)}


def deny_read(monkeypatch, *paths) -> None:
    """Make ``open`` raise the PermissionError a non-root user gets for ``paths``."""
    denied = {os.path.abspath(os.fspath(p)) for p in paths}
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.path.abspath(os.fspath(file)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


class _Trainer:
    """What :class:`DroppedItems` reads from a Lightning Trainer."""

    is_global_zero = True
    sanity_checking = False


def run_epochs(dm, run_dir: Path, split: str = "train", epochs: int = 2) -> list:
    """Load every item of ``split`` ``epochs`` times through a DataLoader, feed the batches to
    :class:`DroppedItems` as a training run would, and return the rows of its ``dropped.csv``."""
    dm.set_tokenizer(fake_tokenizer)
    callback, trainer = DroppedItems(dm, run_dir), _Trainer()
    callback.on_train_start(trainer, None)
    for _ in range(epochs):
        for i, batch in enumerate(dm.eval_dataloader(split)):
            callback.on_train_batch_end(trainer, None, None, batch, i)
        callback.on_train_epoch_end(trainer, None)
    return read_dropped(run_dir / "dropped.csv")


def raises_ours(match: str, fn, *args, **kwargs) -> str:
    """Call ``fn``; assert it raises one of our errors whose message matches ``match``; return the message."""
    with pytest.raises(OURS, match=match) as err:
        fn(*args, **kwargs)
    assert type(err.value).__module__.startswith(("medvlp", "builtins")), type(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------------------- fixtures
CT_VOLUMES = [
    CTVolume("train_1_a_1"), CTVolume("train_1_a_2", findings="Mild edema."), CTVolume("train_2_a_1", labels=(1,)),
    CTVolume("valid_1_a_1"),
]


@pytest.fixture(scope="module")
def ct_base(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("ct_base")
    write_ct_rate(parent, CT_VOLUMES)
    return parent


@pytest.fixture
def ct(ct_base, tmp_path) -> Path:
    """A private copy of the small CT-RATE layout (the parent of ``dataset/``)."""
    shutil.copytree(ct_base, tmp_path / "ct")
    return tmp_path / "ct"


def ct_dm(root, **kw) -> CTRateDataModule:
    kw = {"spacing": SPACING, "size": SIZE, "val_fraction": 0.0, "use_preprocessed": "false", **kw}
    return CTRateDataModule(CTRateConfig(root=str(root), **kw))


def ct_texts(root, **kw) -> dict[str, str]:
    return {r.study_id: r.text for r in ct_dm(root, **kw).records("train")}


REPORTS_CSV = "dataset/radiology_text_reports/train_reports.csv"
LABELS_CSV = "dataset/multi_abnormality_labels/train_predicted_labels.csv"
METADATA_CSV = "dataset/metadata/train_metadata.csv"
V1 = "dataset/train/train_{p}/train_{p}_a/train_{p}_a_{r}.nii.gz"


@pytest.fixture(scope="module")
def mimic_base(tmp_path_factory) -> Path:
    return write_mimic(tmp_path_factory.mktemp("mimic_base") / "mimic", gz=False).root


@pytest.fixture
def mimic(mimic_base, tmp_path) -> Path:
    shutil.copytree(mimic_base, tmp_path / "mimic")
    return tmp_path / "mimic"


def mimic_dm(root, **kw):
    from medvlp.datamodules.mimic_cxr import MimicCXRConfig, MimicCXRDataModule

    return MimicCXRDataModule(MimicCXRConfig(root=str(root), image_size=16, augment=False, use_preprocessed="false", **kw))


REPORT = "files/p10/p10000001/s50000001.txt"  # the full report of the fixture's first train study
SHORT = ("train", "50000007")  # the fixture's study whose report is too short (MGCA's rule): listed at build time


@pytest.fixture(scope="module")
def rsna_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rsna_base") / "rsna"
    write_rsna_fixture(root)
    return root


@pytest.fixture
def rsna(rsna_base, tmp_path) -> Path:
    shutil.copytree(rsna_base, tmp_path / "rsna")
    return tmp_path / "rsna"


def rsna_dm(root, **kw):
    from medvlp.datamodules.rsna import RSNAConfig, RSNAPneumoniaDataModule

    return RSNAPneumoniaDataModule(RSNAConfig(root=str(root), image_size=16, augment=False, use_preprocessed="false", **kw))


def first_dicom(root: Path) -> Path:
    return sorted((root / "stage_2_train_images").glob("*.dcm"))[0]


# ============================================================================================== 2D
def test_corrupt_jpeg_is_named_and_skipped_and_listed(mimic, tmp_path):
    dm = mimic_dm(mimic)
    rec = dm.records("train")[0]
    Path(rec.image_path).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    raises_ours(rf"Image {rec.image_path} is corrupt or truncated", dm.load_image, rec, False)
    skip = mimic_dm(mimic, on_error="skip")
    rows = run_epochs(skip, tmp_path / "run")
    assert [(r.split, r.study_id) for r in rows] == [SHORT, ("train", rec.study_id)]  # each listed once in two epochs
    assert "shorter than data.min_tokens=3 tokens" in rows[0].reason
    assert f"{rec.image_path} is corrupt or truncated" in rows[1].reason


def test_an_evaluation_batch_whose_every_item_fails_is_skipped_and_listed(mimic, tmp_path):
    """Batch size 1 (HLIP's evaluation): the unreadable study's batch is passed over and the study travels with
    the next batch (or, last, goes straight to ``dm.dropped``); a training batch that loses every item stays an error."""
    dm = mimic_dm(mimic, on_error="skip", eval_batch_size=1, batch_size=1)
    dm.set_tokenizer(fake_tokenizer)
    recs = dm.records("train")
    for rec in (recs[0], recs[-1]):
        Path(rec.image_path).write_bytes(b"not an image")
    batches = list(dm.eval_dataloader("train"))
    assert len(batches) == len(recs) - 2
    assert batches[0].skipped == 1 and batches[0].skipped_ids == [recs[0].study_id]
    assert "corrupt or truncated" in batches[0].skipped_reasons[0]
    assert sum(b.skipped for b in batches) == 1  # the last one had no batch after it
    assert [(d.split, d.study_id) for d in dm.dropped if d.study_id == recs[-1].study_id] == [("train", recs[-1].study_id)]
    with pytest.raises(DataError, match="Every item of a batch failed to load"):
        list(dm.train_dataloader())


def test_truncated_jpeg_is_named(mimic):
    dm = mimic_dm(mimic)
    rec = dm.records("train")[0]
    truncate(Path(rec.image_path), 0.4)
    raises_ours(rf"{rec.image_path} is corrupt or truncated", dm.load_image, rec, False)


def test_missing_image_is_named_and_skipped(mimic, tmp_path):
    dm = mimic_dm(mimic)
    rec = dm.records("train")[0]
    Path(rec.image_path).unlink()
    raises_ours(rf"Image {rec.image_path} does not exist", dm.load_image, rec, False)
    rows = run_epochs(mimic_dm(mimic, on_error="skip"), tmp_path / "run", epochs=1)
    assert [(r.split, r.study_id) for r in rows] == [SHORT, ("train", rec.study_id)] and "does not exist" in rows[1].reason


@pytest.fixture(scope="module")
def nih_base(tmp_path_factory) -> Path:
    return write_nih14_fixture(tmp_path_factory.mktemp("nih_base") / "nih", variant="v2020")


def test_corrupt_png_is_named_and_skipped(nih_base, tmp_path):
    from medvlp.datamodules.nih14 import NIH14Config, NIH14DataModule

    root = tmp_path / "nih"
    shutil.copytree(nih_base, root)

    def make(**kw):
        return NIH14DataModule(NIH14Config(root=str(root), image_size=16, augment=False, use_preprocessed="false", **kw))

    rec = make().records("test")[0]
    data = Path(rec.image_path).read_bytes()
    Path(rec.image_path).write_bytes(data[:60] + b"\x00" * 40 + data[100:])  # a damaged IDAT chunk
    raises_ours(rf"Image {rec.image_path} is corrupt or truncated", make().load_image, rec, False)
    rows = run_epochs(make(on_error="skip"), tmp_path / "run", split="test", epochs=1)
    assert [r.study_id for r in rows] == [rec.study_id]  # (run_epochs feeds the batches as training ones)


def test_float_image_with_nan_is_named_not_zeroed(tmp_path):
    from PIL import Image

    from medvlp.datamodules.radiograph import read_gray

    arr = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10)
    Image.fromarray(arr, mode="F").save(tmp_path / "ok.tif")
    assert read_gray(tmp_path / "ok.tif").max() == 255  # a float image is scaled, not clipped to 0 / 1
    arr[3, 4] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tif")
    raises_ours(r"nan.tif has 1 non-finite pixel\(s\) \(NaN or inf; the first at row 3, column 4\)",
                read_gray, tmp_path / "nan.tif")


def _dicom_defect(path: Path, defect: str) -> str:
    """Break the DICOM at ``path``; returns the message expected."""
    import pydicom

    if defect == "corrupt":
        path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 2)
        return rf"DICOM file {path} (is truncated or corrupt|has no Pixel Data.*it is truncated or corrupt)"
    if defect == "not_dicom":
        path.write_bytes(b"PK\x03\x04 a zip, not a DICOM")
        return rf"{path} is not a DICOM Part-10 file"
    if defect == "truncated":
        truncate(path, 0.6)
        return rf"DICOM file {path} .*truncated or corrupt"
    ds = pydicom.dcmread(path)
    if defect == "no_pixel_data":
        del ds.PixelData
        ds.save_as(path)
        return rf"DICOM file {path} has no Pixel Data \(7FE0,0010\)"
    if defect == "unknown_syntax":
        data = path.read_bytes()
        uid = str(ds.file_meta.TransferSyntaxUID).encode()
        path.write_bytes(data.replace(uid, uid.replace(b"10008", b"99999"), 1))
        return rf"DICOM file {path} uses transfer syntax .*1\.2\.840\.99999.*which pydicom cannot decode"
    if defect == "nan_rescale":
        ds.RescaleSlope, ds.RescaleIntercept = "NaN", "0"
        ds.save_as(path)
        return rf"DICOM file {path}: \d+ pixel\(s\) are not finite after its Modality LUT"
    raise AssertionError(defect)


@pytest.mark.parametrize("defect", ["corrupt", "not_dicom", "truncated", "no_pixel_data", "unknown_syntax", "nan_rescale"])
def test_bad_dicom_is_named_and_skipped(rsna, tmp_path, defect):
    dm = rsna_dm(rsna)
    path = first_dicom(rsna)
    rec = next(r for s in ("train", "val", "test") for r in dm.records(s) if r.image_path == str(path))
    split = next(s for s in ("train", "val", "test") if rec in dm.records(s))
    expected = _dicom_defect(path, defect)
    raises_ours(expected, dm.load_image, rec, False)
    rows = run_epochs(rsna_dm(rsna, on_error="skip"), tmp_path / "run", split=split, epochs=1)
    assert [(r.split, r.study_id) for r in rows] == [("train", rec.study_id)]  # the loop feeds it as train
    assert str(path) in rows[0].reason


# ====================================================================================== permissions
def test_permission_denied_is_named_as_such(ct, mimic, rsna, monkeypatch, tmp_path):
    """Never "truncated or corrupt, re-download it": re-downloading does not fix a permission."""
    import torch

    from medvlp.datamodules.formats.dicom import read_dicom
    from medvlp.datamodules.formats.tables import read_csv, read_text
    from medvlp.datamodules.pub_brain5 import read_series_tensor
    from medvlp.datamodules.radiograph import read_gray

    torch.save(torch.zeros(2, 3, 3), tmp_path / "s.pt")
    volume = ct / V1.format(p=1, r=1)
    dm = ct_dm(ct)
    rec = dm.records("train")[0]
    jpeg = Path(mimic_dm(mimic).records("train")[0].image_path)
    cases = [
        (read_gray, jpeg), (read_dicom, first_dicom(rsna)), (read_csv, ct / REPORTS_CSV),
        (read_text, mimic / REPORT), (read_series_tensor, tmp_path / "s.pt"),
    ]
    deny_read(monkeypatch, volume, *(p for _, p in cases), ct / LABELS_CSV)
    for reader, path in cases:
        raises_ours(rf"Cannot read {path}: permission denied", reader, path)
    raises_ours(rf"Cannot read {volume}: permission denied", dm.load_image, rec, False)
    raises_ours(rf"Cannot read {ct / LABELS_CSV}: permission denied", ct_dm(ct).records, "train")
    msg = raises_ours(r"permission denied", mimic_dm(mimic).records, "train")
    assert "s50000001.txt" in msg and "corrupt" not in msg


def test_permission_denied_volume_is_skipped_and_listed(ct, monkeypatch, tmp_path):
    volume = ct / V1.format(p=2, r=1)
    deny_read(monkeypatch, volume)
    rows = run_epochs(ct_dm(ct, on_error="skip"), tmp_path / "run", epochs=1)
    assert [r.study_id for r in rows] == ["train_2_a"] and f"Cannot read {volume}: permission denied" in rows[0].reason


# ============================================================================================== 3D
def _nan_volume(ct: Path) -> Path:
    """train_2_a_1 stored as float32 with NaN voxels (v1: raw values, read with the metadata rescale)."""
    stored = (phantom_hu() + 1024).astype(np.float32)
    stored[3, 5:9, 5:9] = np.nan
    return write_nifti(ct / V1.format(p=2, r=1), stored)


def test_nan_voxels_are_named_not_turned_into_hu(ct, tmp_path):
    """ITK reads NaN voxels as 0, which the v1 rescale turns into -1024 HU: the file is checked instead."""
    path = _nan_volume(ct)
    dm = ct_dm(ct)
    rec = next(r for r in dm.records("train") if r.study_id == "train_2_a")
    raises_ours(rf"NIfTI file {path} holds 16 non-finite voxel value\(s\) \(NaN or inf; the first at voxel "
                rf"\(x, y, z\) = \(5, 5, 3\)\)", dm.load_image, rec, False)
    rows = run_epochs(ct_dm(ct, on_error="skip"), tmp_path / "run")
    assert [(r.split, r.study_id) for r in rows] == [("train", "train_2_a")] and str(path) in rows[0].reason


def test_nan_voxels_fail_preprocess_by_name(ct, tmp_path):
    from medvlp.preprocess import preprocess

    path = _nan_volume(ct)
    cfg = CTRateConfig(root=str(ct), spacing=SPACING, size=SIZE, val_fraction=0.0, preprocessed_dir=str(tmp_path / "c"))
    raises_ours(rf"{path} holds 16 non-finite voxel", preprocess, cfg, splits=["train"], workers=0, progress=False)
    cfg.on_error, cfg.preprocessed_dir = "skip", str(tmp_path / "c2")
    summary = preprocess(cfg, splits=["train"], workers=0, progress=False)
    assert summary.failed == 1 and str(path) in summary.failures[0]


def test_single_slice_volume_is_named_as_such(ct, tmp_path):
    path = write_nifti(ct / V1.format(p=2, r=1), (phantom_hu()[:1] + 1024).astype(np.int16))
    dm = ct_dm(ct)
    rec = next(r for r in dm.records("train") if r.study_id == "train_2_a")
    msg = raises_ours(rf"{path}: a single-slice volume \(shape \(1, 32, 32\), z, y, x\); a CT volume needs at least 2 "
                      rf"slices", dm.load_image, rec, False)
    assert "HU" not in msg  # not blamed on the intensity rescale
    rows = run_epochs(ct_dm(ct, on_error="skip"), tmp_path / "run", epochs=1)
    assert [r.study_id for r in rows] == ["train_2_a"] and "single-slice" in rows[0].reason


def test_zero_spacing_in_metadata_is_named_per_row(ct):
    df = pd.read_csv(ct / METADATA_CSV, dtype=str, keep_default_na=False)
    df.loc[df["VolumeName"] == "train_2_a_1.nii.gz", "ZSpacing"] = "0"
    df.to_csv(ct / METADATA_CSV, index=False)
    raises_ours(r"train_metadata.csv, volume train_2_a_1: spacing must be > 0 mm", ct_dm(ct).records, "train")
    skip = ct_dm(ct, on_error="skip")
    assert [r.study_id for r in skip.records("train")] == ["train_1_a"]
    assert [(d.split, d.study_id) for d in skip.dropped] == [("train", "train_2_a_1")]
    assert "ZSpacing '0'" in skip.dropped[0].reason


def test_zero_spacing_in_a_v2_header_is_named(ct):
    import gzip
    import struct

    path = write_nifti(ct / "dataset/train_fixed/train_2/train_2_a/train_2_a_1.nii.gz", phantom_hu().astype(np.int16),
                       (2.5, 0.8, 0.8))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[88:92] = struct.pack("<f", 0.0)  # pixdim[3] (z)
    raw[254:256] = struct.pack("<h", 0)  # no sform: the spacing comes from pixdim
    path.write_bytes(gzip.compress(bytes(raw)))
    dm = ct_dm(ct, version="v2", on_error="skip")
    rec = next(r for r in dm.records("train") if r.study_id == "train_2_a")
    raises_ours(rf"{path}: the header gives voxel spacing 0.0 along z", dm.load_image, rec, False)


@pytest.mark.parametrize("defect", ["garbage", "truncated", "empty", "not_gzip"])
def test_corrupt_nifti_is_named(ct, tmp_path, defect):
    path = ct / V1.format(p=2, r=1)
    if defect == "garbage":
        path.write_bytes(b"\x1f\x8b" + os.urandom(200))
        expected = rf"NIfTI file {path} is corrupt or not gzip-compressed"
    elif defect == "truncated":
        truncate(path, 0.5)
        expected = rf"NIfTI file {path} is truncated"
    elif defect == "empty":
        path.write_bytes(b"")
        expected = rf"NIfTI file {path} is empty \(0 bytes\)"
    else:
        path.write_bytes(b"just text, no header" * 30)
        expected = rf"NIfTI file {path} is corrupt or not gzip-compressed"
    dm = ct_dm(ct)
    rec = next(r for r in dm.records("train") if r.study_id == "train_2_a")
    raises_ours(expected, dm.load_image, rec, False)
    rows = run_epochs(ct_dm(ct, on_error="skip"), tmp_path / "run", epochs=1)
    assert [r.study_id for r in rows] == ["train_2_a"] and str(path) in rows[0].reason


def test_preprocessed_cache_made_with_other_settings(ct, tmp_path):
    from medvlp.preprocess import preprocess

    cache = str(tmp_path / "cache")
    preprocess(CTRateConfig(root=str(ct), spacing=SPACING, size=SIZE, val_fraction=0.0, preprocessed_dir=cache),
               splits=["train"], workers=0, progress=False)
    other = ct_dm(ct, spacing=[4.0, 1.6, 1.6], preprocessed_dir=cache, use_preprocessed="true")
    msg = raises_ours(rf"the preprocessed cache {cache} was made with other settings", other.dataset, "train")
    assert "(data.spacing: cache [5.0, 1.6, 1.6], config [4.0, 1.6, 1.6])" in msg and "medvlp preprocess" in msg
    auto = ct_dm(ct, spacing=[4.0, 1.6, 1.6], preprocessed_dir=cache, use_preprocessed="auto")
    assert auto.preprocessed() is None and auto.dataset("train")[0]["image"].shape == (1, *SIZE)  # decoded instead
    raises_ours(rf"{cache} holds a preprocessed cache made with other settings", preprocess,
                CTRateConfig(root=str(ct), spacing=[4.0, 1.6, 1.6], val_fraction=0.0, preprocessed_dir=cache),
                splits=["train"], workers=0, progress=False)


def write_series(folder: Path, positions: list[float], uids: list[str] | None = None) -> list[Path]:
    """A CT series of 16 x 16 slices at ``positions`` (mm along z), one file per slice."""
    from medvlp.datamodules.demo.dicom import write_dicom

    files = []
    for i, z in enumerate(positions):
        files.append(write_dicom(folder / f"CT{i:06d}.dcm", np.full((16, 16), 1000 + i, np.int16), bits_stored=16,
                                 rescale=(1.0, -1024.0), tags={
            "Modality": "CT", "SeriesInstanceUID": "1.2.3.4", "SOPInstanceUID": (uids or [])[i] if uids else f"1.2.3.4.{i}",
            "ImagePositionPatient": [0.0, 0.0, float(z)], "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "PixelSpacing": [0.5, 0.5], "InstanceNumber": i + 1}))
    return files


@pytest.mark.parametrize("case, positions, uids, expected", [
    ("duplicated", [0, 2, 2, 4, 6], None, r"two different slices at the same position 2.00 mm \(CT000001.dcm, CT000002.dcm\)"),
    ("missing", [0, 2, 4, 8, 10], None, r"missing slice\(s\) between CT000002.dcm and CT000003.dcm \(a 4.00 mm step"),
    ("inconsistent", [0, 2, 4, 6.6, 8], None, r"inconsistent slice spacing \(2.60 mm between CT000002.dcm and CT000003.dcm"),
    ("exact copy", [0, 2, 2, 4, 6], ["a", "b", "b", "c", "d"], None),  # the same file twice: dropped, read fine
])  # fmt: skip
def test_dicom_series_slices_are_checked(tmp_path, case, positions, uids, expected):
    from medvlp.datamodules.formats.dicom_series import read_series

    folder = tmp_path / "series"
    write_series(folder, positions, uids)
    if expected is None:
        assert read_series(folder).GetSize() == (16, 16, 4)
    else:
        raises_ours(rf"{folder}: {expected}", read_series, folder)


def test_single_slice_series_is_named_through_the_datamodule(tmp_path):
    from medvlp.datamodules.cq500 import CQ500Config, CQ500DataModule
    from medvlp.datamodules.demo.cq500 import write_cq500_fixture

    root = write_cq500_fixture(tmp_path / "CQ500")
    thin = root / "CQ500-CT-12/CQ500CT12 CQ500CT12/Unknown Study/CT PLAIN THIN"
    for f in sorted(thin.glob("*.dcm"))[1:]:
        f.unlink()
    dm = CQ500DataModule(CQ500Config(root=str(root), spacing=[], size=[], use_preprocessed="false"))
    rec = next(r for r in dm.records("test") if r.study_id == "CQ500-CT-12")
    raises_ours(r"CT PLAIN THIN: a single-slice volume \(shape \(1, 32, 32\)", dm.load_image, rec, False)


def test_non_finite_series_tensor_is_named(tmp_path):
    import torch

    from medvlp.datamodules.pub_brain5 import read_series_tensor

    t = torch.zeros(4, 5, 6)
    t[2, 3, 1] = float("inf")
    torch.save(t, tmp_path / "t1.pt")
    raises_ours(r"t1.pt: 1 non-finite value\(s\) \(NaN or inf; the first at \(d, h, w\) = \(2, 3, 1\)\)",
                read_series_tensor, tmp_path / "t1.pt")


# ============================================================================================ text / CSV
def _bytes_edit(old: bytes, new: bytes):
    def edit(path: Path) -> None:
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new, 1))
    return edit


def _columns_edit(fn):
    def edit(path: Path) -> None:
        fn(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)
    return edit


CSV_CASES = {  # reports CSV edit -> None (reads as the original) or the message expected
    "utf8_bom": (lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()), None),
    "crlf": (lambda p: p.write_bytes(p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")), None),
    "extra_column": (_columns_edit(lambda df: df.assign(Extra_EN="unused")), None),
    "missing_column": (_columns_edit(lambda df: df.drop(columns="Impressions_EN")),
                       r"train_reports.csv lacks the column\(s\) \['Impressions_EN'\]"),
    "renamed_column": (_columns_edit(lambda df: df.rename(columns={"Findings_EN": "Findings_En"})),
                       r"lacks the column\(s\) \['Findings_EN'\].*'Findings_En' instead of 'Findings_EN'"),
    "column_twice": (_bytes_edit(b"Impressions_EN", b"Findings_EN"), r"train_reports.csv names the column 'Findings_EN' twice"),
    "not_utf8": (_bytes_edit(b"Mild edema.", b"Mild \xe9dema."), r"train_reports.csv is not UTF-8 text \(line 3, byte 0xe9"),
    "row_twice": (lambda p: p.write_bytes(p.read_bytes() + p.read_bytes().splitlines(keepends=True)[1]),
                  r"train_reports.csv lists VolumeName train_1_a_1 more than once"),
    "empty_file": (lambda p: p.write_bytes(b""), r"train_reports.csv is empty \(no header line\)"),
    "malformed_row": (lambda p: p.write_bytes(p.read_bytes() + b"train_9_a_1.nii.gz,a,b,c,d,e,f,g\n"),
                      r"train_reports.csv is not a well-formed CSV table: .*line 5"),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_reports_csv_quirks_are_read_or_named(ct, case):
    baseline = ct_texts(ct)
    edit, expected = CSV_CASES[case]
    edit(ct / REPORTS_CSV)
    if expected is None:
        assert ct_texts(ct) == baseline
    else:
        raises_ours(expected, ct_texts, ct)


def test_label_values_other_than_0_1_are_named(ct):
    df = pd.read_csv(ct / LABELS_CSV, dtype=str, keep_default_na=False)
    df.loc[1, "Cardiomegaly"] = "2"
    df.to_csv(ct / LABELS_CSV, index=False)
    raises_ours(r"train_predicted_labels.csv has labels other than 0 / 1, e.g. \['2'\] \(VolumeName train_1_a_2\)",
                ct_texts, ct)


def test_empty_report_is_listed_by_id(ct):
    df = pd.read_csv(ct / REPORTS_CSV, dtype=str, keep_default_na=False)
    df.loc[df["VolumeName"] == "train_2_a_1.nii.gz", ["Findings_EN", "Impressions_EN"]] = ["", "Not given."]
    df.to_csv(ct / REPORTS_CSV, index=False)
    dm = ct_dm(ct)
    assert [r.study_id for r in dm.records("train")] == ["train_1_a"]
    (entry,) = dm.dropped
    assert (entry.split, entry.study_id) == ("train", "train_2_a_1") and "train_reports.csv row train_2_a_1.nii.gz" in entry.reason
    assert dm.dropped_summary() == {"count": 1, "by_split": {"train": 1}, "file": None}


def test_reconstructions_keep_their_own_reports(ct):
    rec = ct_dm(ct).records("train")[0]
    assert rec.study_id == "train_1_a" and len(set(rec.meta["texts"])) == 2  # train_1_a_2 says "Mild edema."
    assert [t.endswith("Mild edema.") for t in rec.meta["texts"]] == [False, True]


def test_missing_report_row_is_named_and_listed(ct):
    df = pd.read_csv(ct / REPORTS_CSV, dtype=str, keep_default_na=False)
    df[df["VolumeName"] != "train_2_a_1.nii.gz"].to_csv(ct / REPORTS_CSV, index=False)
    raises_ours(r"volume train_2_a_1 has no row in radiology_text_reports/train_reports.csv", ct_texts, ct)
    skip = ct_dm(ct, on_error="skip")
    assert len(skip.records("train")) == 1 and [d.study_id for d in skip.dropped] == ["train_2_a_1"]


MIMIC_TEXT = "no acute cardiopulmonary process lungs are well expanded and clear"


@pytest.mark.parametrize("case", ["crlf", "utf8_bom", "not_utf8", "missing", "too_short"])
def test_report_text_files(mimic, tmp_path, case):
    report = mimic / REPORT
    first = {r.study_id: r.text for r in mimic_dm(mimic).records("train")}["50000001"]
    assert first.startswith(MIMIC_TEXT)
    if case == "crlf":
        report.write_bytes(report.read_bytes().replace(b"\n", b"\r\n"))
    elif case == "utf8_bom":
        report.write_bytes(b"\xef\xbb\xbf" + report.read_bytes())
    elif case == "not_utf8":
        report.write_bytes(report.read_bytes().replace(b"clear", b"cl\xe9ar"))
    elif case == "missing":
        report.unlink()
    else:
        report.write_text(mimic_report(IMPRESSION="Normal."))
    if case in ("crlf", "utf8_bom"):
        assert {r.study_id: r.text for r in mimic_dm(mimic).records("train")}["50000001"] == first
        return
    if case == "not_utf8":
        raises_ours(rf"{report} is not UTF-8 text \(line \d+, byte 0xe9", mimic_dm(mimic).records, "train")
    elif case == "missing":
        raises_ours(rf"Report {report} does not exist.*reports_root", mimic_dm(mimic).records, "train")
    skip = mimic_dm(mimic, on_error="skip")
    assert "50000001" not in {r.study_id for r in skip.records("train")}
    assert [(d.split, d.study_id) for d in skip.dropped] == [("train", "50000001"), SHORT]
    assert str(report) in skip.dropped[0].reason


def test_mimic_label_csv_column_missing(mimic):
    path = mimic / "mimic-cxr-2.0.0-split.csv"
    pd.read_csv(path, dtype=str).drop(columns="split").to_csv(path, index=False)
    raises_ours(r"mimic-cxr-2.0.0-split.csv lacks the column\(s\) \['split'\]", mimic_dm(mimic).records, "train")


# ====================================================================================== dropped.csv
def test_dropped_csv_lists_build_and_load_time_items_once(ct, tmp_path):
    df = pd.read_csv(ct / REPORTS_CSV, dtype=str, keep_default_na=False)
    df.loc[df["VolumeName"] == "train_1_a_2.nii.gz", ["Findings_EN", "Impressions_EN"]] = ["", ""]
    df.to_csv(ct / REPORTS_CSV, index=False)  # build time: one reconstruction without text
    truncate(ct / V1.format(p=2, r=1))  # load time: unreadable
    dm = ct_dm(ct, on_error="skip")
    rows = run_epochs(dm, tmp_path / "run", epochs=3)
    assert [(r.split, r.study_id) for r in rows] == [("train", "train_1_a_2"), ("train", "train_2_a")]
    assert "is truncated" in rows[1].reason
    assert dm.dropped_summary() == {"count": 2, "by_split": {"train": 2}, "file": str(tmp_path / "run" / "dropped.csv")}
    path = write_dropped([("val", "x", "a\nmulti-line  reason"), ("val", "x", "a multi-line reason")], tmp_path / "d.csv")
    assert read_dropped(path) == [("val", "x", "a multi-line reason")]


# ======================================================================================== ---- config
# (configuration cases go here)
CONFIG_CASES = {
    # case: (command-line overrides, what the message must say)
    "unknown key": (["data.batch_sise=8"], r"Unknown config key 'data.batch_sise'.*Did you mean 'data.batch_size'"),
    "unknown section": (["datta.root=/x"], r"Unknown config section 'datta'.*Did you mean 'data'"),
    "wrong type": (["trainer.max_steps=many"], r"Config key 'trainer.max_steps'.*expects type int"),
    "value for a section": (["method.text_encoder=/some/dir"],
                            r"Config key 'method.text_encoder'.*is a section.*got the single value '/some/dir'.*"
                            r"method.text_encoder.model=/some/dir"),
    "negative batch size": (["data.batch_size=-1"], r"Config key 'data.batch_size' = -1 is out of range: expected > 0"),
    "negative learning rate": (["optim.lr=-1"], r"Config key 'optim.lr' = -1.0 is out of range: expected > 0"),
    "zero embedding size": (["method.embed_dim=0"], r"Config key 'method.embed_dim' = 0 is out of range: expected > 0"),
    "unknown choice": (["data.on_error=ignore"], r"Config key 'data.on_error'.*expected one of \['raise', 'skip'\]"),
    "fraction above one": (["data.label_fraction=1.5"], r"'data.label_fraction' = 1.5 is out of range: expected > 0 and <= 1"),
    "list item out of range": (["method.image_encoder.img_size=[0]"], r"'method.image_encoder.img_size' = \[0\].*for every item"),
    "no key=value": (["trainer.max_steps"], r"Override 'trainer.max_steps' is not of the form key=value"),
    "negative seed": (["run.seed=-1"], r"'run.seed' = -1 is out of range: expected >= 0 and <= 4294967295"),
    "augmentation out of range": (["data.aug_translate=2"], r"'data.aug_translate' = 2.0 is out of range: expected >= 0 and < 1"),
    "zero temperature": (["method.temperature=0"], r"'method.temperature' = 0.0 is out of range: expected > 0"),
    "unknown precision": (["trainer.precision=bf17-mixed"], r"'trainer.precision' = 'bf17-mixed' is not one of .*bf16-mixed"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_error_names_the_key(case, capsys, tmp_path):
    """A bad config value stops ``medvlp fit`` with one line naming the key, the value and what is expected,
    before anything is built or written (no run directory)."""
    from medvlp.cli import main

    overrides, expected = CONFIG_CASES[case]
    assert main(["fit", "--method", "clip", f"run.out_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err, re.S), err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_range_and_choice_checks_come_before_torch():
    """The data / trainer / optimiser / run fields are checked before torch is imported (within a second or
    two of typing the command)."""
    code = ("import sys\nfrom medvlp.cli import main\n"
            "codes = [main(['fit', '--method', 'clip', o]) for o in "
            "('data.batch_size=-1', 'optim.lr=-1', 'data.on_error=ignore', 'trainer.max_steps=-5')]\n"
            "print(codes, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split("]")[-1].strip() == "False" and res.stdout.startswith("[2, 2, 2, 2]"), res.stdout + res.stderr
