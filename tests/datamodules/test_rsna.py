"""RSNA Pneumonia datamodule on the synthetic fixture of specs/datasets.md §3.7 (every §3.8 trap)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from format_fixtures import write_rsna_fixture

from medvlp.batch import ImageTextBatch
from medvlp.datamodules.base import DataError, DataRootError, RecordDataset
from medvlp.datamodules.rsna import (
    BoxMask,
    RSNAConfig,
    RSNAPneumoniaDataModule,
    fill_boxes,
    mgca_split,
)
from medvlp.registry import DATAMODULES

SIZE = 32


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna") / "rsna-pneumonia-detection-challenge"
    t0 = time.perf_counter()
    items = write_rsna_fixture(root)
    elapsed = time.perf_counter() - t0
    return root, {it.patient_id: it for it in items}, elapsed


def make(root, **kw) -> RSNAPneumoniaDataModule:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("augment", False)
    return RSNAPneumoniaDataModule(RSNAConfig(root=str(root), **kw))


def all_records(dm):
    return {r.study_id: r for split in ("train", "val", "test") for r in dm.records(split)}


def test_fixture_small_fast_deterministic(rsna, tmp_path):
    root, items, elapsed = rsna
    assert elapsed < 3.0
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1_000_000
    again = write_rsna_fixture(tmp_path / "again")
    assert [it.patient_id for it in again] == list(items)
    for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (root / name).read_bytes()
    labels = (root / "stage_2_train_labels.csv").read_text().splitlines()
    assert labels[0] == "patientId,x,y,width,height,Target"
    assert any(line.endswith(",,,,,0") for line in labels)  # blank coordinates for negatives
    assert any(",320.0,480.0,168.0,244.0,1" in line for line in labels)  # 1024-px floats
    classes = (root / "stage_2_detailed_class_info.csv").read_text().splitlines()
    assert len(classes) == len(labels)  # duplicated per box


def test_registered_and_yaml():
    from medvlp.config import compose

    assert DATAMODULES.get("rsna_pneumonia") is RSNAPneumoniaDataModule
    cfg = compose(data="rsna_pneumonia", sections=("data",), overrides=["data.root=/x", "data.task=detection"])
    assert cfg.data.name == "rsna_pneumonia" and cfg.data.task == "detection"
    assert cfg.data.split_protocol == "auto" and cfg.data.split_seed == 0
    for key, value in (("task", "detect"), ("split_protocol", "mgca"), ("voi", "on"), ("channels", 2)):
        with pytest.raises(ValueError, match=key):
            make("/x", **{key: value})


def test_check_root(rsna, tmp_path):
    root, _, _ = rsna
    RSNAPneumoniaDataModule.check_root(RSNAConfig(root=str(root)))
    with pytest.raises(DataRootError, match="does not exist") as err:
        RSNAPneumoniaDataModule.check_root(RSNAConfig(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value) and "stage_2_train_images/<patientId>.dcm" in str(err.value)
    with pytest.raises(DataRootError, match="stage_2_train_labels.csv") as err:
        RSNAPneumoniaDataModule.check_root(RSNAConfig(root=str(tmp_path)))
    assert "stage_2_detailed_class_info.csv" in str(err.value)  # the layout is printed


def test_records_labels_and_meta(rsna):
    root, items, _ = rsna
    dm = make(root)
    recs = all_records(dm)
    assert sorted(recs) == sorted(items)  # one record per image, however many boxes
    assert dm.label_names == ["Pneumonia"]
    for pid, rec in recs.items():
        it = items[pid]
        assert rec.labels.dtype == np.float32 and rec.labels.tolist() == [float(len(it.box_array()) > 0)]
        assert rec.meta["class"] == it.cls() and rec.meta["n_boxes"] == len(it.box_array())
        assert rec.boxes is None and rec.mask is None  # classification: label only
        assert Path(rec.image_path) == root / "stage_2_train_images" / f"{pid}.dcm"
    assert sorted(r.meta["n_boxes"] for r in recs.values())[-2:] == [2, 4]
    assert dm.counts == {"unlisted_dicoms": 0, "missing_dicom": 0, "unreadable_dicom": 0}


def test_splits_by_image_and_deterministic(rsna):
    root, items, _ = rsna
    dm = make(root)
    ids = {s: [r.study_id for r in dm.records(s)] for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [7, 2, 1]  # ceil(0.3 * 10) = 3 held out
    assert set().union(*map(set, ids.values())) == set(items) and sum(map(len, ids.values())) == len(items)
    # MGCA: groupby(patientId) sorts; train_test_split(0.3, 0), then (test, val) = split(0.5, 0)
    order = np.array(sorted(items))
    perm = np.random.RandomState(0).permutation(10)
    held = order[perm[:3]]
    perm2 = np.random.RandomState(0).permutation(3)  # ceil(0.5 * 3) = 2 -> val; the first 1 -> test
    assert ids["train"] == list(order[perm[3:]])
    assert ids["val"] == list(held[perm2[:2]]) and ids["test"] == list(held[perm2[2:]])
    assert ids == {s: [r.study_id for r in make(root).records(s)] for s in ids}
    other = {s: [r.study_id for r in make(root, split_seed=1).records(s)] for s in ids}
    assert other != ids


def test_split_protocols():
    cls = mgca_split(26684, 0.3, 0)
    assert [len(cls[s]) for s in ("train", "val", "test")] == [18678, 4003, 4003]
    det = mgca_split(26684, int(round(26684 * 10674 / 26684)), 0)
    assert [len(det[s]) for s in ("train", "val", "test")] == [16010, 5337, 5337]  # MGCA's 2 x 5337
    every = np.concatenate([det["train"], det["val"], det["test"]])
    assert np.array_equal(np.sort(every), np.arange(26684))
    assert make("/x").protocol == "mgca_cls"
    assert make("/x", task="detection").protocol == "mgca_det"
    assert make("/x", task="segmentation").protocol == "mgca_det"
    assert make("/x", task="detection", split_protocol="mgca_cls").protocol == "mgca_cls"


def test_label_fractions_of_classification_and_detection_are_separate_files(rsna, tmp_path, monkeypatch):
    """The two tasks have different train splits (mgca_cls / mgca_det): a 10 % file drawn for classification
    is not read back for detection (which used to fail with "drawn with other settings")."""
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    root, _, _ = rsna
    cls, det = make(root, label_fraction=0.5), make(root, task="detection", label_fraction=0.5)
    assert cls.split_key() != det.split_key()
    n_cls, n_det = len(cls.records("train")), len(det.records("train"))
    assert n_cls and n_det and len(list((tmp_path / "cache").rglob("*.txt"))) == 2
    assert {r.study_id for r in make(root, task="segmentation", label_fraction=0.5).records("train")} == \
        {r.study_id for r in det.records("train")}  # segmentation shares detection's split and its file


def test_detection_boxes_in_dicom_frame(rsna):
    root, items, _ = rsna
    recs = all_records(make(root, task="detection"))
    for pid, rec in recs.items():
        expected = items[pid].box_array()  # image pixels; the CSV holds them x 1024 / size
        assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (len(expected), 4)
        np.testing.assert_allclose(rec.boxes, expected, atol=1e-4)
        assert rec.box_labels.tolist() == [0] * len(expected)
        assert rec.mask is None
    non_square = [p for p, it in items.items() if it.image.shape == (48, 64) and len(it.box_array())]
    assert recs[non_square[0]].boxes.tolist() == [[12.0, 9.0, 24.0, 30.0]]  # x / 16, y / 21.33


def test_load_sample_boxes_after_resize(rsna):
    root, items, _ = rsna
    dm = make(root, task="detection")
    recs = all_records(dm)
    wide = next(p for p, it in items.items() if it.image.shape == (48, 64) and len(it.box_array()))
    sample = dm.load_sample(recs[wide], train=False)
    # 64 wide x 48 high -> scale 0.5 -> 32 x 24, 4 rows of padding on top
    assert sample["boxes"].tolist() == [[6.0, 8.5, 12.0, 19.0]]
    assert sample["box_labels"].tolist() == [0]
    four = next(p for p, it in items.items() if len(it.box_array()) == 4)
    sample = dm.load_sample(recs[four], train=False)
    np.testing.assert_allclose(sample["boxes"].numpy(), items[four].box_array() / 2, atol=1e-5)
    neg = next(p for p, it in items.items() if not len(it.box_array()))
    sample = dm.load_sample(recs[neg], train=False)
    assert sample["boxes"].shape == (0, 4) and sample["box_labels"].shape == (0,)
    torch.manual_seed(0)
    aug = make(root, task="detection", augment=True).load_sample(recs[four], train=True)
    assert aug["boxes"].shape == (4, 4) and (aug["boxes"] >= 0).all() and (aug["boxes"] <= SIZE).all()


def test_segmentation_masks_are_filled_boxes(rsna):
    root, items, _ = rsna
    dm = make(root, task="segmentation", image_size=64)
    for pid, rec in all_records(dm).items():
        it = items[pid]
        h, w = it.image.shape
        assert isinstance(rec.mask, BoxMask) and rec.boxes is None
        expected = np.zeros((h, w), np.uint8)
        for x1, y1, x2, y2 in it.box_array():
            expected[int(np.ceil(y1 - 0.5)):int(np.ceil(y2 - 0.5)), int(np.ceil(x1 - 0.5)):int(np.ceil(x2 - 0.5))] = 1
        assert np.array_equal(rec.mask(h, w), expected)
        if (h, w) == (64, 64):  # identity geometry at image_size=64
            assert torch.equal(dm.load_sample(rec, train=False)["mask"], torch.as_tensor(expected))
    frac = fill_boxes(np.array([[20, 30, 30.5, 45.25]]), 64, 64)
    assert frac[30:45, 20:30].all() and frac.sum() == 15 * 10  # pixel centres inside


def test_monochrome1_and_jpeg(rsna):
    root, items, _ = rsna
    dm = make(root, image_size=64)
    recs = all_records(dm)
    mono1 = next(p for p, it in items.items() if it.photometric == "MONOCHROME1")
    twin = next(p for p, it in items.items() if it.photometric == "MONOCHROME2" and it.image is items[mono1].image)
    a, b = dm.load_image(recs[mono1], train=False), dm.load_image(recs[twin], train=False)
    assert (a - b).abs().max() <= 2 / 255 * 2  # normalised by 0.5: two gray levels at most
    for img in (a, b):
        assert img[0, :4, :4].mean() > img[0].mean() + 0.5  # the bright marker stays bright (dense = bright)
    for pid, it in items.items():
        gray = dm.read_pixels(recs[pid], train=False)
        diff = np.abs(gray.astype(int) - it.image.astype(int))
        if it.transfer_syntax == "jpeg_baseline":
            assert diff.mean() < 3
        else:
            assert diff.max() == 0  # explicit VR, min-max is the identity on the fixture's 0..255 pixels


def test_missing_and_unlisted_dicoms(rsna, tmp_path, caplog):
    root, items, _ = rsna
    broken = tmp_path / "rsna"
    shutil.copytree(root, broken)
    gone = next(iter(items))
    (broken / "stage_2_train_images" / f"{gone}.dcm").unlink()
    (broken / "stage_2_train_images" / "00000000-0000-4000-8000-000000000000.dcm").write_bytes(b"x")
    with pytest.raises(DataError, match=f"{gone}.dcm") as err:
        all_records(make(broken))
    assert "on_error=skip" in str(err.value)
    dm = make(broken, on_error="skip")
    with caplog.at_level(logging.WARNING):
        recs = all_records(dm)
    assert gone not in recs and len(recs) == len(items) - 1
    assert dm.counts["missing_dicom"] == 1 and dm.counts["unlisted_dicoms"] == 1
    assert "skipped 1 of" in caplog.text


def test_corrupt_dicom(rsna, tmp_path, tiny_tokenizer):
    root, items, _ = rsna
    broken = tmp_path / "rsna"
    shutil.copytree(root, broken)
    pid = next(p for p, it in items.items() if len(it.box_array()) == 4)
    path = broken / "stage_2_train_images" / f"{pid}.dcm"
    path.write_bytes(path.read_bytes()[:300])
    recs = all_records(make(broken))
    with pytest.raises(DataError, match=pid):
        make(broken).load_image(recs[pid], train=False)
    with pytest.raises(DataError, match=pid):  # detection reads Rows/Columns when building
        all_records(make(broken, task="detection"))
    dm = make(broken, task="detection", on_error="skip")
    assert pid not in all_records(dm) and dm.counts["unreadable_dicom"] == 1
    dm = make(broken, on_error="skip")
    dm.set_tokenizer(tiny_tokenizer)
    ds = RecordDataset(dm, list(all_records(dm).values()), train=False)
    batch = dm.collate([ds[i] for i in range(len(ds))])
    assert batch.skipped == 1 and len(batch) == len(ds) - 1 and pid not in batch.study_ids


def test_malformed_csvs(rsna, tmp_path):
    root, items, _ = rsna
    broken = tmp_path / "rsna"
    shutil.copytree(root, broken)
    labels = broken / "stage_2_train_labels.csv"
    text = labels.read_text()
    labels.write_text(text.replace(",Target", ",Label", 1))
    with pytest.raises(DataError, match=r"stage_2_train_labels.csv lacks the column\(s\) \['Target'\]"):
        make(broken).records("train")
    lines = text.splitlines()
    positive = next(i for i, line in enumerate(lines) if line.endswith(",1"))
    pid = lines[positive].split(",")[0]
    lines[positive] = f"{pid},,,,,1"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"line {positive + 1} .*{pid}.*blank coordinate"):
        make(broken).records("train")
    labels.write_text(text)
    (broken / "stage_2_detailed_class_info.csv").write_text("patientId,klass\n")
    with pytest.raises(DataError, match="stage_2_detailed_class_info.csv lacks"):
        make(broken).records("train")
    (broken / "stage_2_detailed_class_info.csv").unlink()  # optional: records carry no class then
    assert all(r.meta["class"] is None for r in make(broken).records("train"))


def test_dataloaders_collate_targets(rsna, tiny_tokenizer):
    root, _, _ = rsna
    dm = make(root, task="detection", eval_batch_size=8)
    dm.set_tokenizer(tiny_tokenizer)
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, ImageTextBatch) and batch.images.shape == (2, 3, SIZE, SIZE)
    assert batch.labels.shape == (2, 1) and len(batch.boxes) == 2 and batch.masks is None
    assert all(b.shape[1] == 4 for b in batch.boxes)
    dm = make(root, task="segmentation", batch_size=4)
    dm.set_tokenizer(tiny_tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert batch.masks.shape == (4, SIZE, SIZE) and batch.masks.dtype == torch.uint8 and batch.boxes is None
