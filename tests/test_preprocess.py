"""``medvlp preprocess`` and the datamodules reading its cache (tiny RSNA / SIIM / Object-CXR / MIMIC fixtures)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from format_fixtures import write_object_cxr_fixture, write_rsna_fixture, write_siim_fixture

from medvlp import preprocess as P
from medvlp.cli import main
from medvlp.datamodules.base import DataError
from medvlp.datamodules.demo import ensure_demo
from medvlp.datamodules.mimic_cxr import MimicCXRConfig, MimicCXRDataModule
from medvlp.datamodules.object_cxr import ObjectCXRConfig, ObjectCXRDataModule
from medvlp.datamodules.rsna import RSNAConfig, RSNAPneumoniaDataModule
from medvlp.datamodules.siim import SIIMConfig, SIIMPneumothoraxDataModule
from medvlp.datamodules.transforms import letterbox_params

SPLITS = ("train", "val", "test")
KINDS = {
    "rsna": (RSNAPneumoniaDataModule, RSNAConfig),
    "siim": (SIIMPneumothoraxDataModule, SIIMConfig),
    "object_cxr": (ObjectCXRDataModule, ObjectCXRConfig),
    "mimic": (MimicCXRDataModule, MimicCXRConfig),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pre")
    write_rsna_fixture(base / "rsna")
    write_siim_fixture(base / "siim")
    write_object_cxr_fixture(base / "object-CXR")
    return {"rsna": base / "rsna", "siim": base / "siim", "object_cxr": base / "object-CXR",
            "mimic": ensure_demo("cxr", size="tiny")}


def cfg_for(kind, root, cache, **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("augment", False)
    if kind == "object_cxr":
        kw.setdefault("split_protocol", "official")
    return KINDS[kind][1](root=str(root), preprocessed_dir=str(cache), **kw)


def make(kind, root, cache, **kw):
    return KINDS[kind][0](cfg_for(kind, root, cache, **kw))


def records(dm):
    return [r for s in SPLITS for r in dm.records(s)]


@pytest.mark.parametrize("kind, extra", [
    ("rsna", {"task": "detection", "image_size": 40}),  # DICOM (JPEG Baseline, MONOCHROME1), boxes, 64 / 48 px
    ("rsna", {"task": "segmentation"}),  # box masks
    ("siim", {"task": "segmentation"}),  # RLE masks at the DICOM size
    ("object_cxr", {"task": "detection"}),  # JPEGs decoded downscaled (DCT), boxes from original pixels
    ("object_cxr", {"task": "segmentation"}),  # shapes rasterised at the read size
    ("mimic", {}),  # MIMIC-CXR-JPG layout
    ("mimic", {"images_per_study": "one"}),  # several images per record: each cached
])
def test_cache_gives_the_on_the_fly_tensors(roots, tmp_path, kind, extra):
    cache = tmp_path / "cache"
    summary = P.preprocess(cfg_for(kind, roots[kind], cache, **extra), workers=1, progress=False)
    assert summary.failed == 0 and summary.done == summary.total > 0
    fly = make(kind, roots[kind], cache, use_preprocessed="false", **extra)
    cached = make(kind, roots[kind], cache, use_preprocessed="true", **extra)
    cached.read_pixels = None  # the cache must serve every image: decoding would fail
    recs = records(fly)
    assert cached.dataset("train") is not None
    for rec in recs:
        a, b = fly.load_sample(rec, train=False), cached.load_sample(rec, train=False)
        assert a.keys() == b.keys()
        assert a["image"].shape == b["image"].shape
        # the cache rounds the resized image to uint8: <= 0.5 / 255 before Normalize(0.5, 0.5)
        assert (a["image"] - b["image"]).abs().max() <= 1.01 / 255
        if "boxes" in a:
            torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
            assert torch.equal(a["box_labels"], b["box_labels"])
        if "mask" in a:
            if kind in ("rsna", "siim"):  # decoded at full size: the same nearest resize
                assert torch.equal(a["mask"], b["mask"])
            else:  # shapes rasterised at the read size: the cache's is the exact one at the output size
                orig_h, orig_w = cached.read_image(rec, train=False)[1]
                sy, sx, top, left = letterbox_params(orig_h, orig_w, 32)
                nh, nw = round(orig_h * sy), round(orig_w * sx)
                exact = np.zeros((32, 32), np.uint8)
                exact[top:top + nh, left:left + nw] = rec.mask.scaled(nh, nw, sx, sy)
                assert np.array_equal(b["mask"].numpy(), exact)
                assert (a["mask"] != b["mask"]).float().mean() < 0.04  # decoded at 2x, then nearest
    pixels, (h, w) = cached.read_image(recs[0], train=False)
    assert pixels.dtype == np.uint8 and max(pixels.shape) == extra.get("image_size", 32)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["image_size"] == extra.get("image_size", 32) and manifest["images"] == summary.total
    assert manifest["root"] == str(Path(roots[kind]).absolute()) and manifest["dtype"] == "uint8"
    if kind in ("rsna", "siim"):
        assert manifest["pixel_settings"] == {"voi": "auto"}


def test_resume_after_interruption(roots, tmp_path):
    cache = tmp_path / "cache"
    first = P.preprocess(cfg_for("rsna", roots["rsna"], cache, task="detection"), workers=2, progress=False)
    assert first.done == first.total == 10 and first.skipped_existing == 0
    index = P.read_index(cache)
    keys = sorted(P.parse_index(cache / "index.jsonl"))
    files = [cache / P.image_file(k) for k in keys]
    assert all(f.is_file() for f in files) and not list(cache.rglob("*.tmp"))
    files[0].unlink()  # deleted
    files[1].unlink()
    files[1].with_name(files[1].name + ".tmp").write_bytes(b"\x93NUMPY partial")  # a write cut short
    files[2].with_name(files[2].name + ".tmp").write_bytes(b"stale")  # stale tmp beside a complete file
    with open(cache / "index.jsonl", "a") as fh:
        fh.write('["files/torn", 12')  # a torn last index line
    (cache / "images" / "00").mkdir(exist_ok=True)
    again = P.preprocess(cfg_for("rsna", roots["rsna"], cache, task="detection"), workers=1, progress=False)
    assert (again.done, again.skipped_existing, again.failed) == (2, 8, 0)
    assert all(f.is_file() for f in files) and not files[1].with_name(files[1].name + ".tmp").exists()
    assert P.read_index(cache) == index  # the same original sizes, the torn line ignored
    dm = make("rsna", roots["rsna"], cache, task="detection", use_preprocessed="true")
    dm.read_pixels = None
    for rec in records(dm):
        dm.load_sample(rec, train=False)
    third = P.preprocess(cfg_for("rsna", roots["rsna"], cache, task="detection"), workers=1, progress=False)
    assert (third.done, third.skipped_existing) == (0, 10)
    with P._Lock(cache), pytest.raises(DataError, match="Another `medvlp preprocess` is writing"):
        P.preprocess(cfg_for("rsna", roots["rsna"], cache, task="detection"), workers=1, progress=False)


def test_mismatching_settings_refused(roots, tmp_path, caplog):
    cache = tmp_path / "cache"
    P.preprocess(cfg_for("siim", roots["siim"], cache), workers=1, progress=False)
    with pytest.raises(DataError, match=r"data\.image_size: cache 32, config 48") as err:
        P.preprocess(cfg_for("siim", roots["siim"], cache, image_size=48), workers=1, progress=False)
    assert "never mixed" in str(err.value)
    with pytest.raises(DataError, match=r"data\.voi: cache 'auto', config 'none'"):
        P.preprocess(cfg_for("siim", roots["siim"], cache, voi="none"), workers=1, progress=False)
    with pytest.raises(DataError, match=r"data\.image_size: cache 32, config 48") as err:
        make("siim", roots["siim"], cache, image_size=48, use_preprocessed="true").dataset("train")
    assert "medvlp preprocess --data siim_pneumothorax" in str(err.value)
    auto = make("siim", roots["siim"], cache, image_size=48)
    with caplog.at_level(logging.INFO, logger="medvlp"):
        assert auto.preprocessed() is None
    assert "data.image_size: cache 32, config 48" in caplog.text and "on the fly" in caplog.text
    assert auto.load_sample(auto.records("train")[0], train=False)["image"].shape == (3, 48, 48)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        P.preprocess(cfg_for("siim", roots["siim"], other), workers=1, progress=False)


def test_missing_cache_auto_true_false(roots, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "mc"))
    cfg = cfg_for("rsna", roots["rsna"], "", task="detection")
    dm = RSNAPneumoniaDataModule(cfg)
    assert P.cache_dir_for(dm).parent == tmp_path / "mc" / "preprocessed"
    assert P.cache_dir_for(dm).name.startswith("rsna_pneumonia-")
    with caplog.at_level(logging.INFO, logger="medvlp"):
        assert dm.preprocessed() is None
    assert "no preprocessed cache" in caplog.text
    with pytest.raises(DataError, match="medvlp preprocess --data rsna_pneumonia") as err:
        make("rsna", roots["rsna"], "", use_preprocessed="true").preprocessed()
    assert "data.image_size=32" in str(err.value) and "data.voi=auto" in str(err.value)
    assert make("rsna", roots["rsna"], "", use_preprocessed="false").preprocessed() is None
    with pytest.raises(ValueError, match="data.use_preprocessed='maybe'"):
        make("rsna", roots["rsna"], "", use_preprocessed="maybe")
    assert make("rsna", roots["rsna"], "", use_preprocessed="True").use_preprocessed == "true"  # YAML true
    P.preprocess(cfg, workers=1, progress=False)  # the default folder, per setting
    assert RSNAPneumoniaDataModule(cfg).preprocessed() is not None
    assert P.cache_dir_for(make("rsna", roots["rsna"], "", image_size=48)) != P.cache_dir_for(dm)


def test_corrupt_image_raise_or_skip(roots, tmp_path, caplog):
    root = tmp_path / "rsna"
    shutil.copytree(roots["rsna"], root)
    victim = sorted((root / "stage_2_train_images").glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:300])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=victim.name) as err:
        P.preprocess(cfg_for("rsna", root, cache), workers=1, progress=False)
    assert "on_error=skip" in str(err.value) and "re-run" in str(err.value)
    summary = P.preprocess(cfg_for("rsna", root, cache, on_error="skip"), workers=1, progress=False)
    assert summary.failed == 1 and summary.done + summary.skipped_existing == 9
    assert victim.name in summary.failures[0] and victim.name in summary.format()
    strict = make("rsna", root, cache, use_preprocessed="true")
    split = next(s for s in SPLITS if any(r.image_path == str(victim) for r in strict.records(s)))
    with pytest.raises(DataError, match="1 of .* not in the preprocessed cache") as err:
        strict.dataset(split)
    assert f"--splits {split}" in str(err.value) and victim.name in str(err.value)
    auto = make("rsna", root, cache, on_error="skip")
    with caplog.at_level(logging.INFO, logger="medvlp"):
        ds = auto.dataset(split)
    assert "decoded on the fly" in caplog.text
    items = [ds[i] for i in range(len(ds))]
    assert sum(it is None for it in items) == 1  # the corrupt one, skipped by on_error at training too


@pytest.fixture
def restore_logging():
    """main() configures the medvlp logger (own handler, no propagation); put it back for caplog."""
    logger = logging.getLogger("medvlp")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = state[0], state[1], state[2]


def test_cli_end_to_end(roots, tmp_path, capsys, restore_logging):
    cache = tmp_path / "cache"
    args = ["preprocess", "--data", "object_cxr", f"data.root={roots['object_cxr']}", "data.image_size=32",
            "data.split_protocol=official", f"data.preprocessed_dir={cache}", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done 15" in out and "failed 0" in out and str(cache) in out
    assert main([*args[:-3], "--splits", "train,val", "--workers", "1", "--no-progress"]) == 0
    assert "skipped (already cached) 13" in capsys.readouterr().out
    assert main([*args[:4], "data.image_size=64", *args[5:]]) == 2
    assert "medvlp preprocess: error:" in capsys.readouterr().err
    assert main(["preprocess", "--data", "ct_rate", "data.root=/nowhere"]) == 2
    assert "/nowhere" in capsys.readouterr().err  # volumes are supported too; the root is checked first
    assert main(["preprocess", "--data", "object_cxr", f"data.root={tmp_path / 'none'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
