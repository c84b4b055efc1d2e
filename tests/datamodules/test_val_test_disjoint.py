"""No datamodule validates on its test images: ``val`` and ``test`` share no image (nor a study id), for
every registered datamodule, on the synthetic worlds (``configs/data/demo_*.yaml``) and, for the
evaluation-only datasets without one, on their format fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvlp import api
from medvlp import config as C
from medvlp.datamodules.base import DataError
from medvlp.registry import DATAMODULES

DEMOS = sorted(p.stem for p in (Path(C.__file__).resolve().parents[1] / "configs" / "data").glob("demo_*.yaml"))


def _images(record) -> set[str]:
    paths = record.image_path if isinstance(record.image_path, list) else [record.image_path]
    return {str(p) for p in paths}


def split_items(dm, split: str) -> tuple[set[str], set[str]]:
    """Images and study ids of a split (empty when the dataset has no such split)."""
    try:
        recs = dm.records(split)
    except DataError as err:
        if "has no usable records" in str(err):
            return set(), set()
        raise
    return set().union(*(_images(r) for r in recs)) if recs else set(), {r.study_id for r in recs}


def assert_disjoint(dm, what: str, need_test: bool = True) -> None:
    (val_img, val_ids), (test_img, test_ids) = split_items(dm, "val"), split_items(dm, "test")
    train_img, _ = split_items(dm, "train")
    assert test_img or not need_test, f"{what}: no test images"
    assert not val_img & test_img, f"{what}: val and test share {len(val_img & test_img)} image(s), e.g. {sorted(val_img & test_img)[:2]}"
    assert not val_ids & test_ids, f"{what}: val and test share the studies {sorted(val_ids & test_ids)[:3]}"
    assert not train_img & test_img, f"{what}: train and test share {len(train_img & test_img)} image(s)"


def _demo(name: str):
    cfg = C.compose(data=name, sections=("data",))
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return api.build_datamodule(cfg), cfg.data.name


@pytest.mark.parametrize("name", DEMOS)
def test_demo_val_and_test_share_no_image(name):
    dm, _ = _demo(name)
    assert_disjoint(dm, name)


@pytest.fixture(scope="module")
def fixture_modules(tmp_path_factory) -> dict:
    """Datamodules of the datasets that have no synthetic world of their own, on their format fixtures."""
    from medvlp.datamodules.brain_mri import HeadCTConfig, HeadCTDataModule
    from medvlp.datamodules.cq500 import CQ500Config, CQ500DataModule
    from medvlp.datamodules.demo.cq500 import write_cq500_fixture
    from medvlp.datamodules.demo.pub_brain5 import write_pub_brain5_fixture
    from medvlp.datamodules.demo.rad_chestct import write_rad_chestct_fixture
    from medvlp.datamodules.demo.rsna_ich import write_rsna_ich_fixture
    from medvlp.datamodules.pub_brain5 import PubBrain5Config, PubBrain5DataModule
    from medvlp.datamodules.rad_chestct import RadChestCTConfig, RadChestCTDataModule
    from medvlp.datamodules.rsna_ich import RSNAICHConfig, RSNAICHDataModule

    tmp = tmp_path_factory.mktemp("disjoint")
    brain_root = _demo("demo_brain_mri")[0].cfg.root
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDVLP_CACHE", str(tmp / "cache"))
    try:
        ich = RSNAICHDataModule(RSNAICHConfig(root=str(write_rsna_ich_fixture(tmp / "ich")), val_fraction=0.45, test_fraction=0.45,
                                              spacing=[], size=[]))
        out = {
            "cq500": CQ500DataModule(CQ500Config(root=str(write_cq500_fixture(tmp / "cq500" / "CQ500")), spacing=[], size=[])),
            "pub_brain5": PubBrain5DataModule(PubBrain5Config(root=str(write_pub_brain5_fixture(tmp / "pb" / "pub_brain_5")),
                                                              num_slices=4, resize=16, image_size=12)),
            "rad_chestct": RadChestCTDataModule(RadChestCTConfig(root=str(write_rad_chestct_fixture(tmp / "rc")),
                                                                 spacing=[1.6, 1.6, 1.6], size=[12, 16, 16])),
            "rsna_ich": ich,
            "head_ct": HeadCTDataModule(HeadCTConfig(root=str(brain_root))),
        }
        for dm in out.values():  # read now, while the cache folder is set
            for split in ("train", "val", "test"):
                split_items(dm, split)
    finally:
        mp.undo()
    return out


def test_every_datamodule_is_covered_and_disjoint(fixture_modules):
    covered = {_demo(n)[1] for n in DEMOS} | set(fixture_modules)
    assert set(DATAMODULES.names()) <= covered, f"not checked: {sorted(set(DATAMODULES.names()) - covered)}"
    for name, dm in fixture_modules.items():
        assert_disjoint(dm, name, need_test=name != "rsna_ich")  # its fixture has two studies, split by a hash
