"""The downstream demo worlds (CheXpert, RSNA, SIIM, NIH14) read back through the real loaders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medvlp import api
from medvlp import config as C
from medvlp.datamodules.demo.downstream import KINDS, write_downstream


def _dm(data: str, *overrides: str):
    cfg = C.compose(method="clip", data=data, overrides=["data.demo_size=tiny", *overrides])
    api.resolve_data_root(cfg)
    return api.build_datamodule(cfg), Path(cfg.data.root)


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes(tmp_path, kind):
    a = write_downstream(kind, tmp_path / "a", 12, seed=3)
    b = write_downstream(kind, tmp_path / "b", 12, seed=3)
    assert a == b and _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_rsna_demo_boxes_follow_consolidation_and_dicoms_vary():
    dm, root = _dm("demo_rsna", "data.task=detection")
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    assert len(recs) == 40
    pos = [r for r in recs if r.labels[0] == 1]
    assert pos and all(len(r.boxes) == 1 for r in pos) and all(len(r.boxes) == 0 for r in recs if r.labels[0] == 0)
    x1, y1, x2, y2 = pos[0].boxes[0]
    assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128  # the DICOM's own pixel frame
    files = sorted((root / "stage_2_train_images").glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert "1.2.840.10008.1.2.4.50" in {str(h.file_meta.TransferSyntaxUID) for h in headers}


def test_rsna_demo_box_brighter_than_its_surroundings():
    dm, _ = _dm("demo_rsna", "data.task=detection")
    rec = next(r for r in dm.records("train") if r.labels[0] == 1)
    img = dm.read_pixels(rec, train=False).astype(float)
    x1, y1, x2, y2 = (int(round(v)) for v in rec.boxes[0])
    inside = img[y1:y2, x1:x2].mean()
    mirrored = img[y1:y2, img.shape[1] - x2 : img.shape[1] - x1].mean()  # same zone, other lung
    assert inside > mirrored + 5


def test_siim_demo_masks_mark_pneumothorax():
    dm, _ = _dm("demo_siim")
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    pos = [r for r in recs if r.labels[0] == 1]
    assert pos and len(pos) < len(recs)
    for r in recs[:10]:
        m = r.mask(128, 128)
        assert (m.sum() > 0) == (r.labels[0] == 1)
    sample = dm.load_sample(pos[0], train=False)
    assert sample["mask"].shape == (64, 64) and sample["mask"].sum() > 0


def test_chexpert_and_nih_demo_labels():
    dm, _ = _dm("demo_chexpert")
    train = dm.records("train")
    labels = np.stack([r.labels for r in train])
    assert labels.shape[1] == 5 and np.nanmax(labels) == 1 and np.nanmin(labels) == 0
    assert all(not np.isnan(r.labels).any() for r in dm.records("test"))
    dm, _ = _dm("demo_nih14")
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    nodule = dm.label_names.index("Nodule")
    with_boxes = [r for r in recs if r.boxes is not None and len(r.boxes)]
    assert with_boxes and all(r.labels[nodule] == 1 for r in with_boxes)


def test_covidx_and_object_cxr_demo():
    dm, _ = _dm("demo_covidx")
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    assert dm.label_names == ["normal", "pneumonia", "COVID-19"]
    assert np.stack([r.labels for r in recs]).sum(0).min() >= 10  # all three classes, balanced
    dm, _ = _dm("demo_object_cxr")
    recs = [r for s in ("train", "val", "test") for r in dm.records(s)]
    with_objects = [r for r in recs if r.labels[0] == 1]
    assert len(with_objects) == len(recs) // 2 and all(len(r.boxes) >= 1 for r in with_objects)
    rec = with_objects[0]
    from PIL import Image

    img = np.asarray(Image.open(rec.image_path).convert("L"))  # boxes are in the file's pixels
    x1, y1, x2, y2 = (int(round(v)) for v in rec.boxes[0])
    assert img[y1:y2, x1:x2].mean() > img.mean() + 60  # radio-opaque
