"""Pub-Brain-5 (§12.5): absolute study paths, several series per study, 4-D tensors, empty folders,
and multi-scan batches with scan_mask."""

from __future__ import annotations

import shutil

import pytest
import torch

from medvlp.datamodules.base import DataError, DataRootError
from medvlp.datamodules.demo.pub_brain5 import write_pub_brain5_fixture
from medvlp.datamodules.pub_brain5 import CLASSES, PubBrain5Config, PubBrain5DataModule
from medvlp.registry import DATAMODULES

SMALL = {"num_slices": 4, "resize": 16, "image_size": 12}


@pytest.fixture(scope="module")
def pb_root(tmp_path_factory):
    return write_pub_brain5_fixture(tmp_path_factory.mktemp("pubbrain") / "pub_brain_5")


def make(root, **kw) -> PubBrain5DataModule:
    return PubBrain5DataModule(PubBrain5Config(root=str(root), **{**SMALL, **kw}))


def test_studies_series_labels_and_empty_folders(pb_root):
    assert DATAMODULES.get("pub_brain5") is PubBrain5DataModule and PubBrain5DataModule.multi_scan
    dm = make(pb_root)
    recs = {r.study_id: r for r in dm.records("test")}
    assert len(recs) == 5 and dm.counts["empty_studies"] == 1  # the empty BraTS-GLI folder: skipped, counted
    stroke = recs["sub-b74a5032"]
    assert [p.rsplit("/", 1)[-1] for p in stroke.image_path] == ["adc.pt", "dwi.pt", "flair.pt"]
    assert stroke.image_path[0].startswith(str(pb_root))  # /data/pub_brain_5 rewritten to the root
    assert dict(zip(CLASSES, stroke.labels.tolist(), strict=True))["Stroke"] == 1
    assert len(make(pb_root, subset="gt").records("test")) == 3  # open_bhb, stroke, brats23 (its empty study skipped)
    with pytest.raises(DataError, match="no usable records"):
        dm.records("train")


def test_series_pipeline_and_multi_scan_batch(pb_root, tiny_tokenizer):
    dm = make(pb_root)
    dm.set_tokenizer(tiny_tokenizer)
    recs = {r.study_id: r for r in dm.records("test")}
    stroke = dm.load_image(recs["sub-b74a5032"], train=False)  # its dwi series is 4-D: [..., 0] kept
    assert stroke.shape == (3, 1, 4, 12, 12) and stroke.dtype == torch.float32
    ds = dm.dataset("test")
    batch = dm.collate([ds[i] for i in range(len(ds))])
    sizes = [len(r.image_path) for r in dm.records("test")]
    assert batch.images.shape == (5, max(sizes), 1, 4, 12, 12)
    assert batch.scan_mask.tolist() == [[k < n for k in range(max(sizes))] for n in sizes]
    assert torch.all(batch.images[~batch.scan_mask] == 0)  # padding scans are empty
    capped = make(pb_root, max_scans=2)
    assert capped.load_image(capped.records("test")[1], train=True).shape[0] <= 2


def test_errors(pb_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pb_root, root)
    shutil.rmtree(root / "ucsf_mets")
    with pytest.raises(DataError, match="ucsf_mets/100222A -> .* does not exist"):
        make(root).records("test")
    skip = make(root, on_error="skip")
    assert len(skip.records("test")) == 4 and skip.counts["missing_studies"] == 1
    (root / "open_bhb" / "sub-135700393345" / "t1.pt").write_bytes(b"not a tensor")
    with pytest.raises(DataError, match="t1.pt is not a readable tensor file"):
        skip.load_image(skip.records("test")[0], train=False)
    with pytest.raises(DataRootError, match="pub_brain_5.csv"):
        PubBrain5DataModule.check_root(PubBrain5Config(root=str(tmp_path)))
    with pytest.raises(ValueError, match="data.subset"):
        make(pb_root, subset="train")
