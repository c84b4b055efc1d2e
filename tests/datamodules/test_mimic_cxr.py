"""MIMIC-CXR-JPG + reports datamodule on the synthetic fixture of specs/datasets.md §1.11."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_mimic

from medvlp.batch import ImageTextBatch
from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.mimic_cxr import LABELS, MimicCXRConfig, MimicCXRDataModule
from medvlp.registry import DATAMODULES

SIZE = 32


def make(root, **kw) -> MimicCXRDataModule:
    kw.setdefault("image_size", SIZE)
    return MimicCXRDataModule(MimicCXRConfig(root=str(root), **kw))


def by_study(records):
    out = {}
    for r in records:
        out.setdefault(r.study_id, []).append(r)
    return out


def test_registered_and_class_contract():
    assert DATAMODULES.get("mimic_cxr") is MimicCXRDataModule
    assert MimicCXRDataModule.Config is MimicCXRConfig
    assert MimicCXRDataModule.modality == "2d"
    assert MimicCXRDataModule.default_prompts == "cxr.yaml"
    assert MimicCXRConfig().eval_labels == []
    assert "mimic-cxr-2.0.0-split.csv.gz" in MimicCXRDataModule.EXPECTED_LAYOUT


def test_check_root(mimic_root, tmp_path):
    cfg = MimicCXRConfig(root=str(mimic_root.root))
    t0 = time.perf_counter()
    MimicCXRDataModule.check_root(cfg)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(DataRootError, match="does not exist") as err:
        MimicCXRDataModule.check_root(MimicCXRConfig(root=str(tmp_path / "nope")))
    assert "files/p10/p10000032/s50414267" in str(err.value)  # the expected layout is printed
    broken = tmp_path / "broken"
    shutil.copytree(mimic_root.root, broken)
    (broken / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DataRootError, match="mimic-cxr-2.0.0-split.csv"):
        MimicCXRDataModule.check_root(MimicCXRConfig(root=str(broken)))
    with pytest.raises(DataRootError, match="reports_root"):
        MimicCXRDataModule.check_root(MimicCXRConfig(root=str(mimic_root.root), reports_root=str(tmp_path / "x")))


def test_splits_views_and_text(mimic_root, caplog):
    dm = make(mimic_root.root)
    with caplog.at_level(logging.INFO, logger="medvlp.datamodules.mimic_cxr"):
        train = dm.records("train")
    studies = by_study(train)
    # LATERAL and blank views filtered; the too-short report is dropped (and counted)
    assert sorted(studies) == ["50000001", "50000002", "50000008"]
    assert [r.meta["view"] for r in studies["50000001"]] == ["PA"]
    assert [r.meta["view"] for r in studies["50000008"]] == ["PA", "AP"]  # one record per frontal image
    assert "dropped 1 of 4 studies" in caplog.text
    assert studies["50000001"][0].text.startswith("no acute cardiopulmonary process lungs are well expanded")
    assert studies["50000002"][0].text.startswith("portable view of the chest")
    for r in train:
        assert Path(r.image_path).is_file()
        assert r.image_path.endswith(f"s{r.study_id}/{r.meta['dicom_id']}.jpg")
    val = dm.records("val")
    assert [r.study_id for r in val] == ["50000004"]  # blank-view study of the same patient gone
    assert val[0].text == "worsening right lower lobe consolidation right basal opacity has increased in size"
    test = dm.records("test")
    assert [r.study_id for r in test] == ["50000005"]  # the header-less report is dropped
    assert test[0].text == "no pneumothorax mild edema"


def test_labels_policies(mimic_root):
    dm = make(mimic_root.root)
    studies = by_study(dm.records("train"))
    assert dm.label_names == LABELS
    idx = {n: i for i, n in enumerate(dm.label_names)}
    lab = studies["50000001"][0].labels
    assert lab.dtype == np.float32 and lab.shape == (14,)
    assert lab[idx["No Finding"]] == 1 and lab[idx["Edema"]] == 0
    assert np.isnan(lab[idx["Pneumonia"]])  # -1 -> NaN (uncertain: ignore)
    assert np.isnan(lab[idx["Atelectasis"]])  # blank stays unknown, not negative
    assert np.isnan(studies["50000008"][0].labels).all()  # no label row at all
    for policy, value in (("zero", 0.0), ("one", 1.0)):
        lab = by_study(make(mimic_root.root, uncertain=policy).records("train"))["50000001"][0].labels
        assert lab[idx["Pneumonia"]] == value
    negbio = by_study(make(mimic_root.root, label_source="negbio").records("train"))["50000001"][0].labels
    assert negbio[idx["Pneumonia"]] == 0


def test_test_split_uses_radiologist_labels_when_present(mimic_root, tmp_path):
    idx = {n: i for i, n in enumerate(LABELS)}
    auto = make(mimic_root.root).records("test")[0].labels
    assert auto[idx["Edema"]] == 0 and auto[idx["Pneumothorax"]] == 1  # columns picked by name
    chex = make(mimic_root.root, label_source="chexpert").records("test")[0].labels
    assert chex[idx["Edema"]] == 1 and chex[idx["Pneumothorax"]] == 0
    v200 = write_mimic(tmp_path / "v2.0.0", test_set=False)
    assert make(v200.root).records("test")[0].labels[idx["Edema"]] == 1  # auto falls back to CheXpert
    with pytest.raises(DataRootError, match="test-set-labeled"):
        make(v200.root, label_source="test_set").records("test")


def test_plain_csv_and_separate_reports_root(tmp_path):
    fx = write_mimic(tmp_path / "jpg", gz=False, reports_root=tmp_path / "reports")
    assert not list(fx.root.glob("*.gz"))
    dm = make(fx.root, reports_root=str(fx.reports_root))
    assert len(dm.records("train")) == 4
    with pytest.raises(DataError, match="s50000001.txt does not exist.*reports_root"):
        make(fx.root).records("train")  # reports are not under root


def test_missing_report_policy(tmp_path, caplog):
    fx = write_mimic(tmp_path / "m")
    (fx.reports_root / "files/p10/p10000001/s50000002.txt").unlink()
    with pytest.raises(DataError, match="s50000002.txt"):
        make(fx.root).records("train")
    with caplog.at_level(logging.WARNING):
        recs = make(fx.root, on_error="skip").records("train")
    assert "50000002" not in {r.study_id for r in recs}
    assert "skipped 1 studies" in caplog.text


def test_images_per_study_one(mimic_root):
    dm = make(mimic_root.root, images_per_study="one")
    train = dm.records("train")
    assert [r.study_id for r in train] == ["50000001", "50000002", "50000008"]
    two = train[2]
    assert isinstance(two.image_path, list) and len(two.image_path) == 2
    assert two.meta["views"] == ["PA", "AP"]
    first = dm.load_image(two, train=False)
    assert torch.equal(first, dm.load_image(two, train=False))


def test_load_image_geometry_and_determinism(mimic_root):
    dm = make(mimic_root.root, augment=True)
    recs = by_study(dm.records("train"))
    tall = recs["50000001"][0]  # 64 wide x 80 high: padded left and right
    wide = recs["50000002"][0]  # 80 wide x 64 high: padded top and bottom
    a = dm.load_image(tall, train=False)
    assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a[0], a[1]) and torch.equal(a, dm.load_image(tall, train=False))
    assert a.min() >= -1 and a.max() <= 1
    assert torch.all(a[:, :, 0] == -1) and torch.all(a[:, :, -1] == -1)  # zero padding -> -1
    assert (a[:, 0, :] > -1).any()
    b = dm.load_image(wide, train=False)
    assert torch.all(b[:, 0, :] == -1) and (b[:, :, 0] > -1).any()
    torch.manual_seed(0)
    assert not torch.equal(dm.load_image(tall, train=True), a)  # random affine at train time
    gray = make(mimic_root.root, channels=1).load_image(tall, train=False)
    assert gray.shape == (1, SIZE, SIZE)
    assert torch.equal(make(mimic_root.root, augment=False).load_image(tall, train=True), a)


def test_unreadable_images(tmp_path):
    fx = write_mimic(tmp_path / "m")
    dm = make(fx.root)
    recs = dm.records("train")
    Path(recs[0].image_path).write_bytes(Path(recs[0].image_path).read_bytes()[:200])
    Path(recs[1].image_path).unlink()
    with pytest.raises(DataError, match=Path(recs[0].image_path).name):
        dm.load_image(recs[0], train=False)
    with pytest.raises(DataError, match=f"{Path(recs[1].image_path).name} does not exist"):
        dm.load_image(recs[1], train=False)
    dm_skip = make(fx.root, on_error="skip")
    ds = dm_skip.dataset("train")
    assert ds[0] is None and ds[1] is None and ds[2] is not None


def test_collate_batch(mimic_root, tiny_tokenizer, tmp_path):
    dm = make(mimic_root.root, max_length=16, batch_size=2, on_error="skip")
    dm.set_tokenizer(tiny_tokenizer)
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, ImageTextBatch)
    assert batch.images.shape == (1, 3, SIZE, SIZE)
    assert batch.input_ids.shape == (1, 16) and batch.attention_mask.dtype == torch.int64
    assert batch.labels.shape == (1, 14)
    assert batch.study_ids == ["50000004"]
    train = list(dm.train_dataloader())
    assert sum(len(b) for b in train) == 4  # drop_last only when more records than batch_size... 4 > 2
    assert all(b.images.shape[1:] == (3, SIZE, SIZE) for b in train)


def test_invalid_config_values(mimic_root):
    for key, value, match in (
        ("images_per_study", "some", "images_per_study"),
        ("label_source", "chexbert", "label_source"),
        ("uncertain", "keep", "uncertain"),
        ("sectioner", "mimc", "Did you mean 'mimic'"),
        ("channels", 2, "channels"),
    ):
        with pytest.raises(ValueError, match=match):
            make(mimic_root.root, **{key: value})


def test_yaml_matches_dataclass():
    from omegaconf import OmegaConf

    from medvlp.config import config_dir

    layer = OmegaConf.load(config_dir() / "data" / "mimic_cxr.yaml")
    schema = OmegaConf.structured(MimicCXRConfig)
    OmegaConf.set_struct(schema, True)
    merged = OmegaConf.merge(schema, layer.data)  # raises on an unknown key
    assert merged.name == "mimic_cxr" and OmegaConf.is_missing(merged, "root")
    assert merged.image_size == 224 and merged.channels == 3


def test_demo_world_loads(tmp_path, tiny_tokenizer):
    demo = pytest.importorskip("medvlp.datamodules.demo")
    if not hasattr(demo, "write_cxr_demo"):
        pytest.skip("medvlp.datamodules.demo.write_cxr_demo not written yet")
    root = demo.write_cxr_demo(tmp_path, size="tiny", seed=0)
    MimicCXRDataModule.check_root(MimicCXRConfig(root=str(root)))
    dm = make(root, max_length=16, batch_size=4)
    dm.set_tokenizer(tiny_tokenizer)
    for split in ("train", "val", "test"):
        assert dm.records(split)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[1:] == (3, SIZE, SIZE)
    assert batch.labels.shape[1] == 14
