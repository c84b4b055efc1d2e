"""``medvlp preprocess --data ct_rate``: volumes stored once as int16 HU, read back memory-mapped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp import preprocess as P
from medvlp.cli import main
from medvlp.datamodules.base import DataError
from medvlp.datamodules.ct_rate import CTRateConfig, CTRateDataModule

SPACING = [5.0, 1.6, 1.6]
SIZE = [8, 16, 16]
SPLITS = ("train", "val", "test")


def cfg_for(root, cache, **kw) -> CTRateConfig:
    kw.setdefault("spacing", SPACING)
    kw.setdefault("size", SIZE)
    return CTRateConfig(root=str(root), preprocessed_dir=str(cache), reconstructions="all", **kw)


def volumes_of(dm, split):
    return [Path(r.image_path) for r in dm.records(split)]


def volumes(dm) -> dict[str, torch.Tensor]:
    return {str(r.image_path): dm.load_image(r, train=False) for s in SPLITS for r in dm.records(s)}


def test_cache_gives_the_same_volumes_and_is_read_memory_mapped(ct_root, tmp_path):
    cache = tmp_path / "cache"
    raw = volumes(CTRateDataModule(cfg_for(ct_root, cache, use_preprocessed="false")))
    summary = P.preprocess(cfg_for(ct_root, cache), workers=1, progress=False)
    assert summary.done == summary.total == len(raw) and summary.failed == 0
    manifest = json.loads((cache / P.MANIFEST).read_text())
    assert manifest["dtype"] == "int16" and manifest["ndim"] == 3
    assert manifest["volume_settings"]["spacing"] == SPACING and manifest["volume_settings"]["orientation"] == "LPS"

    dm = CTRateDataModule(cfg_for(ct_root, cache, use_preprocessed="true"))
    cached = volumes(dm)
    assert cached.keys() == raw.keys()
    for path, vol in raw.items():  # int16 rounding of HU: < 0.5 HU / 1500 HU window / std
        torch.testing.assert_close(cached[path], vol, atol=0.5 / 1500 / 0.226 + 1e-5, rtol=0)
    path = next(iter(raw))
    arr, meta = dm.preprocessed().read(path)
    assert isinstance(arr, np.memmap) and arr.dtype == np.int16 and arr.ndim == 3
    assert tuple(meta[:3]) == pytest.approx(tuple(SPACING)) and len(meta) == 6  # spacing (z, y, x) + origin

    # a window change needs no new cache (applied at read time); a spacing change is refused / ignored
    CTRateDataModule(cfg_for(ct_root, cache, use_preprocessed="true", size=[6, 12, 12])).load_image(
        dm.records("test")[0], train=False)
    with pytest.raises(DataError, match="spacing"):
        P.preprocess(cfg_for(ct_root, cache, spacing=[3.0, 1.0, 1.0]), workers=1, progress=False)
    with pytest.raises(DataError, match="medvlp preprocess --data ct_rate"):
        CTRateDataModule(cfg_for(ct_root, cache, use_preprocessed="true", spacing=[3.0, 1.0, 1.0])).dataset("test")


def test_resumes_after_an_interrupted_run_and_uses_workers(ct_root, tmp_path):
    cache = tmp_path / "cache"
    first = P.preprocess(cfg_for(ct_root, cache), splits=("test",), workers=2, progress=False)
    assert first.done == first.total > 0
    lines = (cache / P.INDEX).read_text().splitlines()
    (cache / P.INDEX).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:9])  # a torn last line, as after a kill
    again = P.preprocess(cfg_for(ct_root, cache), workers=2, progress=False)
    assert again.skipped_existing == first.total - 1
    assert again.done == again.total - again.skipped_existing
    assert len(P.read_index(cache)) == again.total


def test_unreadable_volume_is_named_or_skipped_and_counted(ct_root, tmp_path):
    root = tmp_path / "ct"
    shutil.copytree(ct_root, root)
    victim = next(iter(volumes_of(CTRateDataModule(cfg_for(root, tmp_path / "c0")), "test")))
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=victim.name):
        P.preprocess(cfg_for(root, tmp_path / "c1"), splits=("test",), workers=1, progress=False)
    summary = P.preprocess(cfg_for(root, tmp_path / "c2", on_error="skip"), splits=("test",), workers=1, progress=False)
    assert summary.failed == 1 and victim.name in summary.failures[0]
    assert summary.done == summary.total - 1


def test_cli(ct_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["preprocess", "--data", "ct_rate", f"data.root={ct_root}", "data.spacing=[5.0,1.6,1.6]",
            "data.size=[8,16,16]", f"data.preprocessed_dir={cache}", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "failed 0" in out and str(cache) in out
    cmd = P.command(CTRateDataModule(cfg_for(ct_root, cache)))
    assert "data.spacing=[5.0,1.6,1.6]" in cmd and "data.orientation=LPS" in cmd


@pytest.mark.parametrize("cached", [False, True])
def test_memory_stays_bounded_over_many_volume_reads(ct_root, tmp_path, cached):
    """Hundreds of reads (raw or from the memory-mapped cache, with an in-memory LRU of 2 volumes):
    the memory held afterwards does not grow with the number of reads."""
    import gc
    import tracemalloc

    cache = tmp_path / "cache"
    if cached:
        P.preprocess(cfg_for(ct_root, cache), workers=1, progress=False)
    dm = CTRateDataModule(cfg_for(ct_root, cache, cache_size=2, use_preprocessed="true" if cached else "false"))
    ds = dm.dataset("train")
    volume_bytes = 4 * int(np.prod(SIZE))

    def held_after(n: int) -> int:
        for i in range(n):
            ds[i % len(ds)]
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        held_after(len(ds))  # warm: the LRU fills, tables are parsed
        base = tracemalloc.get_traced_memory()[0]
        grown = held_after(300) - base
    finally:
        tracemalloc.stop()
    assert len(dm._cache) == 2
    assert grown < 2 * volume_bytes + 256 * 1024, f"{grown} bytes more after 300 reads"


def test_anatomy_maps_are_stored_with_the_volumes_and_read_from_the_cache(tmp_path):
    """With data.anatomy_dir the cache keeps each volume's label map (nearest neighbour, the volume's grid): the
    samples read from it equal the decoded ones, and training no longer opens the mask files."""
    from medvlp.datamodules.demo import write_ct_demo

    root = write_ct_demo(tmp_path / "ct", size="tiny", seed=0)
    cache = tmp_path / "cache"
    kw = dict(anatomy_dir="anatomy_masks", anatomy_groups="fvlm4", spacing=[10.0, 6.0, 6.0], size=[32, 64, 64])
    raw = CTRateDataModule(cfg_for(root, cache, use_preprocessed="false", **kw))
    records = raw.records("train")[:3]
    expected = [raw.load_sample(r, train=False) for r in records]
    summary = P.preprocess(cfg_for(root, cache, **kw), workers=1, progress=False)
    assert summary.failed == 0 and len(list(cache.rglob("*.anatomy.npy"))) == summary.total
    manifest = json.loads((cache / P.MANIFEST).read_text())
    assert manifest["anatomy"]["groups"] == "fvlm4" and manifest["anatomy"]["dir"].endswith("anatomy_masks")
    for f in (root / "anatomy_masks").rglob("*.nii.gz"):  # the cache must not need them any more
        f.write_bytes(b"not a mask")
    dm = CTRateDataModule(cfg_for(root, cache, use_preprocessed="true", **kw))
    for rec, want in zip(records, expected, strict=True):
        got = dm.load_sample(rec, train=False)
        assert torch.equal(got["anatomy"], want["anatomy"])
        torch.testing.assert_close(got["image"], want["image"], atol=0.5 / 1500 / 0.226 + 1e-5, rtol=0)
    assert "data.anatomy_dir=anatomy_masks" in dm.preprocessed().command
