"""Rad-ChestCT datamodule on the fixture of specs/datasets.md §9.5."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from medvlp import preprocess as P
from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.demo.rad_chestct import write_rad_chestct_fixture
from medvlp.datamodules.rad_chestct import CT_RATE_CLASSES, RadChestCTConfig, RadChestCTDataModule
from medvlp.registry import DATAMODULES

SMALL = {"spacing": [1.6, 1.6, 1.6], "size": [12, 16, 16]}


@pytest.fixture(scope="module")
def rc_root(tmp_path_factory):
    return write_rad_chestct_fixture(tmp_path_factory.mktemp("radchestct") / "rad-chestct")


def make(root, **kw) -> RadChestCTDataModule:
    return RadChestCTDataModule(RadChestCTConfig(root=str(root), **{**SMALL, **kw}))


def test_registered_and_splits(rc_root):
    assert DATAMODULES.get("rad_chestct") is RadChestCTDataModule
    assert RadChestCTDataModule.modality == "3d" and RadChestCTDataModule.default_prompts == "ct_rate.yaml"
    dm = make(rc_root)
    assert [r.study_id for r in dm.records("train")] == ["trn00001"]  # Set_Assigned imgtrain_extra
    assert [r.study_id for r in dm.records("val")] == ["val00002"]
    (test,) = dm.records("test")
    assert test.text == "" and test.meta["patient"] == "mrn00013" and test.image_path.endswith("part_b/volumes/tst00003.npz")


def test_labels_hlip_file_derived_and_per_abnormality(rc_root, tmp_path):
    dm = make(rc_root)
    names = [c for c, _ in CT_RATE_CLASSES]
    assert dm.label_names == names and len(names) == 15
    lab = {r.study_id: r.labels for s in ("train", "val", "test") for r in dm.records(s)}
    assert lab["trn00001"][names.index("Lung nodule")] == 1
    cor, art = names.index("Coronary artery wall calcification"), names.index("Arterial wall calcification")
    assert lab["trn00001"][cor] == lab["trn00001"][art] == 1  # calcification feeds both
    assert lab["tst00003"].tolist() == [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    # without HLIP's file the same labels are derived from the abnormality x location files
    copy = tmp_path / "copy"
    shutil.copytree(rc_root, copy)
    (copy / "rad_chestct_labels.csv").unlink()
    derived = make(copy)
    for s in ("train", "val", "test"):
        for r in derived.records(s):
            assert np.array_equal(r.labels, lab[r.study_id]), r.study_id
    per = make(rc_root, labels="abnormality")
    (t,) = per.records("test")
    assert per.label_names == ["air_trapping", "atelectasis", "calcification", "emphysema", "nodule", "pleural_effusion"]
    assert t.labels.tolist() == [0, 1, 0, 0, 1, 1]  # nodule = max over its two locations


def test_volume_geometry_orientation_and_hu(rc_root):
    dm = make(rc_root, size=[])
    rec = dm.records("test")[0]
    vol = dm.load_volume(rec.image_path)
    assert vol.shape == (12, 16, 16)  # 24 x 32 x 32 at 0.8 mm -> 1.6 mm
    # the marker sits in the first (most superior) stored slices, posterior and on the patient's left:
    # in LPS arrays superior = high z, posterior = high y, left = high x
    assert vol[-1, -1, -1] > 0.9 and vol[0, -1, -1] < 0.2
    stored = make(rc_root, size=[], orientation="", spacing=[])
    raw = stored.load_volume(rec.image_path)
    assert raw.shape == (24, 32, 32) and raw[0, -1, -1] == pytest.approx(1.0)  # window top: 350 HU
    assert raw[0, 0, 0] == pytest.approx((-1000 + 1150) / 1500, abs=0.015)  # air (+ noise), clipped at -1000
    ras = make(rc_root, size=[], orientation="RAS").load_volume(rec.image_path)
    np.testing.assert_allclose(ras, vol[:, ::-1, ::-1], atol=1e-6)
    img = dm.load_image(rec, train=False)
    assert img.shape == (1, 12, 16, 16) and img.dtype == torch.float32


def test_bad_input_is_named_or_skipped_and_counted(rc_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(rc_root, root)
    np.savez_compressed(root / "part_a" / "trn00001.npz", volume=np.zeros((4, 4, 4), np.int16))  # wrong key
    with pytest.raises(DataError, match=r"trn00001\.npz has no array 'ct'"):
        make(root).load_image(make(root).records("train")[0], train=False)
    (root / "part_b" / "volumes" / "val00002.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"val00002\.npz is not a readable \.npz"):
        make(root).load_volume(make(root).records("val")[0].image_path)
    (root / "part_b" / "volumes" / "tst00003.npz").unlink()
    with pytest.raises(DataError, match="tst00003 is listed in Summary_3630.csv but no tst00003.npz"):
        make(root).records("test")
    skip = make(root, on_error="skip")
    with pytest.raises(DataError, match="no usable records"):
        skip.records("test")
    assert skip.counts["test"] == 1
    (root / "extra").mkdir()
    np.savez_compressed(root / "extra" / "trn99999.npz", ct=np.zeros((4, 4, 4), np.int16))
    with pytest.raises(DataError, match="have no row in Summary_3630.csv"):
        make(root).records("train")
    with pytest.raises(DataRootError, match="Summary_3630.csv"):
        RadChestCTDataModule.check_root(RadChestCTConfig(root=str(tmp_path)))
    with pytest.raises(ValueError, match="data.labels"):
        make(rc_root, labels="findings")


def test_preprocessed_cache_matches_the_raw_volumes(rc_root, tmp_path):
    cache = tmp_path / "cache"
    cfg = RadChestCTConfig(root=str(rc_root), preprocessed_dir=str(cache), **SMALL)
    summary = P.preprocess(cfg, workers=1, progress=False)
    assert summary.done == summary.total == 3
    raw = make(rc_root, use_preprocessed="false")
    cached = RadChestCTDataModule(RadChestCTConfig(root=str(rc_root), preprocessed_dir=str(cache),
                                                   use_preprocessed="true", **SMALL))
    for split in ("train", "val", "test"):
        for r in raw.records(split):
            torch.testing.assert_close(cached.load_image(r, train=False), raw.load_image(r, train=False),
                                       atol=0.5 / 1500 / 0.226 + 1e-5, rtol=0)


def test_fvlm_zero_shot_reads_anatomy_maps_segmented_from_the_npz_arrays(rc_root, tmp_path):
    """§7.2: TotalSegmentator maps of the .npz arrays (<id>.nii.gz, the array's shape, no geometry) get the
    volume's implied geometry and stay aligned with it; fVLM's per-anatomy prompts score the CT-RATE classes,
    and HLIP's merged calcification variant reports 14 classes. A map of another shape is named."""
    import SimpleITK as sitk

    from medvlp import api
    from medvlp import config as C
    from medvlp.downstream.embed import extract
    from medvlp.downstream.zero_shot import load_merges, load_options, load_prompts, zero_shot_auc

    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted(rc_root.rglob("*.npz")):
        ct = np.load(path)["ct"]
        lab = np.zeros(ct.shape, np.uint8)
        lab[ct < -500] = 10  # lung (left upper lobe id)
        lab[4:10, 10:20, 12:20] = 51  # heart
        lab[2:12, 22:24, 15:17] = 15  # esophagus
        lab[3:11, 20:22, 19:21] = 52  # aorta
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(masks / (path.stem + ".nii.gz")))
    dm = make(rc_root, anatomy_dir=str(masks), anatomy_groups="fvlm4", size=[16, 32, 32])
    rec = dm.records("test")[0]
    sample = dm.load_sample(rec, train=False)
    lung = sample["anatomy"] == 1
    assert lung.any() and sample["image"][lung].mean() < sample["image"][sample["anatomy"] == 2].mean()

    cfg = C.compose(method="fvlm", overrides=["data.root=/unused"])
    torch.manual_seed(0)
    method = api.build_method(cfg)
    cfg.data = C.compose(data="rad_chestct", overrides=[f"data.root={rc_root}", f"data.anatomy_dir={masks}",
                                                        "data.anatomy_groups=fvlm4", "data.size=[16,32,32]",
                                                        "data.spacing=[2.4,1.6,1.6]", "data.eval_batch_size=4",
                                                        "data.num_workers=0"],
                         sections=("data",)).data
    dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
    emb = extract(method, dm.eval_dataloader("test"))
    assert emb.images.shape[1:] == (4, 128)
    for name, n in (("fvlm_rad_chestct.yaml", 15), ("fvlm_rad_chestct_merged.yaml", 14)):
        file = C.config_dir() / "prompts" / name
        prompts = load_prompts(file)
        res = zero_shot_auc(method, emb, list(dm.label_names), list(prompts), prompts, 32, load_merges(file), load_options(file))
        assert len(res["auroc"]) == n and all(p["anatomy"] in ("lung", "heart", "esophagus", "aorta") for p in prompts.values())
    bad = masks / (sorted(rc_root.rglob("*.npz"))[0].stem + ".nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)), str(bad))
    first = make(rc_root, anatomy_dir=str(masks), anatomy_groups="fvlm4", size=[16, 32, 32])
    rec = next(r for s in ("train", "val", "test") for r in first.records(s) if str(r.image_path).endswith(bad.name[:-7] + ".npz"))
    with pytest.raises(DataError, match=r"anatomy mask of .* has shape \(3, 4, 5\)"):
        first.load_sample(rec, train=False)
