"""Object-CXR datamodule on the synthetic fixture of specs/datasets.md §5.5."""

from __future__ import annotations

import logging
import math
import shutil
import time

import numpy as np
import pytest
import torch
from format_fixtures import write_object_cxr_fixture

from medvlp.datamodules.base import DataError, DataRootError, RecordDataset
from medvlp.datamodules.object_cxr import (
    ObjectCXRConfig,
    ObjectCXRDataModule,
    Shape,
    ShapeMask,
    parse_annotation,
    rasterise,
)
from medvlp.registry import DATAMODULES

SIZE = 32
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def ocxr(tmp_path_factory):
    root = tmp_path_factory.mktemp("ocxr") / "object-CXR"
    t0 = time.perf_counter()
    items = write_object_cxr_fixture(root)
    return root, {it.image_name.rsplit(".", 1)[0]: it for it in items}, time.perf_counter() - t0


def make(root, **kw) -> ObjectCXRDataModule:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("augment", False)
    return ObjectCXRDataModule(ObjectCXRConfig(root=str(root), **kw))


def all_records(dm):
    return {r.study_id: r for s in SPLITS for r in dm.records(s)}


def bbox(coords):
    return [min(coords[0::2]), min(coords[1::2]), max(coords[0::2]), max(coords[1::2])]


def test_fixture_small_fast(ocxr, tmp_path):
    root, items, elapsed = ocxr
    assert elapsed < 3.0
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1_000_000
    assert (root / "test.csv").read_text().splitlines()[:2] == ["image_path,annotation", "test/09001.jpg,0 30 30 50 40"]
    train = (root / "train.csv").read_text().splitlines()
    assert train[0] == "image_name,annotation" and "00002.jpg," in train
    assert any(line.count(";") == 2 and {"0", "1", "2"} <= {o[0] for o in line.split(",")[1].split(";")} for line in train)
    assert len({it.image.shape for it in items.values()}) == 6
    write_object_cxr_fixture(tmp_path / "again")
    assert (tmp_path / "again" / "train.csv").read_bytes() == (root / "train.csv").read_bytes()


def test_registered_yaml_and_config_checks():
    from medvlp.config import compose

    assert DATAMODULES.get("object_cxr") is ObjectCXRDataModule
    cfg = compose(data="object_cxr", sections=("data",), overrides=["data.root=/x", "data.split_protocol=official"])
    assert cfg.data.task == "detection" and cfg.data.split_protocol == "official"
    for key, value in (("task", "boxes"), ("split_protocol", "benchx")):
        with pytest.raises(ValueError, match=key):
            make("/x", **{key: value})


def test_check_root(ocxr, tmp_path):
    root, _, _ = ocxr
    ObjectCXRDataModule.check_root(ObjectCXRConfig(root=str(root), split_protocol="official"))
    with pytest.raises(DataRootError, match="does not exist") as err:
        ObjectCXRDataModule.check_root(ObjectCXRConfig(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value) and "train/00001.jpg" in str(err.value)
    broken = tmp_path / "b"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "test")
    ObjectCXRDataModule.check_root(ObjectCXRConfig(root=str(broken)))  # mgca needs no test/
    with pytest.raises(DataRootError, match="has no test/ folder"):
        ObjectCXRDataModule.check_root(ObjectCXRConfig(root=str(broken), split_protocol="official"))
    (broken / "dev.csv").unlink()
    with pytest.raises(DataRootError, match="has no dev.csv"):
        ObjectCXRDataModule.check_root(ObjectCXRConfig(root=str(broken)))


def test_parse_annotation():
    assert parse_annotation(float("nan")) == [] and parse_annotation("") == [] and parse_annotation(None) == []
    shapes = parse_annotation("0 1140 1563 1214 1633;2 1004 1302 1020 1298 1029 1310 1012 1319;")
    assert shapes == [Shape(0, (1140, 1563, 1214, 1633)), Shape(2, (1004, 1302, 1020, 1298, 1029, 1310, 1012, 1319))]
    assert shapes[1].box() == (1004, 1298, 1029, 1319)  # the polygon's bounding box
    assert parse_annotation("1 40 60 10 20")[0].box() == (10, 20, 40, 60)  # corners in any order
    for bad, match in (("3 1 2 3 4", "type 3"), ("0 1 2 3", "expected 4"), ("2 1 2 3 4", "at least 3 points"),
                       ("0 1 2 a 4", "not a number"), ("2 1 2 3 4 5 6 7", "pairs")):
        with pytest.raises(ValueError, match=match):
            parse_annotation(bad)


def test_rasterise_shapes():
    rect = rasterise([Shape(0, (2, 3, 6, 5))], 8, 8)
    assert rect[3:5, 2:6].all() and rect.sum() == 8
    ell = rasterise([Shape(1, (0, 0, 10, 6))], 8, 12)
    assert ell[3, 5] and ell[2:4, 0:10].any() and not ell[0, 0] and not ell[0, 9] and not ell[7].any()
    assert abs(int(ell.sum()) - math.pi * 5 * 3) < 3  # ~ pi * a * b
    tri = rasterise([Shape(2, (10, 10, 40, 12, 25, 40))], 48, 48)
    assert tri[20, 25] and not tri[38, 11] and not tri[11, 38] and not tri[9].any()
    area = 0.5 * abs((40 - 10) * (40 - 10) - (25 - 10) * (12 - 10))
    assert abs(tri.sum() - area) < 0.1 * area
    half = rasterise([Shape(0, (2, 3, 6, 5))], 4, 4, sx=0.5, sy=0.5)
    assert half[1, 1:3].all() and half.sum() == 2  # (1, 1.5, 3, 2.5): row centres 1.5 in, 2.5 out
    union = rasterise([Shape(0, (0, 0, 4, 4)), Shape(0, (2, 2, 6, 6))], 8, 8)
    assert union.max() == 1 and union.sum() == 16 + 16 - 4


def test_splits(ocxr):
    root, items, _ = ocxr
    dm = make(root)
    ids = {s: [r.study_id for r in dm.records(s)] for s in SPLITS}
    train_csv = [f"{i:05d}" for i in range(1, 11)]
    perm = np.random.RandomState(0).permutation(10)  # MGCA: train_test_split(train.csv, 0.1, random_state=0)
    assert ids["val"] == [train_csv[perm[0]]] and ids["train"] == [train_csv[i] for i in perm[1:]]
    assert ids["test"] == ["08001", "08002", "08003"]  # dev.csv is MGCA's test
    assert ids == {s: [r.study_id for r in make(root).records(s)] for s in SPLITS}
    assert {s: [r.study_id for r in make(root, split_seed=5).records(s)] for s in SPLITS} != ids
    official = make(root, split_protocol="official")
    assert [r.study_id for r in official.records("train")] == train_csv
    assert [r.study_id for r in official.records("val")] == ["08001", "08002", "08003"]
    test = official.records("test")
    assert [r.study_id for r in test] == ["09001", "09002"] and test[0].image_path == str(root / "test" / "09001.jpg")


def test_labels_and_boxes(ocxr):
    root, items, _ = ocxr
    recs = all_records(make(root, split_protocol="official"))
    assert len(recs) == len(items)
    for study, rec in recs.items():
        it = items[study]
        assert rec.labels.tolist() == [float(bool(it.objects))]
        assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (len(it.objects), 4)
        assert rec.boxes.tolist() == [bbox(c) for _, c in it.objects]  # original pixels
        assert rec.box_labels.tolist() == [0] * len(it.objects)
        assert rec.meta["shape_types"] == [t for t, _ in it.objects]
    assert recs["00001"].meta["shape_types"] == [0, 1, 2]
    assert recs["00002"].boxes.shape == (0, 4)  # empty annotation (NaN after reading)


def test_load_sample_boxes_and_masks_after_resize(ocxr):
    root, items, _ = ocxr
    dm = make(root, split_protocol="official")
    recs = all_records(dm)
    rec = recs["00001"]  # 96 wide x 72 high; the JPEG decodes at 48 x 36 (DCT scaling), boxes follow
    assert dm.read_pixels(rec, train=False).shape == (36, 48)
    sample = dm.load_sample(rec, train=False)
    # 96 x 72 -> 32 x 24 (scale 1/3), 4 rows of padding on top
    expected = [[x1 / 3, y1 / 3 + 4, x2 / 3, y2 / 3 + 4] for x1, y1, x2, y2 in rec.boxes.tolist()]
    np.testing.assert_allclose(sample["boxes"].numpy(), expected, atol=1e-4)
    assert sample["image"].shape == (3, SIZE, SIZE)
    full = make(root, split_protocol="official", image_size=96)  # no downscaling: identity in x, 12 rows of pad
    sample = full.load_sample(full.records("train")[0], train=False)
    np.testing.assert_allclose(sample["boxes"].numpy(), rec.boxes + np.array([0, 12, 0, 12]), atol=1e-5)

    seg = make(root, split_protocol="official", task="segmentation", image_size=96)
    srecs = all_records(seg)
    for study, r in srecs.items():
        it = items[study]
        h, w = it.image.shape
        assert isinstance(r.mask, ShapeMask) and r.boxes is None
        truth = rasterise([Shape(t, tuple(c)) for t, c in it.objects], h, w)
        assert np.array_equal(r.mask(h, w), truth)
        assert truth.any() == bool(it.objects)
    m = seg.load_sample(srecs["00001"], train=False)["mask"]
    assert m.shape == (96, 96) and torch.equal(m[12:84], torch.as_tensor(srecs["00001"].mask(72, 96)))
    small = make(root, split_protocol="official", task="segmentation").load_sample(srecs["00001"], train=False)["mask"]
    assert small.shape == (SIZE, SIZE) and small[:4].sum() == 0 and small[4:28].sum() > 0
    assert abs(small.sum().item() - m.sum().item() / 9) < 0.2 * m.sum().item() / 9


def test_missing_corrupt_and_malformed(ocxr, tmp_path, caplog, tiny_tokenizer):
    root, items, _ = ocxr
    broken = tmp_path / "b"
    shutil.copytree(root, broken)
    (broken / "dev" / "08002.jpg").unlink()
    with pytest.raises(DataError, match="08002.jpg") as err:
        make(broken).records("test")
    assert "dev.csv" in str(err.value) and "on_error=skip" in str(err.value)
    dm = make(broken, on_error="skip")
    with caplog.at_level(logging.WARNING):
        assert [r.study_id for r in dm.records("test")] == ["08001", "08003"]
    assert dm.counts["missing_image"] == 1 and "skipped 1 of 3" in caplog.text
    path = broken / "train" / "00003.jpg"
    path.write_bytes(path.read_bytes()[:40])
    rec = all_records(make(broken, on_error="skip"))["00003"]
    with pytest.raises(DataError, match="00003.jpg"):
        make(broken).load_sample(rec, train=False)
    skip = make(broken, on_error="skip")
    skip.set_tokenizer(tiny_tokenizer)
    ds = RecordDataset(skip, list(all_records(skip).values()), train=False)
    batch = skip.collate([ds[i] for i in range(len(ds))])
    assert batch.skipped == 1 and "00003" not in batch.study_ids

    csv = broken / "train.csv"
    text = csv.read_text()
    csv.write_text(text.replace("00005.jpg,2 10 10 40 12 25 40", "00005.jpg,2 10 10 40 12"))
    with pytest.raises(DataError, match=r"train.csv, image 00005.jpg: object 0 \(polygon\)"):
        make(broken).records("train")
    dm = make(broken, on_error="skip")
    assert "00005" not in all_records(dm) and dm.counts["bad_annotation"] == 1
    csv.write_text(text.replace("image_name,annotation", "image_name,objects", 1))
    with pytest.raises(DataError, match="train.csv lacks the column 'annotation'"):
        make(broken).records("train")
    csv.write_text(text)
    (broken / "test.csv").write_text("image_path\ntest/09001.jpg\n")
    with pytest.raises(DataError, match="test.csv lacks the column 'annotation'.*split_protocol=mgca"):
        make(broken, split_protocol="official").records("test")


def test_dataloader(ocxr, tiny_tokenizer):
    root, _, _ = ocxr
    dm = make(root, batch_size=4, augment=True)
    dm.set_tokenizer(tiny_tokenizer)
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (4, 3, SIZE, SIZE) and len(batch.boxes) == 4 and batch.labels.shape == (4, 1)
    for boxes in batch.boxes:
        assert boxes.shape[1] == 4 and (boxes >= 0).all() and (boxes <= SIZE).all()
    assert math.isfinite(batch.images.sum().item())
