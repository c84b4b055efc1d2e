"""NIH ChestX-ray14 datamodule on the synthetic fixture of specs/datasets.md §7.7."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from format_fixtures import nih14_fixture_items, write_nih14_fixture

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.demo.nih14 import NIHItem, write_nih14
from medvlp.datamodules.nih14 import BOX_LABELS, LABELS, NIH14Config, NIH14DataModule, multi_hot
from medvlp.registry import DATAMODULES

SIZE = 32  # fixture images are 64 wide x 48 high: scale 0.5, 4 rows of padding on top


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_nih14_fixture(tmp_path_factory.mktemp("nih") / "ChestXray-NIHCC")


def make(root, **kw) -> NIH14DataModule:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("augment", False)
    return NIH14DataModule(NIH14Config(root=str(root), **kw))


def ids(records) -> list[str]:
    return [r.study_id for r in records]


def copy_of(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(root, out)
    return out


def test_registered_and_check_root(root, tmp_path):
    assert DATAMODULES.get("nih14") is NIH14DataModule
    assert NIH14DataModule.box_label_names == BOX_LABELS
    t0 = time.perf_counter()
    NIH14DataModule.check_root(NIH14Config(root=str(root)))
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(DataRootError, match="does not exist") as err:
        NIH14DataModule.check_root(NIH14Config(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value) and "images_001/images/00000001_000.png" in str(err.value)
    copy = copy_of(root, tmp_path)
    (copy / "BBox_List_2017.csv").unlink()
    NIH14DataModule.check_root(NIH14Config(root=str(copy)))  # boxes are optional ...
    with pytest.raises(DataRootError, match=r"BBox_List_2017.csv \(data.boxes_only=true\)"):
        NIH14DataModule.check_root(NIH14Config(root=str(copy), boxes_only=True))  # ... unless asked for
    (copy / "test_list.txt").unlink()
    with pytest.raises(DataRootError, match="has no test_list.txt"):
        NIH14DataModule.check_root(NIH14Config(root=str(copy)))
    (copy / "Data_Entry_2017_v2020.csv").unlink()
    NIH14DataModule.check_root(NIH14Config(root=str(copy), split_protocol="random"))  # auto: the 2017 file
    (copy / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DataRootError, match="Data_Entry_2017_v2020.csv nor Data_Entry_2017.csv"):
        NIH14DataModule.check_root(NIH14Config(root=str(copy)))


def test_official_splits_patient_disjoint(root):
    dm = make(root)
    train, val, test = dm.records("train"), dm.records("val"), dm.records("test")
    assert ids(test) == ["00000006_000", "00000006_001", "00000007_000", "00000008_000"]
    assert sorted(ids(train) + ids(val)) == ["00000001_000", "00000001_001", "00000001_002", "00000002_000",
                                             "00000003_000", "00000004_000", "00000005_000"]  # fmt: skip
    assert len(val) >= 1 and not ({r.meta["patient_id"] for r in train} & {r.meta["patient_id"] for r in val})
    assert "00000009_000" not in ids(train + val + test)  # in no list
    assert ids(make(root, val_seed=0).records("val")) == ids(val)  # fixed seed
    assert all(Path(r.image_path).is_file() and r.text == "" for r in train + val + test)
    folders = {Path(r.image_path).parent.relative_to(root).as_posix() for r in train + val + test}
    assert {"images", "images_001/images", "images_002/images"} <= folders  # both nestings found


def test_labels_multi_hot_and_both_file_variants(root, tmp_path):
    idx = {n: i for i, n in enumerate(LABELS)}
    v2020 = {r.study_id: r for s in ("train", "val", "test") for r in make(root).records(s)}
    lab = v2020["00000001_001"].labels
    assert lab.dtype == np.float32 and lab.shape == (14,) and lab.sum() == 2
    assert lab[idx["Effusion"]] == 1 and lab[idx["Infiltration"]] == 1
    assert v2020["00000001_002"].labels.sum() == 0  # No Finding = all zero
    assert v2020["00000004_000"].labels[idx["Pleural_Thickening"]] == 1 and v2020["00000004_000"].meta["view"] == "AP"
    assert v2020["00000001_000"].meta["patient_id"] == "00000001" and v2020["00000001_001"].meta["follow_up"] == "1"
    assert (root / "Data_Entry_2017.csv").read_text().splitlines()[1].endswith(",")  # trailing comma trap
    old = make(root, data_entry="Data_Entry_2017.csv")
    assert old.data_entry_path(old.cfg).name == "Data_Entry_2017.csv"
    v2017 = {r.study_id: r for s in ("train", "val", "test") for r in old.records(s)}
    assert sorted(v2017) == sorted(v2020)
    for k, r in v2017.items():
        np.testing.assert_array_equal(r.labels, v2020[k].labels)
        assert r.meta["age"] == v2020[k].meta["age"] and r.meta["gender"] == v2020[k].meta["gender"]
    with pytest.raises(DataError, match="'Pleural Effusion'"):
        multi_hot("Pleural Effusion", Path("Data_Entry_2017.csv"), "x.png")


def test_bad_tables(root, tmp_path, caplog):
    copy = copy_of(root, tmp_path)
    entry = copy / "Data_Entry_2017_v2020.csv"
    text = entry.read_text()
    entry.write_text(text.replace("Pleural_Thickening|Hernia", "Pleural_Thickening|Herina"))
    with pytest.raises(DataError, match=r"Data_Entry_2017_v2020.csv: image 00000004_000.png has the finding 'Herina'"):
        make(copy).records("train")
    entry.write_text(text.replace("Image Index,Finding Labels", "Image_Index,Labels", 1))  # renamed: by position
    with caplog.at_level(logging.WARNING, logger="medvlp.datamodules.nih14"):
        assert len(make(copy).records("test")) == 4
    assert "by position" in caplog.text
    entry.write_text("\n".join(line.split(",", 1)[1] for line in text.splitlines()) + "\n")  # first column gone
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['Image Index'"):
        make(copy).records("train")
    entry.write_text(text)
    bbox = copy / "BBox_List_2017.csv"
    bbox.write_text(bbox.read_text().replace("Pneumothorax,2,2,24,20", "Pneumothorax,2,2,,20"))
    with pytest.raises(DataError, match=r"BBox_List_2017.csv row 6 \(00000006_001.png\)"):
        make(copy).records("test")


def test_boxes_records_and_resized_geometry(root):
    dm = make(root)
    test = {r.study_id: r for r in dm.records("test")}
    r = test["00000006_000"]
    # BBox_List: Infiltrate 12.372881355932,10,20.5,14.75 and Atelectasis 30,28,18,10 (x, y, w, h)
    np.testing.assert_allclose(r.boxes, [[12.372881355932, 10, 32.872881355932, 24.75], [30, 28, 48, 38]], rtol=1e-6)
    assert r.boxes.dtype == np.float32 and r.box_labels.dtype == np.int64
    assert [BOX_LABELS[i] for i in r.box_labels] == ["Infiltration", "Atelectasis"]  # Infiltrate mapped
    assert test["00000007_000"].boxes is None and not test["00000007_000"].meta["has_boxes"]
    sample = dm.load_sample(r, train=False)
    assert sample["image"].shape == (3, SIZE, SIZE)
    # 64 x 48 -> 32 x 24 (scale 0.5), centred: 4 rows of padding on top, none on the left
    expected = [[6.186440677966, 9.0, 16.436440677966, 16.375], [15.0, 18.0, 24.0, 23.0]]
    torch.testing.assert_close(sample["boxes"], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert sample["box_labels"].tolist() == [3, 0]
    empty = dm.load_sample(test["00000007_000"], train=False)
    assert empty["boxes"].shape == (0, 4) and empty["box_labels"].shape == (0,)
    aug = make(root, augment=True)
    torch.manual_seed(0)
    moved = aug.load_sample(aug.records("test")[0], train=True)["boxes"]
    assert moved.shape == (2, 4) and (moved >= 0).all() and (moved <= SIZE).all()


def test_boxes_only_and_random_protocol(root):
    with pytest.raises(DataError, match="use data.split_protocol=random"):
        make(root, boxes_only=True).records("val")  # the only val image has no box
    train = make(root, boxes_only=True).records("train")
    assert ids(train) == ["00000002_000"] and train[0].boxes.shape == (2, 4)
    dm = make(root, boxes_only=True, split_protocol="random", val_fraction=0.25, test_fraction=0.25)
    parts = {s: dm.records(s) for s in ("train", "val", "test")}
    every = [r for recs in parts.values() for r in recs]
    assert sorted(ids(every)) == ["00000002_000", "00000006_000", "00000006_001", "00000008_000"]
    assert all(r.boxes is not None and len(r.boxes) == len(r.box_labels) > 0 for r in every)
    patients = [{r.meta["patient_id"] for r in recs} for recs in parts.values()]
    assert all(recs for recs in parts.values())
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


def test_lists_protocol(root, tmp_path):
    lists = tmp_path / "mrm"
    lists.mkdir()
    (lists / "train.txt").write_text("00000001_000.png\n00000005_000.png\n\n")
    (lists / "val.txt").write_text("images/00000003_000.png 0 0 1\n")  # extra fields and a folder are tolerated
    (lists / "test.txt").write_text("00000007_000.png\n")
    dm = make(root, split_protocol="lists", split_dir=str(lists))
    assert ids(dm.records("train")) == ["00000001_000", "00000005_000"]
    assert ids(dm.records("val")) == ["00000003_000"] and ids(dm.records("test")) == ["00000007_000"]
    (lists / "test.txt").write_text("00000099_000.png\n")
    with pytest.raises(DataError, match="missing from .*Data_Entry_2017_v2020.csv \\(first: 00000099_000.png\\)"):
        make(root, split_protocol="lists", split_dir=str(lists)).records("test")
    with pytest.raises(DataRootError, match="train.txt does not exist"):
        NIH14DataModule.check_root(NIH14Config(root=str(root), split_protocol="lists", split_dir=str(tmp_path)))


def test_images_rgba_duplicates_missing_corrupt(root, tmp_path, tiny_tokenizer, caplog):
    dm = make(root)
    rgba = next(r for r in dm.records("val") + dm.records("train") if r.study_id == "00000003_000")
    source = next(it for it in nih14_fixture_items() if it.image_index == "00000003_000.png").image
    np.testing.assert_array_equal(dm.read_pixels(rgba, train=False), source)  # RGBA -> the stored gray
    copy = copy_of(root, tmp_path)
    shutil.copy(copy / "images" / "00000001_000.png", copy / "images_002" / "images" / "00000001_000.png")
    with pytest.raises(DataError, match=r"00000001_000.png exists twice under .*images.*images_002"):
        make(copy).records("train")
    (copy / "images_002" / "images" / "00000001_000.png").unlink()
    (copy / "images" / "00000007_000.png").unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) of the test split are not under .*first: 00000007_000.png"):
        make(copy).records("test")
    with caplog.at_level(logging.WARNING, logger="medvlp.datamodules.nih14"):
        assert len(make(copy, on_error="skip").records("test")) == 3
    assert "skipped 1 image(s)" in caplog.text
    broken = copy / "images_001" / "images" / "00000006_000.png"
    broken.write_bytes(broken.read_bytes()[:60])
    skip = make(copy, on_error="skip")
    skip.set_tokenizer(tiny_tokenizer)
    batch = next(iter(skip._loader("test", shuffle=False, batch_size=4)))
    assert batch.skipped == 1 and batch.images.shape == (2, 3, SIZE, SIZE)
    assert [b.shape[0] for b in batch.boxes] == [1, 1] and batch.labels.shape == (2, 14)
    with pytest.raises(DataError, match="00000006_000.png is corrupt or truncated"):
        skip.load_sample(skip.records("test")[0], train=False)


def test_boxes_in_another_frame_fail(tmp_path):
    img = np.full((16, 16), 100, np.uint8)  # a "resized copy": boxes of the 1024-px image do not fit
    item = NIHItem("00000001_000.png", img, ["Mass"], split="test", boxes=[("Mass", 500.0, 400.0, 80.0, 60.0)])
    write_nih14(tmp_path, [item, NIHItem("00000002_000.png", img, [], split="train_val")])
    dm = make(tmp_path)
    with pytest.raises(DataError, match="outside the 16 x 16 image"):
        dm.load_sample(dm.records("test")[0], train=False)


def test_invalid_config_and_yaml(root):
    from omegaconf import OmegaConf

    from medvlp.config import config_dir

    for key, value, match in (("split_protocol", "mrm", "data.split_protocol"), ("val_fraction", 1.0, "val_fraction"),
                              ("test_fraction", -0.1, "test_fraction")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            make(root, **{key: value})
    with pytest.raises(ValueError, match="sum below 1"):
        make(root, split_protocol="random", val_fraction=0.5, test_fraction=0.5)
    schema = OmegaConf.structured(NIH14Config)
    OmegaConf.set_struct(schema, True)
    merged = OmegaConf.merge(schema, OmegaConf.load(config_dir() / "data" / "nih14.yaml").data)
    assert merged.name == "nih14" and OmegaConf.is_missing(merged, "root") and merged.boxes_only is False


def test_split_key_names_the_train_split(root):
    assert make(root).split_key() == make(root, val_seed=0).split_key()
    keys = {make(root, **kw).split_key() for kw in ({}, {"val_seed": 1}, {"boxes_only": True}, {"split_protocol": "random"})}
    assert len(keys) == 4
