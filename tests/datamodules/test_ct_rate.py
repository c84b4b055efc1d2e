"""CT-RATE datamodule on the synthetic fixture of specs/datasets.md §8.7."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CT_LABELS, CTVolume, truncate, write_ct_rate

from medvlp.batch import ImageTextBatch
from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.ct_rate import (
    CTRateConfig,
    CTRateDataModule,
    parse_name,
    report_text,
)
from medvlp.registry import DATAMODULES

SPACING = [5.0, 1.6, 1.6]
SIZE = [8, 16, 16]


def make(root, **kw) -> CTRateDataModule:
    kw.setdefault("spacing", SPACING)
    kw.setdefault("size", SIZE)
    return CTRateDataModule(CTRateConfig(root=str(root), **kw))


def all_train(dm):
    return {r.study_id: r for r in dm.records("train") + dm.records("val")}


def test_registered_and_class_contract():
    assert DATAMODULES.get("ct_rate") is CTRateDataModule
    assert CTRateDataModule.modality == "3d"
    assert CTRateDataModule.default_prompts == "ct_rate.yaml"
    assert CTRateDataModule.label_names == CT_LABELS
    assert CTRateConfig().exclude == ["train_1267_a_4", "train_11755_a_3", "train_11755_a_4"]


def test_check_root(ct_root, tmp_path):
    t0 = time.perf_counter()
    CTRateDataModule.check_root(CTRateConfig(root=str(ct_root)))  # parent of dataset/
    CTRateDataModule.check_root(CTRateConfig(root=str(ct_root / "dataset")))  # dataset/ itself
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(DataRootError, match="does not exist") as err:
        CTRateDataModule.check_root(CTRateConfig(root=str(tmp_path / "nope")))
    assert "radiology_text_reports/train_reports.csv" in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(ct_root / "dataset", broken / "dataset")
    (broken / "dataset/metadata/validation_metadata.csv").unlink()
    with pytest.raises(DataRootError, match="validation_metadata.csv"):
        CTRateDataModule.check_root(CTRateConfig(root=str(broken)))
    CTRateDataModule.check_root(CTRateConfig(root=str(broken), version="v2"))  # v2 needs no metadata
    with pytest.raises(DataRootError, match="validation_metadata.csv"):
        CTRateDataModule.check_root(CTRateConfig(root=str(broken), version="v2", apply_metadata_rescale="on"))


def test_names_sort_numerically():
    names = ["train_3_a_10", "train_3_a_2", "train_12_a_1", "train_3_b_1"]
    assert sorted(names, key=parse_name) == ["train_3_a_2", "train_3_a_10", "train_3_b_1", "train_12_a_1"]
    with pytest.raises(ValueError):
        parse_name("train_3_a")


def test_report_text_rules():
    assert report_text("Lungs clear (both).", "No 'acute' findings.") == (
        "The volume shows: No acute findings. The volume looks like: Lungs clear both."
    )
    assert report_text(float("nan"), "Cardiomegaly.") == "The volume shows: Cardiomegaly."
    assert report_text("Nodule.", "Not given.") == "The volume looks like: Nodule."
    assert report_text("", float("nan")) is None
    assert report_text("Nodule (3 mm).", "X.", mode="findings") == "Nodule (3 mm)."
    assert report_text("Nodule.", "", mode="impressions") is None
    assert report_text("Lungs clear", "Normal") == "The volume shows: Normal. The volume looks like: Lungs clear."


def test_organ_wise_text(ct_root, tmp_path):
    """HLIP's organ supervision from fVLM's per-organ files: four strings, empty parts filled, never 'nan.',
    shuffled in every training draw; scans without an entry are dropped and counted."""
    import json

    from medvlp.datamodules.ct_rate import organ_texts

    parts = organ_texts({"lung": "Nodule (5 mm) in the right lung", "heart": float("nan")}, {"lung": "Lung nodule."})
    assert parts[0] == "The lung shows: Lung nodule. The lung looks like: Nodule 5 mm in the right lung."
    assert parts[1] == "The heart shows: No significant abnormalities. The heart looks like: No significant abnormalities."
    assert [p.split()[1] for p in parts] == ["lung", "heart", "esophagus", "aorta"] and not any("nan" in p for p in parts)
    desc = {"train_1_a": {"lung": "Lungs clear."}, "train_2_a": {"heart": "Enlarged heart."}, "train_3_a": {}}
    conc = {"train_2_a": {"heart": "Cardiomegaly."}}
    (tmp_path / "desc.json").write_text(json.dumps(desc))
    (tmp_path / "conc.json").write_text(json.dumps(conc))
    dm = make(ct_root, text="organ", organ_findings_file=str(tmp_path / "desc.json"),
              organ_impressions_file=str(tmp_path / "conc.json"), val_fraction=0.0)
    recs = {r.study_id: r for r in dm.records("train")}
    assert sorted(recs) == ["train_1_a", "train_2_a", "train_3_a"]
    rec = recs["train_2_a"]
    assert rec.text.startswith("The lung shows: No significant abnormalities.") and "The heart shows: Cardiomegaly." in rec.text
    torch.manual_seed(0)
    draws = {dm.item_text(rec, train=True) for _ in range(20)}
    assert len(draws) > 1 and all(sorted(d.split(". The ")) != [] and len(d) == len(rec.text) for d in draws)
    assert dm.item_text(rec, train=False) == rec.text
    with pytest.raises(DataError, match="organ_findings_file"):
        make(ct_root, text="organ", organ_findings_file=str(tmp_path / "missing.json")).records("train")


def test_records_splits_text_and_labels(ct_root, caplog):
    dm = make(ct_root)
    with caplog.at_level(logging.INFO, logger="medvlp.datamodules.ct_rate"):
        scans = all_train(dm)
    assert sorted(scans) == ["train_1_a", "train_2_a", "train_2_b", "train_3_a", "train_5_a", "train_6_a", "train_7_a"]
    # train_4_a_1: empty findings, impressions 'Not given.': left out, named in the log and in dm.dropped
    assert "left out 1 reconstruction(s)" in caplog.text and "train_4_a_1" in caplog.text
    (entry,) = [d for d in dm.dropped if d.study_id == "train_4_a_1"]
    assert entry.split in ("train", "val") and "train_reports.csv row train_4_a_1.nii.gz" in entry.reason
    train_p = {r.meta["patient"] for r in dm.records("train")}
    val_p = {r.meta["patient"] for r in dm.records("val")}
    assert val_p and train_p and not train_p & val_p  # patient-level holdout
    assert val_p == dm.holdout_patients()
    assert make(ct_root).holdout_patients() == val_p  # seeded
    assert [r.study_id for r in dm.records("test")] == ["valid_1_a", "valid_2_a"]

    s = scans["train_1_a"]
    assert s.text == "The volume shows: No acute findings. The volume looks like: Lungs are clear. No effusion left or right."
    assert scans["train_2_a"].text == "The volume shows: Cardiomegaly."
    assert scans["train_2_b"].text == "The volume looks like: Small nodule in the right lung."
    assert all("nan" not in r.text.lower() for r in scans.values())
    assert [Path(p).name for p in scans["train_3_a"].image_path] == ["train_3_a_2.nii.gz", "train_3_a_10.nii.gz"]
    assert dm.label_names == CT_LABELS
    assert s.labels.dtype == np.float32 and s.labels.shape == (18,)
    np.testing.assert_array_equal(s.labels[:4], [1, 0, 1, 0])
    findings_only = all_train(make(ct_root, text="findings"))
    assert "train_2_a" not in findings_only and findings_only["train_2_b"].text == "Small nodule in the right lung."


def test_version_and_rescale_resolution(ct_root):
    vols = {v.name: v for r in all_train(make(ct_root)).values() for v in r.meta["volumes"]}
    assert vols["train_1_a_1"].version == "v2" and not vols["train_1_a_1"].rescale
    assert "train_fixed" in vols["train_1_a_1"].path and vols["train_1_a_1"].spacing_zyx is None
    v1 = vols["train_1_a_2"]
    assert v1.version == "v1" and v1.rescale and v1.intercept == -8192 and v1.slope == 1
    assert v1.spacing_zyx == pytest.approx((2.5, 0.8, 0.8))
    assert vols["train_2_a_1"].intercept == -1024
    assert vols["train_2_a_1"].direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    forced = {v.name: v for r in all_train(make(ct_root, version="v1")).values() for v in r.meta["volumes"]}
    assert forced["train_1_a_1"].version == "v1" and forced["train_1_a_1"].rescale
    with pytest.raises(DataError, match="train_1_a_2.*train_fixed"):
        make(ct_root, version="v2").records("train")
    only_v2 = all_train(make(ct_root, version="v2", on_error="skip"))
    assert sorted(only_v2) == ["train_1_a", "train_3_a"]


def test_v1_and_v2_give_the_same_volume(ct_root):
    """-8192 v1 file rescaled from the CSV == the v2 int16 HU file read as is (no double rescale)."""
    auto, v1 = make(ct_root), make(ct_root, version="v1")
    rec_auto = all_train(auto)["train_1_a"]
    rec_v1 = all_train(v1)["train_1_a"]
    a = auto.load_image(rec_auto, train=False)  # recon 1 at eval = the v2 file
    b = v1.load_image(rec_v1, train=False)
    assert a.shape == (1, *SIZE) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # air (-1000 HU) -> window (-1000 + 1150) / 1500 = 0.1 -> (0.1 - mean) / std; a wrong rescale would
    # saturate it at 0 or 1
    assert a.min().item() == pytest.approx((0.1 - 0.449) / 0.226, abs=0.03)
    for scan in ("train_2_a", "valid_2_a"):  # -1024 intercepts, uint16 and int16 stored
        rec = (all_train(auto) | {r.study_id: r for r in auto.records("test")})[scan]
        assert auto.load_image(rec, train=False).shape == (1, *SIZE)


def test_wrong_rescale_is_caught(ct_root):
    dm = make(ct_root, apply_metadata_rescale="on")  # would double-rescale the v2 file
    with pytest.raises(DataError, match="train_1_a_1.nii.gz.*HU"):
        dm.load_image(all_train(dm)["train_1_a"], train=False)
    dm = make(ct_root, apply_metadata_rescale="off", version="v1")  # raw stored values
    with pytest.raises(DataError, match="train_1_a_1.nii.gz"):
        dm.load_image(all_train(dm)["train_1_a"], train=False)
    off = make(ct_root, apply_metadata_rescale="off", version="v1", hu_sanity_check=False)
    assert off.load_image(all_train(off)["train_1_a"], train=False).shape == (1, *SIZE)


def test_spacing_comes_from_metadata_for_v1(ct_root):
    dm = make(ct_root, size=[], version="v1")
    scans = all_train(dm)
    # metadata spacing (2.5, 0.8, 0.8) -> (16*2.5/5, 32*0.8/1.6, ...); the header says 1 mm
    assert dm.load_image(scans["train_1_a"], train=False).shape == (1, 8, 16, 16)
    assert dm.load_image(scans["train_3_a"], train=False).shape == (1, 9, 14, 14)  # 3.0 / 0.7 mm


def test_reconstructions_one_and_all(ct_root):
    dm = make(ct_root, reconstructions="all")
    recs = dm.records("train") + dm.records("val")
    names = [Path(r.image_path).name for r in recs if r.study_id == "train_3_a"]
    assert names == ["train_3_a_2.nii.gz", "train_3_a_10.nii.gz"]
    assert len(recs) == 9
    one = make(ct_root)
    rec = all_train(one)["train_3_a"]  # two recons with different noise
    eval_a = one.load_image(rec, train=False)
    assert torch.equal(eval_a, one.load_image(rec, train=False))  # eval: always recon 2 (lowest number)
    assert torch.equal(eval_a, dm.load_image(recs[[r.study_id for r in recs].index("train_3_a")], train=False))
    torch.manual_seed(0)
    drawn = {float(one.load_image(rec, train=True).sum()) for _ in range(10)}
    assert len(drawn) == 2  # train: a random recon per draw


def test_flips_and_cache(ct_root):
    dm = make(ct_root, flip_prob=1.0, cache_size=2)
    rec = all_train(dm)["train_2_a"]
    a = dm.load_image(rec, train=False)
    f = dm.load_image(rec, train=True)
    assert torch.equal(f, torch.flip(a, [1, 2, 3]))
    assert len(dm._cache) == 1
    assert dm.volume(rec.meta["volumes"][0]) is dm.volume(rec.meta["volumes"][0])


def test_eval_reconstructions_all_scores_every_volume(ct_root):
    dm = make(ct_root, eval_reconstructions="all", val_fraction=0.0)
    train, test = dm.records("train"), dm.records("test")
    assert all(isinstance(r.image_path, list) for r in train)  # one record per scan, a volume drawn per step
    assert all(isinstance(r.image_path, str) for r in test) and len(test) == len({r.image_path for r in test})
    assert len(test) > len({r.study_id for r in test}) or len(test) == len(make(ct_root).records("test"))
    with pytest.raises(ValueError, match="data.eval_reconstructions"):
        make(ct_root, eval_reconstructions="some")


def test_translation_and_intensity_augmentations(ct_root):
    """Train-time 3D augmentations: translation (window floor enters), contrast / brightness jitter;
    evaluation reads are untouched; a label volume moves with the image."""
    from medvlp.datamodules.transforms import VolumeTransform, translate

    t = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    moved = translate(t, [0, 1, -1], -5.0)
    assert torch.equal(moved[0, :, 1:, :3], t[0, :, :2, 1:]) and (moved[0, :, 0] == -5).all() and (moved[0, :, :, 3] == -5).all()
    assert (translate(t, [2, 0, 0], 0.0) == 0).all() and torch.equal(translate(t, [0, 0, 0], 0.0), t)
    vol = torch.rand(8, 10, 12)
    tf = VolumeTransform(mean=0.0, std=1.0, intensity_scale=0.2, intensity_shift=0.1, max_shift=[1, 2, 3])
    mask = (vol > 0.5).long()[None]
    g = torch.Generator().manual_seed(3)
    out, m = tf(vol, train=True, generator=g, mask=mask)
    g = torch.Generator().manual_seed(3)
    a, b = -0.2 + 0.4 * torch.rand((), generator=g).item(), -0.1 + 0.2 * torch.rand((), generator=g).item()
    offs = [int(torch.randint(-k, k + 1, (), generator=g).item()) for k in (1, 2, 3)]
    assert torch.allclose(out, translate(vol[None] * (1 + a) + b, offs, 0.0))
    assert torch.equal(m, translate(mask, offs, 0)) and m.dtype == torch.int64
    assert torch.equal(tf(vol, train=False), vol[None])
    with pytest.raises(ValueError, match="max_shift"):
        VolumeTransform(max_shift=[1, 2])
    dm = make(ct_root, max_shift=[2, 4, 4], intensity_scale=0.1)
    rec = all_train(dm)["train_2_a"]
    assert torch.equal(dm.load_image(rec, train=False), dm.load_image(rec, train=False))
    torch.manual_seed(0)
    assert len({float(dm.load_image(rec, train=True).sum()) for _ in range(5)}) == 5
    with pytest.raises(ValueError, match="data.max_shift"):
        make(ct_root, max_shift=[-1, 0, 0])


def test_join_validation(tmp_path, caplog):
    vols = [CTVolume("train_1_a_1"), CTVolume("train_2_a_1"), CTVolume("train_3_a_1"), CTVolume("valid_1_a_1")]
    parent = tmp_path / "c"
    write_ct_rate(parent, vols, extra_label_rows=["train_8_a_1"], skip_report=["train_3_a_1"])
    with pytest.raises(DataError, match="train_8_a_1") as err:
        make(parent, val_fraction=0.0).records("train")
    assert "train_3_a_1 has no row in radiology_text_reports/train_reports.csv" in str(err.value)
    with caplog.at_level(logging.WARNING):
        skip = make(parent, on_error="skip", val_fraction=0.0)
        recs = skip.records("train")
    assert [r.study_id for r in recs] == ["train_1_a", "train_2_a"]
    assert "skipped 2" in caplog.text
    assert {(d.split, d.study_id) for d in skip.dropped} == {("train", "train_8_a_1"), ("train", "train_3_a_1")}
    assert skip.dropped_summary() == {"count": 2, "by_split": {"train": 2}, "file": None}
    # a volume on disk without a label row
    stray = parent / "dataset/valid/valid_9/valid_9_a/valid_9_a_1.nii.gz"
    stray.parent.mkdir(parents=True)
    shutil.copy(parent / "dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz", stray)
    with pytest.raises(DataError, match="valid_9_a_1.nii.gz.*no row"):
        make(parent).records("test")


def test_truncated_volume_and_exclude(tmp_path):
    parent = tmp_path / "c"
    write_ct_rate(parent, [CTVolume("train_1_a_1"), CTVolume("train_2_a_1"), CTVolume("valid_1_a_1")])
    truncate(parent / "dataset/train/train_2/train_2_a/train_2_a_1.nii.gz")
    dm = make(parent, val_fraction=0.0)
    rec = {r.study_id: r for r in dm.records("train")}["train_2_a"]
    with pytest.raises(DataError, match="train_2_a_1.nii.gz is truncated"):
        dm.load_image(rec, train=False)
    skip = make(parent, val_fraction=0.0, on_error="skip")
    assert [it is None for it in skip.dataset("train")] == [False, True]
    excl = make(parent, val_fraction=0.0, exclude=["train_2_a_1"])
    assert [r.study_id for r in excl.records("train")] == ["train_1_a"]


def test_val_fraction_zero_means_no_val(ct_root):
    dm = make(ct_root, val_fraction=0.0)
    assert len(dm.records("train")) == 7
    with pytest.raises(DataError, match="no usable records"):
        dm.records("val")


def test_collate_batch(ct_root, tiny_tokenizer):
    dm = make(ct_root, max_length=24, batch_size=2, eval_batch_size=2)
    dm.set_tokenizer(tiny_tokenizer)
    batch = next(iter(dm.test_dataloader()))
    assert isinstance(batch, ImageTextBatch)
    assert batch.images.shape == (2, 1, *SIZE)
    assert batch.labels.shape == (2, 18)
    assert batch.input_ids.shape == (2, 24)
    assert batch.study_ids == ["valid_1_a", "valid_2_a"]


def test_invalid_config_values(ct_root):
    for key, value, match in (
        ("version", "v3", "data.version"),
        ("reconstructions", "first", "data.reconstructions"),
        ("text", "report", "data.text"),
        ("apply_metadata_rescale", "maybe", "apply_metadata_rescale"),
        ("orientation", "LPX", "data.orientation"),
        ("spacing", [1.0, 1.0], "data.spacing"),
        ("window", [350.0, -1150.0], "data.window"),
        ("val_fraction", 1.0, "val_fraction"),
    ):
        with pytest.raises(ValueError, match=match):
            make(ct_root, **{key: value})
    assert make(ct_root, apply_metadata_rescale="True").rescale_mode == "on"


def test_yaml_matches_dataclass():
    from omegaconf import OmegaConf

    from medvlp.config import config_dir

    layer = OmegaConf.load(config_dir() / "data" / "ct_rate.yaml")
    schema = OmegaConf.structured(CTRateConfig)
    OmegaConf.set_struct(schema, True)
    merged = OmegaConf.merge(schema, layer.data)
    assert list(merged.spacing) == [3.0, 1.0, 1.0] and list(merged.size) == [112, 336, 336]
    assert OmegaConf.is_missing(merged, "root")


def test_demo_world_loads(tmp_path, tiny_tokenizer):
    demo = pytest.importorskip("medvlp.datamodules.demo")
    if not hasattr(demo, "write_ct_demo"):
        pytest.skip("medvlp.datamodules.demo.write_ct_demo not written yet")
    root = demo.write_ct_demo(tmp_path, size="tiny", seed=0)
    CTRateDataModule.check_root(CTRateConfig(root=str(root)))
    dm = make(root, max_length=24, batch_size=2, eval_batch_size=2, val_fraction=0.2)
    dm.set_tokenizer(tiny_tokenizer)
    for split in ("train", "val", "test"):
        assert dm.records(split)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[1:] == (1, *SIZE)
    assert batch.labels.shape[1] == 18


def test_anatomy_masks_align_with_the_volume_and_flip_with_it(tmp_path, tiny_tokenizer):
    """TotalSegmentator label maps (the demo world's anatomy_masks/) resampled with nearest neighbour
    through the same geometry, crop and flips as the volume; fVLM's 4-group merge."""
    from medvlp.datamodules.demo import write_ct_demo

    root = write_ct_demo(tmp_path, size="tiny", seed=0)
    dm = make(root, anatomy_dir=str(root / "anatomy_masks"), anatomy_groups="fvlm4", spacing=[10.0, 6.0, 6.0],
              size=[32, 64, 64])
    dm.set_tokenizer(tiny_tokenizer)
    rec = dm.records("train")[0]
    sample = dm.load_sample(rec, train=False)
    image, anatomy = sample["image"], sample["anatomy"]
    assert anatomy.shape == image.shape and anatomy.dtype == torch.int64
    assert set(anatomy.unique().tolist()) <= {0, 1, 2, 3, 4} and (anatomy == 1).any() and (anatomy == 2).any()
    hu = image * 0.226 + 0.449  # back to the [0, 1] window: lung is dark, heart is soft tissue
    assert hu[anatomy == 1].median() < 0.25 < hu[anatomy == 2].median()
    raw = make(root, anatomy_dir=str(root / "anatomy_masks"), spacing=[10.0, 6.0, 6.0], size=[32, 64, 64])
    ids = set(raw.load_sample(rec, train=False)["anatomy"].unique().tolist())
    assert {10, 51, 52} <= ids  # TotalSegmentator v2 ids without a grouping
    flip = make(root, anatomy_dir=str(root / "anatomy_masks"), anatomy_groups="fvlm4", spacing=[10.0, 6.0, 6.0],
                size=[32, 64, 64], flip_prob=1.0)
    rec = dataclasses.replace(rec, image_path=rec.image_path[:1], meta={**rec.meta, "volumes": rec.meta["volumes"][:1]})
    sample = dm.load_sample(rec, train=False)  # one reconstruction: train and eval read the same volume
    image, anatomy = sample["image"], sample["anatomy"]
    flipped = flip.load_sample(rec, train=True)
    assert torch.equal(flipped["anatomy"], torch.flip(anatomy, [1, 2, 3]))
    assert torch.allclose(flipped["image"], torch.flip(image, [1, 2, 3]))
    batch = dm.collate([dm.dataset("train")[0], dm.dataset("train")[1]])
    assert batch.anatomy_masks.shape == (2, 1, 32, 64, 64)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match="No anatomy mask"):
        make(root, anatomy_dir=str(tmp_path / "elsewhere"), size=[32, 64, 64]).load_sample(rec, train=False)


def test_fvlm_anatomy_texts_crop_and_a_missing_mask_folder(tmp_path, tiny_tokenizer):
    """data.anatomy_text=fvlm: every item carries fVLM's four anatomy texts and abnormal flags (from the demo's
    desc_info.json / conc_info.json); data.crop=anatomy cuts the anatomy box, pads it and crops data.size from
    it; a mask folder that does not exist is named before anything is read."""
    import json

    from medvlp.datamodules.ct_rate import fvlm_anatomy_texts
    from medvlp.datamodules.demo import write_ct_demo

    root = write_ct_demo(tmp_path / "ct", size="tiny", seed=0)
    kw = dict(anatomy_dir="anatomy_masks", anatomy_groups="fvlm4", anatomy_text="fvlm", spacing=[10.0, 6.0, 6.0])
    dm = make(root, size=[32, 64, 64], **kw)
    dm.set_tokenizer(tiny_tokenizer)
    desc, conc = (json.loads((root / f).read_text()) for f in ("desc_info.json", "conc_info.json"))
    batch = dm.collate([dm.dataset("train")[i] for i in range(3)])
    assert list(batch.anatomy_texts) == ["lung", "heart", "esophagus", "aorta"] and batch.anatomy_abnormal.shape == (3, 4)
    for i, rec in enumerate(dm.records("train")[:3]):
        texts, abnormal = fvlm_anatomy_texts(desc.get(rec.study_id), conc.get(rec.study_id))
        assert [batch.anatomy_texts[a][i] for a in texts] == list(texts.values())
        assert batch.anatomy_abnormal[i].tolist() == abnormal
        assert abnormal == [a in conc.get(rec.study_id, {}) for a in texts]
    boxed = make(root, size=[16, 48, 48], crop="anatomy", crop_margin=[1, 2, 2], **kw)
    rec = dm.records("train")[0]
    path, source = rec.image_path[0], boxed.cache_source(dataclasses.replace(rec, image_path=rec.image_path[0]))
    vol, lab = boxed.anatomy_box(path, source)
    full = boxed.load_anatomy(path, source, crop=False)
    where = np.nonzero(full)
    box = tuple(slice(max(int(w.min()) - m, 0), min(int(w.max()) + 1 + m, n)) for w, m, n in zip(where, (1, 2, 2), full.shape))
    cut = full[box]
    pads = [(max(s - n, 0) // 2, max(s - n, 0) - max(s - n, 0) // 2) for n, s in zip(cut.shape, (16, 48, 48))]
    assert np.array_equal(lab, np.pad(cut, pads)) and vol.shape == lab.shape and 0 <= vol.min() and vol.max() <= 1
    sample = boxed.load_sample(rec, train=True)
    assert sample["image"].shape == (1, 16, 48, 48) and sample["anatomy"].shape == (1, 16, 48, 48)
    custom = make(root, size=[16, 48, 48], crop="anatomy", crop_margin=[1, 2, 2],
                  **{**kw, "anatomy_groups": "custom",
                     "anatomy_group_map": {10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 51: 2, 61: 2, 15: 3, 52: 4}})
    assert np.array_equal(custom.anatomy_box(path, source)[1], lab)  # fVLM's merge written out as a custom table
    from medvlp.datamodules.transforms import VolumeTransform

    vol3 = torch.rand(4, 5, 6)
    keep_lr = VolumeTransform(mean=0.0, std=1.0, flip_prob=1.0, flip_axes=(True, True, False))
    assert torch.equal(keep_lr(vol3, train=True)[0], torch.flip(vol3, [0, 1]))  # x (left / right) never flipped
    whole = make(root, size=[16, 48, 48], crop="anatomy", crop_margin=[1, 2, 2], eval_crop="full", **kw)
    assert torch.equal(whole.load_sample(rec, train=False)["anatomy"][0], torch.from_numpy(lab.astype(np.int64)))
    with pytest.raises(DataRootError, match=r"data.anatomy_dir: .*no_masks does not exist"):
        CTRateDataModule.check_root(CTRateConfig(root=str(root), anatomy_dir="no_masks"))
    with pytest.raises(ValueError, match="data.crop='anatomy'"):
        make(root, crop="anatomy")


def test_reports_are_per_reconstruction(tmp_path, tiny_tokenizer):
    """Each reconstruction is paired with its own row of the reports CSV (§8.3: one row per VolumeName)."""
    vols = [CTVolume("train_1_a_1", findings="Lungs are clear.", impressions="No acute findings."),
            CTVolume("train_1_a_2", findings="Mild edema.", impressions="Effusion.", labels=(0, 1)),
            CTVolume("train_2_a_1", findings="", impressions="Not given."),  # no text: left out ...
            CTVolume("train_2_a_2", findings="Heart is normal."),  # ... its sibling kept
            CTVolume("valid_1_a_1")]
    write_ct_rate(tmp_path / "c", vols)
    text_1 = "The volume shows: No acute findings. The volume looks like: Lungs are clear."
    text_2 = "The volume shows: Effusion. The volume looks like: Mild edema."
    dm = make(tmp_path / "c", val_fraction=0.0)
    dm.set_tokenizer(tiny_tokenizer)
    recs = {r.study_id: r for r in dm.records("train")}
    assert recs["train_1_a"].text == text_1 and recs["train_1_a"].meta["texts"] == [text_1, text_2]
    assert [Path(p).name for p in recs["train_2_a"].image_path] == ["train_2_a_2.nii.gz"]
    assert [d.study_id for d in dm.dropped] == ["train_2_a_1"]
    drawn = []
    read = dm.load_volume
    dm.load_volume = lambda path, source=None: drawn.append(Path(path).name) or read(path, source)
    ds = dm.dataset("train")
    index = list(recs).index("train_1_a")
    pairs = set()
    for _ in range(12):
        item = ds[index]
        pairs.add((drawn[-1], item["text"], float(item["labels"][1])))
    assert pairs == {("train_1_a_1.nii.gz", text_1, 0.0), ("train_1_a_2.nii.gz", text_2, 1.0)}
    assert dm.dataset("test")[0]["text"] == dm.records("test")[0].text  # evaluation: the first reconstruction
    every = make(tmp_path / "c", val_fraction=0.0, reconstructions="all")
    assert [(Path(r.image_path).name, r.text) for r in every.records("train") if r.study_id == "train_1_a"] == [
        ("train_1_a_1.nii.gz", text_1), ("train_1_a_2.nii.gz", text_2)]
