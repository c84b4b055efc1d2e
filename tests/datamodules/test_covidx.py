"""COVIDx datamodule on the synthetic fixture of specs/datasets.md §6.6 (Kaggle + GitHub label files)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from format_fixtures import covidx_fixture_items, write_covidx_fixture

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.covidx import COVIDxConfig, COVIDxDataModule, parse_line
from medvlp.datamodules.demo.covidx import COVIDxItem, write_covidx
from medvlp.registry import DATAMODULES

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_covidx_fixture(tmp_path_factory.mktemp("covidx") / "covidx-cxr2")


def make(root, **kw) -> COVIDxDataModule:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("augment", False)
    return COVIDxDataModule(COVIDxConfig(root=str(root), **kw))


def by_file(records) -> dict:
    return {r.meta["file"]: r for r in records}


def test_registered_and_check_root(root, tmp_path):
    assert DATAMODULES.get("covidx") is COVIDxDataModule
    t0 = time.perf_counter()
    COVIDxDataModule.check_root(COVIDxConfig(root=str(root)))
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(DataRootError, match="does not exist") as err:
        COVIDxDataModule.check_root(COVIDxConfig(root=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(err.value) and "labels/train_COVIDx9A.txt" in str(err.value)
    legacy_only = tmp_path / "github"
    shutil.copytree(root / "labels", legacy_only / "labels")
    with pytest.raises(DataRootError, match=r"several label-file versions \['COVIDx', 'COVIDx9A'\]; set data.version"):
        COVIDxDataModule.check_root(COVIDxConfig(root=str(legacy_only)))
    with pytest.raises(DataRootError, match="has train_COVIDx9A.txt but no train/ image folder"):
        COVIDxDataModule.check_root(COVIDxConfig(root=str(legacy_only), version="9A"))
    with pytest.raises(DataRootError, match=r"no train_COVIDx8B.txt .*found: \['COVIDx', 'COVIDx9A'\]"):
        COVIDxDataModule.check_root(COVIDxConfig(root=str(legacy_only), version="COVIDx8B"))


def test_parse_line_from_the_right():
    p = Path("train_COVIDx9A.txt")
    assert parse_line("1534 ricord-1534.jpg COVID-19 ricord\n", p, 1) == ("1534", "ricord-1534.jpg", "COVID-19", "ricord")
    assert parse_line("COVID 1 COVID(1).png COVID-19 sirm", p, 2) == ("COVID 1", "COVID(1).png", "COVID-19", "sirm")
    assert parse_line("COVID 1 COVID(1).png COVID-19", p, 3) == ("COVID 1", "COVID(1).png", "COVID-19", "")
    assert parse_line("12 a.png normal\r", p, 4) == ("12", "a.png", "normal", "")
    assert parse_line("   ", p, 5) is None
    with pytest.raises(DataError, match=r"train_COVIDx9A.txt line 6: 'a.png positive' has 2 fields"):
        parse_line("a.png positive", p, 6)


def test_kaggle_release(root):
    dm = make(root)
    assert dm.label_names == ["negative", "positive"]  # known before any records are read
    train, val, test = dm.records("train"), dm.records("val"), dm.records("test")
    assert (len(train), len(val), len(test)) == (10, 2, 3)
    assert all(Path(r.image_path).parent.name == s for s, recs in (("train", train), ("val", val), ("test", test)) for r in recs)
    t = by_file(train)
    np.testing.assert_array_equal(t["COVID(12).png"].labels, [0, 1])
    assert t["COVID(12).png"].meta["patient_id"] == "COVID 12" and t["COVID(12).png"].meta["source"] == "sirm"
    rnsa = t["0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d.png"]
    assert rnsa.meta["source"] == "rnsa" and rnsa.meta["class"] == "negative" and rnsa.meta["class_index"] == 0
    assert all(r.labels.dtype == np.float32 and r.labels.sum() == 1 and r.text == "" for r in train + val + test)


def test_legacy_versions_and_mgca_holdout(root):
    dm = make(root, version="9A")
    assert dm.label_names == ["normal", "pneumonia", "COVID-19"]  # MGCA's index order
    train, val, test = dm.records("train"), dm.records("val"), dm.records("test")
    rows = [r for r in (root / "labels" / "train_COVIDx9A.txt").read_text().splitlines() if r]
    n = len(rows)
    assert n == 10 and (len(train), len(val)) == (8, 2)  # floor(0.8 * 10) train rows, as train_test_split(train_size=0.8)
    perm = np.random.RandomState(0).permutation(n)  # sklearn ShuffleSplit(random_state=0)
    files = [line.rsplit(maxsplit=3)[1] for line in rows]
    assert [r.meta["file"] for r in val] == [files[i] for i in perm[:2]]
    assert [r.meta["file"] for r in train] == [files[i] for i in perm[2:]]
    assert all(Path(r.image_path).parent.name == "train" for r in train + val)  # val comes from train/
    assert len(test) == 3 and all(Path(r.image_path).parent.name == "test" for r in test)
    t = by_file(train + val)
    assert t["COVID(12).png"].meta["patient_id"] == "COVID 12"  # the 5-token line
    np.testing.assert_array_equal(t["0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d.png"].labels, [0, 1, 0])
    old = make(root, version="COVIDx")  # 3 fields, no data source
    assert [r.meta["file"] for r in old.records("val")] == [r.meta["file"] for r in val]
    assert all(r.meta["source"] == "" for r in old.records("train")) and old.label_names == dm.label_names
    assert by_file(old.records("train") + old.records("val"))["COVID(12).png"].meta["patient_id"] == "COVID 12"
    other = make(root, version="COVIDx9A", val_seed=3)
    assert [r.meta["file"] for r in other.records("val")] != [r.meta["file"] for r in val]


def test_mixed_vocabularies_fail(root, tmp_path):
    copy = tmp_path / "mixed"
    shutil.copytree(root, copy)
    (copy / "test.txt").write_text("1 x.png COVID-19 sirm\n")
    with pytest.raises(DataError, match=r"mix the class vocabularies \[\['normal', 'pneumonia', 'COVID-19'\], \['negative', 'positive'\]\]"):
        make(copy).records("train")


def test_images_16bit_rgb_and_extensions(root):
    dm = make(root)
    items = {it.filename: it for it in covidx_fixture_items()}
    recs = by_file(dm.records("train") + dm.records("test"))
    deep = "sub-S03044_ses-E06790_run-1_bp-chest_vp-pa_dx-corrected.png"
    source = items[deep].image
    pixels = dm.read_pixels(recs[deep], train=False)
    assert pixels.max() == 255 and (pixels < 250).mean() > 0.9  # scaled, not clipped to white
    expected = np.round(source.astype(np.float64) * 16 * 255 / (source.max() * 16.0))
    np.testing.assert_allclose(pixels, expected, atol=1)
    rgb = dm.read_pixels(recs["A881923-0001.jpg"], train=False)
    assert np.abs(rgb.astype(int) - items["A881923-0001.jpg"].image).mean() < 4  # RGB JPG -> luminance
    for name in ("fig1-302-chest.JPG", "actmed-44-f1e2.jpeg", "COVID(12).png", "COVID(40).jpg"):
        img = dm.load_image(recs[name], train=False)
        assert img.shape == (3, SIZE, SIZE) and img.dtype == torch.float32


def test_broken_images(root, tmp_path, tiny_tokenizer):
    copy = tmp_path / "c"
    shutil.copytree(root, copy)
    dm = make(copy)
    recs = dm.records("test")
    Path(recs[0].image_path).write_bytes(Path(recs[0].image_path).read_bytes()[:80])
    Path(recs[2].image_path).unlink()
    with pytest.raises(DataError, match=r"3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f.png is corrupt or truncated"):
        dm.load_image(recs[0], train=False)
    with pytest.raises(DataError, match=r"COVID\(40\).jpg does not exist"):
        dm.load_image(recs[2], train=False)
    skip = make(copy, on_error="skip")
    skip.set_tokenizer(tiny_tokenizer)
    batch = next(iter(skip.test_dataloader()))
    assert batch.skipped == 2 and batch.images.shape == (1, 3, SIZE, SIZE) and batch.labels.shape == (1, 2)
    (copy / "val.txt").unlink()  # without val.txt the MGCA holdout applies to the Kaggle files too
    no_val = make(copy)
    assert len(no_val.records("train")) == 8 and len(no_val.records("val")) == 2


def test_writer_validates_items(tmp_path):
    img = np.zeros((6, 6), np.uint8)
    with pytest.raises(ValueError, match="16-bit image must be a PNG"):
        write_covidx(tmp_path, [COVIDxItem("1", "a.jpg", "positive", img, encoding="gray16")])
    with pytest.raises(ValueError, match="no spaces"):
        write_covidx(tmp_path, [COVIDxItem("1", "a b.png", "positive", img)])


def test_invalid_config_and_yaml(root):
    from omegaconf import OmegaConf

    from medvlp.config import config_dir

    with pytest.raises(ValueError, match="data.val_fraction"):
        make(root, val_fraction=0.0)
    with pytest.raises(ValueError, match="Unknown split"):
        make(root).build_records("valid")
    schema = OmegaConf.structured(COVIDxConfig)
    OmegaConf.set_struct(schema, True)
    merged = OmegaConf.merge(schema, OmegaConf.load(config_dir() / "data" / "covidx.yaml").data)
    assert merged.name == "covidx" and OmegaConf.is_missing(merged, "root") and merged.val_fraction == 0.2


def test_label_fraction_and_split_key(root, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    assert make(root).split_key() != make(root, version="9A").split_key() != make(root, version="9A", val_seed=1).split_key()
    half = make(root, version="9A", label_fraction=0.5).records("train")
    assert len(half) == 4 and {r.study_id for r in half} < {r.study_id for r in make(root, version="9A").records("train")}
