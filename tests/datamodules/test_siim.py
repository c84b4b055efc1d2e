"""SIIM-ACR Pneumothorax datamodule on the synthetic fixtures of specs/datasets.md §4.7 (every §4.8 trap)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from format_fixtures import write_siim_fixture

from medvlp.datamodules.base import DataError, DataRootError, RecordDataset
from medvlp.datamodules.demo.siim import SiimItem, write_siim
from medvlp.datamodules.siim import RleMask, SIIMConfig, SIIMPneumothoraxDataModule, read_rle_table
from medvlp.registry import DATAMODULES

SIZE = 32
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim1") / "siim"
    t0 = time.perf_counter()
    items = write_siim_fixture(root, stage=1)
    return root, {it.image_id: it for it in items}, time.perf_counter() - t0


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim2") / "siim"
    items = write_siim_fixture(root, stage=2)
    return root, {it.image_id: it for it in items}


def make(root, **kw) -> SIIMPneumothoraxDataModule:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("augment", False)
    return SIIMPneumothoraxDataModule(SIIMConfig(root=str(root), **kw))


def split_ids(dm) -> dict[str, list[str]]:
    return {s: [r.study_id for r in dm.records(s)] for s in SPLITS}


def all_records(dm):
    return {r.study_id: r for s in SPLITS for r in dm.records(s)}


def copy(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "siim"
    shutil.copytree(root, out)
    return out


def test_fixture_layout_small_fast(stage1, stage2, tmp_path):
    root, items, elapsed = stage1
    assert elapsed < 3.0
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1_000_000
    lines = (root / "train-rle.csv").read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels"  # the leading space of the original header
    assert any(line.endswith(", -1") for line in lines)  # ... and of the values
    assert len(lines) - 1 > len(items)  # several rows for some images
    for image_id in items:
        assert image_id.startswith("1.2.276.0.7230010.3.1.4.8323329.") and len(image_id.split(".")) == 12
        (path,) = root.glob(f"dicom-images-train/*/*/{image_id}.dcm")
        assert path.parent.name.startswith("1.2.276.0.7230010.3.1.3.") and path.parent.parent.name.startswith("1.2.276.0.7230010.3.1.2.")
    assert len(list(root.glob("dicom-images-test/*/*/*.dcm"))) == 1
    root2, _ = stage2
    assert (root2 / "stage_2_train.csv").read_text().splitlines()[0] == "ImageId,EncodedPixels"
    assert len(list((root2 / "stage_2_images").glob("*.dcm"))) == len(items) + 1
    write_siim_fixture(tmp_path / "again")
    assert (tmp_path / "again" / "train-rle.csv").read_bytes() == (root / "train-rle.csv").read_bytes()


def test_registered_yaml_and_config_checks():
    from medvlp.config import compose

    assert DATAMODULES.get("siim_pneumothorax") is SIIMPneumothoraxDataModule
    cfg = compose(data="siim_pneumothorax", sections=("data",), overrides=["data.root=/x"])
    assert cfg.data.task == "segmentation" and cfg.data.layout == "auto" and cfg.data.balance_train is True
    for key, value in (("task", "detection"), ("layout", "stage3"), ("voi", "yes")):
        with pytest.raises(ValueError, match=key):
            make("/x", **{key: value})


def test_check_root(stage1, tmp_path):
    root, _, _ = stage1
    SIIMPneumothoraxDataModule.check_root(SIIMConfig(root=str(root)))
    with pytest.raises(DataRootError, match="does not exist") as err:
        SIIMPneumothoraxDataModule.check_root(SIIMConfig(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value) and "dicom-images-train/<StudyInstanceUID>" in str(err.value)
    with pytest.raises(DataRootError, match="neither train-rle.csv .* nor stage_2_train.csv"):
        SIIMPneumothoraxDataModule.check_root(SIIMConfig(root=str(tmp_path)))
    with pytest.raises(DataRootError, match="has no stage_2_train.csv"):
        SIIMPneumothoraxDataModule.check_root(SIIMConfig(root=str(root), layout="stage2"))
    (tmp_path / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    with pytest.raises(DataRootError, match="no dicom-images-train/"):
        SIIMPneumothoraxDataModule.check_root(SIIMConfig(root=str(tmp_path)))


def test_header_and_values_are_normalised(stage1):
    root, items, _ = stage1
    df = read_rle_table(root / "train-rle.csv")
    assert list(df.columns) == ["ImageId", "EncodedPixels"]
    assert "-1" in set(df["EncodedPixels"]) and not df["EncodedPixels"].str.startswith(" ").any()


def test_records_labels_and_split_by_image(stage1):
    root, items, _ = stage1
    dm = make(root, balance_train=False)
    ids = split_ids(dm)
    assert [len(ids[s]) for s in SPLITS] == [8, 2, 2]  # 12 images: ceil(3.6) = 4 held out
    flat = [i for s in SPLITS for i in ids[s]]
    assert sorted(flat) == sorted(items)  # every image once: the 2- and 3-row images are not split
    # MGCA's 70/15/15 on the sorted ImageIds: (test, val) = split(hold-out, 0.5)
    order = np.array(sorted(items))
    perm, perm2 = np.random.RandomState(0).permutation(12), np.random.RandomState(0).permutation(4)
    assert ids["train"] == list(order[perm[4:]])
    assert ids["val"] == list(order[perm[:4]][perm2[:2]]) and ids["test"] == list(order[perm[:4]][perm2[2:]])
    assert split_ids(make(root, balance_train=False)) == ids
    assert split_ids(make(root, balance_train=False, split_seed=3)) != ids
    for image_id, rec in all_records(dm).items():
        it = items[image_id]
        assert rec.labels.tolist() == [float(len(it.masks) > 0)]
        assert rec.meta["n_rows"] == max(1, len(it.masks))
        assert isinstance(rec.mask, RleMask)
    assert dm.counts == {"unlisted_dicoms": 0, "bad_rle": 0, "missing_dicom": 0}


def test_balanced_train(stage1):
    root, items, _ = stage1
    full = make(root, balance_train=False)
    dm = make(root)  # balance_train=True is the default
    train = dm.records("train")
    pos = [r.study_id for r in train if r.labels[0] == 1]
    neg = [r.study_id for r in train if r.labels[0] == 0]
    all_train = full.records("train")
    assert len(pos) == len(neg) == sum(r.labels[0] == 1 for r in all_train)
    assert len(neg) < sum(r.labels[0] == 0 for r in all_train)
    assert set(pos) | set(neg) < {r.study_id for r in all_train}
    assert [r.study_id for r in train] == [r.study_id for r in make(root).records("train")]
    assert split_ids(dm)["val"] == split_ids(full)["val"]  # only train is balanced
    other = make(root, balance_seed=7).records("train")
    assert sum(r.labels[0] == 0 for r in other) == len(pos)  # another draw, still balanced


def test_masks_are_exact_union_of_rles(stage1):
    root, items, _ = stage1
    dm = make(root, image_size=64, balance_train=False)
    for image_id, rec in all_records(dm).items():
        it = items[image_id]
        h, w = it.image.shape
        truth = it.union()
        mask = rec.mask(h, w)
        assert mask.dtype == np.uint8 and np.array_equal(mask, truth)
        sample = dm.load_sample(rec, train=False)
        if (h, w) == (64, 64):
            assert torch.equal(sample["mask"], torch.as_tensor(truth))
        else:  # 48 rows: letterboxed with 8 rows of padding on top
            assert torch.equal(sample["mask"][8:56], torch.as_tensor(truth)) and sample["mask"][:8].sum() == 0
    multi = [i for i, it in items.items() if len(it.masks) >= 2]
    assert len(multi) == 2
    for image_id in multi:  # the union is more than any single row
        assert all(items[image_id].union().sum() > m.sum() for m in items[image_id].masks)


def test_stage2_and_unspaced_values_agree(stage1, stage2, tmp_path):
    root1, items, _ = stage1
    root2, _ = stage2
    dm1, dm2 = make(root1), make(root2)
    assert dm2.layout == "stage2"
    assert split_ids(dm1) == split_ids(dm2)
    assert dm2.counts["unlisted_dicoms"] == 1  # the unlabelled stage-2 test image, not an error
    for image_id, rec in all_records(dm2).items():
        h, w = items[image_id].image.shape
        assert np.array_equal(rec.mask(h, w), items[image_id].union())
    write_siim(tmp_path / "plain", list(items.values()), stage=1, spaced_values=False)
    assert ",-1" in (tmp_path / "plain" / "train-rle.csv").read_text()
    dm3 = make(tmp_path / "plain")
    assert split_ids(dm3) == split_ids(dm1)
    for image_id, rec in all_records(dm3).items():
        h, w = items[image_id].image.shape
        assert np.array_equal(rec.mask(h, w), items[image_id].union())


def test_monochrome1_and_jpeg(stage1):
    root, items, _ = stage1
    dm = make(root, image_size=64, balance_train=False)
    recs = all_records(dm)
    mono1 = next(i for i, it in items.items() if it.photometric == "MONOCHROME1")
    twin = next(i for i, it in items.items() if it.photometric == "MONOCHROME2" and it.image is items[mono1].image)
    a, b = dm.load_sample(recs[mono1], train=False), dm.load_sample(recs[twin], train=False)
    assert (a["image"] - b["image"]).abs().max() <= 4 / 255
    assert torch.equal(a["mask"], b["mask"])
    for img in (a["image"], b["image"]):
        assert img[0, :4, :4].mean() > img[0].mean() + 0.5  # the bright marker stays bright
    for image_id, it in items.items():
        gray = dm.read_pixels(recs[image_id], train=False)
        diff = np.abs(gray.astype(int) - it.image.astype(int))
        assert diff.mean() < 3 if it.transfer_syntax == "jpeg_baseline" else diff.max() == 0


def test_missing_unlisted_and_duplicate_dicoms(stage1, tmp_path, caplog):
    root, items, _ = stage1
    broken = copy(root, tmp_path)
    gone = sorted(items)[0]
    (path,) = broken.glob(f"dicom-images-train/*/*/{gone}.dcm")
    path.unlink()
    extra = broken / "dicom-images-train" / "1.2.3" / "1.2.4" / "1.2.276.0.7230010.3.1.4.8323329.1.1517875000.100001.dcm"
    extra.parent.mkdir(parents=True)
    shutil.copy(next(broken.glob("dicom-images-train/*/*/*.dcm")), extra)
    with pytest.raises(DataError, match=f"{gone}.dcm") as err:
        all_records(make(broken, balance_train=False))
    assert "train-rle.csv" in str(err.value) and "on_error=skip" in str(err.value)
    dm = make(broken, balance_train=False, on_error="skip")
    with caplog.at_level(logging.WARNING):
        recs = all_records(dm)
    assert gone not in recs and len(recs) == len(items) - 1
    assert dm.counts["missing_dicom"] == 1 and dm.counts["unlisted_dicoms"] == 1
    assert "1 DICOMs have no row" in caplog.text
    dup = broken / "dicom-images-train" / "x" / "y" / f"{sorted(items)[1]}.dcm"
    dup.parent.mkdir(parents=True)
    shutil.copy(next(broken.glob(f"dicom-images-train/1.*/*/{sorted(items)[1]}.dcm")), dup)
    with pytest.raises(DataError, match=f"same ImageId {sorted(items)[1]}"):
        make(broken, on_error="skip").records("train")


def test_corrupt_dicom_and_bad_rles(stage1, tmp_path, tiny_tokenizer):
    root, items, _ = stage1
    broken = copy(root, tmp_path)
    victim = next(i for i, it in items.items() if it.transfer_syntax == "jpeg_baseline" and it.masks)
    (path,) = broken.glob(f"dicom-images-train/*/*/{victim}.dcm")
    path.write_bytes(path.read_bytes()[:-400])
    dm = make(broken, balance_train=False)
    recs = all_records(dm)
    with pytest.raises(DataError, match=victim):
        dm.load_sample(recs[victim], train=False)
    skip = make(broken, balance_train=False, on_error="skip")
    skip.set_tokenizer(tiny_tokenizer)
    ds = RecordDataset(skip, list(all_records(skip).values()), train=False)
    batch = skip.collate([ds[i] for i in range(len(ds))])
    assert batch.skipped == 1 and victim not in batch.study_ids and batch.masks.shape[0] == len(items) - 1

    csv = broken / "train-rle.csv"
    text = csv.read_text()
    lines = text.splitlines()
    bad = next(i for i, line in enumerate(lines) if line.endswith(", -1"))
    bad_id = lines[bad].split(",")[0]
    lines[bad] = f"{bad_id}, 12 x 4"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"train-rle.csv line {bad + 1}: ImageId {bad_id}"):
        all_records(make(broken, balance_train=False))
    dm = make(broken, balance_train=False, on_error="skip")
    assert bad_id not in all_records(dm) and dm.counts["bad_rle"] == 1
    # an absolute (start, length) RLE is refused when the mask is decoded, naming the image
    lines[bad] = f"{bad_id}, 1000 30 2000 30 3500 30"
    csv.write_text("\n".join(lines) + "\n")
    rec = all_records(make(broken, balance_train=False))[bad_id]
    with pytest.raises(DataError, match=f"ImageId {bad_id} in .*train-rle.csv.*absolute"):
        rec.mask(64, 64)
    csv.write_text(text.replace("ImageId, EncodedPixels", "ImageId, Pixels", 1))
    with pytest.raises(DataError, match=r"train-rle.csv lacks the column\(s\) \['EncodedPixels'\]"):
        make(broken).records("train")


def test_generic_items_and_classification(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    m = np.zeros((40, 56), np.uint8)
    m[5:9, 30:41] = 1
    items = [SiimItem(f"1.2.276.0.7230010.3.1.4.8323329.{100 + i}.1517875100.{100100 + 3 * i}", img,
                      [m] if i % 2 else [], transfer_syntax="explicit") for i in range(8)]
    write_siim(tmp_path / "g", items, stage=2)
    dm = make(tmp_path / "g", task="classification", balance_train=False)
    recs = all_records(dm)
    assert len(recs) == 8 and all(r.mask is None for r in recs.values())
    assert "mask" not in dm.load_sample(next(iter(recs.values())), train=False)
    seg = all_records(make(tmp_path / "g", balance_train=False))
    assert np.array_equal(seg[items[1].image_id].mask(40, 56), m)
