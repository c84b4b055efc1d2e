"""Session fixtures of the datamodule tests. The writers live in ``tests/format_fixtures.py``
(re-exported here, so ``from conftest import write_mimic`` keeps working)."""

from __future__ import annotations

from pathlib import Path

import pytest
from format_fixtures import (  # noqa: F401 - re-exported for the tests of this folder
    CT_LABELS,
    CT_META_COLUMNS,
    CT_SHAPE,
    MIMIC_LABELS,
    MIMIC_STUDIES,
    MIMIC_TEST_SET,
    REPORT_FINDINGS_ONLY,
    REPORT_FULL,
    REPORT_NO_HEADER,
    REPORT_NUMBERED,
    REPORT_TOO_SHORT,
    REPORT_TWO_FRONTAL,
    REPORT_TYPO,
    CTVolume,
    MimicFixture,
    MimicImage,
    default_ct_volumes,
    mimic_report,
    phantom_hu,
    truncate,
    write_ct_rate,
    write_mimic,
    write_nifti,
)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer over a tiny vocab written to disk (no hub access)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "volume", "shows", "looks", "like", "lung", "lungs",
             "no", "acute", "clear", "effusion", "edema", "pneumothorax", "mild", "heart", ".", ":"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    if tok.convert_tokens_to_ids("lung") == tok.unk_token_id:  # transformers >= 5 takes the path as `vocab`
        tok = BertTokenizerFast(vocab=str(vocab))
    assert tok.convert_tokens_to_ids("lung") != tok.unk_token_id
    return tok


@pytest.fixture(scope="session")
def mimic_root(tmp_path_factory) -> MimicFixture:
    return write_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg" / "2.0.0")


@pytest.fixture(scope="session")
def ct_root(tmp_path_factory) -> Path:
    """The parent folder holding ``dataset/`` (read-only for tests: copy before modifying)."""
    parent = tmp_path_factory.mktemp("ctrate")
    write_ct_rate(parent)
    return parent
