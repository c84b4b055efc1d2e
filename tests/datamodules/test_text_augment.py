import pytest
import torch

from medvlp.datamodules.base import DataConfig, VLPDataModule, augment_text

REPORT = "Trachea is patent. No lymphadenopathy. Cardiomegaly is not present. A 30 mm nodule in the left lower lobe."


def sentences(text):
    return [s.strip() for s in text.replace(". ", ".|").split("|")]


def test_shuffle_keeps_every_sentence():
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        out = augment_text(REPORT, "shuffle")
        assert sorted(sentences(out)) == sorted(sentences(REPORT))
        seen.add(out)
    assert len(seen) > 3


def test_sample_keeps_half_and_never_nothing():
    torch.manual_seed(0)
    for _ in range(20):
        kept = sentences(augment_text(REPORT, "sample", 0.5))
        assert len(kept) == 2 and set(kept) <= set(sentences(REPORT))
    assert augment_text("Normal chest CT.", "sample", 0.1) == "Normal chest CT."
    assert augment_text("", "sample") == "" and augment_text(REPORT, "none") == REPORT


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="text_augment='drop'"):
        VLPDataModule(DataConfig(root="/x", text_augment="drop"))
    with pytest.raises(ValueError, match="text_keep"):
        VLPDataModule(DataConfig(root="/x", text_augment="sample", text_keep=0.0))
