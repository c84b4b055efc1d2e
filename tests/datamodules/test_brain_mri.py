"""Brain-MRI studies in HLIP's study-JSON layout: the synthetic world, the loader, scan sampling, errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.brain_mri import BrainMRIConfig, BrainMRIDataModule
from medvlp.datamodules.demo import brain_mri as world
from medvlp.datamodules.demo import write_brain_mri_demo
from medvlp.datamodules.demo._util import rng_for
from medvlp.datamodules.transforms import square_resize_crop

SMALL = {"num_slices": 16, "resize": 36, "image_size": 32, "num_scans": 3}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_brain_mri_demo(tmp_path_factory.mktemp("brain") / "brain-mri", size="tiny", seed=0)


def make(root: Path, tokenizer=None, **kw) -> BrainMRIDataModule:
    return BrainMRIDataModule(BrainMRIConfig(root=str(root), **{**SMALL, **kw}), tokenizer)


def test_layout_index_schema_and_series_files(root: Path) -> None:
    train = json.loads((root / "train.json").read_text())
    valid = json.loads((root / "valid.json").read_text())
    assert not set(train) & set(valid) and len(train) + len(valid) == 12
    names = set()
    for study, entry in {**train, **valid}.items():
        assert set(entry) == {"series", "report_length", "report"} and entry["report_length"] == len(entry["report"])
        for series, info in entry["series"].items():
            t = torch.load(root / study / series / "img.pt", weights_only=True)
            assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == info["num_slices"]
            assert info["view"] in ("axial", "coronal", "sagittal")
            names.add(series)
    assert any(" " in n for n in names)  # real series names carry spaces
    counts = [len(e["series"]) for e in {**train, **valid}.values()]
    assert min(counts) == 1 and max(counts) == 6
    assert any(not e["report"] for e in train.values())  # the empty-report trap
    labels = (root / "labels.csv").read_text().splitlines()
    assert labels[0] == "study," + ",".join(world.BRAIN_FINDINGS) and len(labels) == 13


def test_records_text_labels_and_counts(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        dm = make(root)
        train, val = dm.records("train"), dm.records("val")
    assert dm.label_names == world.BRAIN_FINDINGS
    assert dm.counts["train_empty_reports"] == 1 and "empty report" in caplog.text
    index = json.loads((root / "train.json").read_text())
    test = dm.records("test")
    assert len(train) + len(val) == len(index) - 1 and val  # val is drawn from train.json's studies
    assert len(test) == len(json.loads((root / "valid.json").read_text()))  # valid.json tests, never validates
    assert not {r.study_id for r in val} & {r.study_id for r in test} and not {r.study_id for r in val} & {r.study_id for r in train}
    planned = {s.study_id: s for s in world.plan_studies(12, 0)}
    for rec in train + val:
        s = planned[rec.study_id]
        assert rec.text == "This MRI study shows: " + " ".join(s.report) and "nan" not in rec.text.lower()
        assert rec.labels.tolist() == [float(n in s.findings) for n in world.BRAIN_FINDINGS]
        assert [Path(p).parent.name for p in rec.image_path] == [name for name, _, _ in s.series]


def test_train_text_is_shuffled_or_one_sentence(root: Path) -> None:
    dm = make(root)
    rec = max(dm.records("train"), key=lambda r: len(r.meta["sentences"]))
    sentences = rec.meta["sentences"]
    assert len(sentences) >= 3
    torch.manual_seed(0)
    draws = {dm.item_text(rec, train=True) for _ in range(30)}
    assert len(draws) > 1
    for d in draws:
        assert d.startswith("This MRI study shows: ") and sorted(d[len("This MRI study shows: "):].split(". ")) != []
        assert sorted(s for s in sentences) == sorted(s for s in sentences if s in d)
    assert dm.item_text(rec, train=False) == rec.text
    one = make(root, report_mode="sentence")
    assert all(one.item_text(rec, train=True)[len("This MRI study shows: "):] in sentences for _ in range(10))


def test_scan_sampling_repeat_and_pad(root: Path) -> None:
    dm = make(root)
    torch.manual_seed(0)
    assert sorted(dm.scan_order(1, True)) == [0, 0, 0]  # one series, repeated
    order = dm.scan_order(2, True)
    assert len(order) == 3 and set(order) == {0, 1}
    six = dm.scan_order(6, True)
    assert len(six) == 3 and len(set(six)) == 3  # a random subset without repetition
    assert dm.scan_order(6, False) == list(range(6))
    pad = make(root, scan_sampling="pad")
    assert len(pad.scan_order(6, True)) == 3 and sorted(pad.scan_order(2, True)) == [0, 1]
    assert sorted(make(root, scan_sampling="pad", num_scans=0).scan_order(6, True)) == list(range(6))
    assert make(root, eval_max_scans=2).scan_order(6, False) == [0, 1]


def test_batches_carry_scans_and_scan_mask(root: Path, tiny_tokenizer) -> None:
    dm = make(root, tiny_tokenizer, batch_size=12, eval_batch_size=12)
    batch = next(iter(dm.train_dataloader()))
    # every study repeated to 3 scans: nothing padded, so no mask (the encoder reads none from the device)
    assert batch.images.shape[1:] == (3, 1, 16, 32, 32) and batch.scan_mask is None
    single = [i for i, r in enumerate(dm.records("train")) if len(r.image_path) == 1]
    item = dm.dataset("train")[single[0]]
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])
    pad = make(root, tiny_tokenizer, scan_sampling="pad", batch_size=12)
    batch = next(iter(pad.train_dataloader()))
    n = [min(3, len(r.image_path)) for r in pad.records("train")]
    assert sorted(batch.scan_mask.sum(1).tolist()) == sorted(n)
    for img, mask in zip(batch.images, batch.scan_mask, strict=True):
        assert (img[~mask] == 0).all()
    ev = next(iter(make(root, tiny_tokenizer, eval_num_slices=20).val_dataloader()))
    assert ev.images.shape[2:] == (1, 20, 32, 32)
    counts = ev.scan_mask.sum(1).tolist() if ev.scan_mask is not None else [ev.images.shape[1]] * len(ev.images)
    assert counts == [len(r.image_path) for r in make(root).records("val")]


def test_series_pipeline_matches_hlip_shape_normalisation(root: Path) -> None:
    dm = make(root)
    rec = dm.records("train")[0]
    raw = torch.load(rec.image_path[0], weights_only=True)
    out = dm.load_series(rec.image_path[0], train=True)
    expect = square_resize_crop(raw.float() / 255.0, 16, 36, 32, "nearest-exact")
    assert out.shape == (1, 16, 32, 32) and torch.allclose(out[0], (expect - 0.449) / 0.226)
    t = torch.zeros(4, 6, 10)
    t[:, 2, 3] = 1.0  # a non-square scan: padded to 10 x 10 with the image centred
    sq = square_resize_crop(t, 4, 10, 10)
    assert sq.shape == (4, 10, 10) and sq[0, 4, 3] == 1.0 and sq.sum() == 4
    assert square_resize_crop(torch.ones(5, 8, 8), 10, 16, 12).shape == (10, 12, 12)


def test_findings_are_visible_in_the_contrast_that_shows_them() -> None:
    studies = world.plan_studies(200, 0)

    def bright(s, contrast, thr):
        return int((world.render(s, contrast, "axial", rng_for(0, 5)) > thr).sum())

    normal = [s for s in studies if not s.findings][:3]
    for name, contrast, thr in (("Acute infarct", "DWI", 200), ("Ventriculomegaly", "T2", 200), ("Mass", "T1C", 210),
                                ("Hemorrhage", "T1", 205), ("White matter lesions", "FLAIR", 185)):
        sick = [s for s in studies if list(s.findings) == [name]][:3]
        assert len(sick) == 3, name
        assert min(bright(s, contrast, thr) for s in sick) > max(bright(s, contrast, thr) for s in normal) + 5, name
    s = [s for s in studies if list(s.findings) == ["Acute infarct"]][0]
    assert bright(s, "DWI", 200) > 3 * bright(s, "T1C", 200) + 5  # an infarct does not enhance


def test_bad_input_is_named(root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with pytest.raises(DataRootError, match="train.json"):
        BrainMRIDataModule.check_root(BrainMRIConfig(root=str(tmp_path)))
    index = json.loads((copy / "train.json").read_text())
    study = next(s for s, e in index.items() if e["report"])
    series = next(iter(index[study]["series"]))
    (copy / study / series / "img.pt").unlink()
    with pytest.raises(DataError, match=f"{study}/{series}/img.pt"):
        make(copy).records("train")
    with caplog.at_level(logging.WARNING):
        dm = make(copy, on_error="skip")
        recs = dm.records("train")
    assert dm.counts["train_missing_series"] == 1 and "without img.pt" in caplog.text
    assert any(r.study_id == study for r in recs) or len(index[study]["series"]) == 1
    (copy / "orphan_study" / "AX_T1").mkdir(parents=True)
    dm = make(copy, on_error="skip")
    dm.records("train")
    assert dm.counts["unlisted_study_folders"] == 1
    (copy / "bad.json").write_text('{"S1": {"series": ["AX_T1"], "report": ["x."]}}')
    with pytest.raises(DataError, match=r"bad.json: study 'S1' must be"):
        make(copy, train_file="bad.json").records("train")
    (copy / "broken.json").write_text('{"S1": ')
    with pytest.raises(DataError, match="broken.json is not readable JSON"):
        make(copy, train_file="broken.json").records("train")
    torch.save({"not": "a tensor"}, copy / study / series / "img.pt")
    with pytest.raises(DataError, match="holds a dict"):
        make(copy).load_series(str(copy / study / series / "img.pt"), train=False)
    for bad in ({"scan_sampling": "mask"}, {"report_mode": "all"}, {"image_size": 40}, {"num_scans": 0}):
        with pytest.raises(ValueError, match="data."):
            make(copy, **bad)


def test_without_a_valid_index_a_stable_fraction_of_train_studies_is_held_out(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "valid.json").unlink()
    dm = make(copy, val_fraction=0.3)
    train, val = {r.study_id for r in dm.records("train")}, {r.study_id for r in dm.records("val")}
    assert train and val and not train & val
    assert {r.study_id for r in make(copy, val_fraction=0.3).records("val")} == val
    assert make(copy, labels_file="missing.csv", val_fraction=0.3).records("val")[0].labels is None
