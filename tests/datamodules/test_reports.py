"""Report sectioning (specs/datasets.md §1.9) and the MGCA text rule (§1.10)."""

from __future__ import annotations

import pytest
from conftest import (
    REPORT_FINDINGS_ONLY,
    REPORT_FULL,
    REPORT_NO_HEADER,
    REPORT_NUMBERED,
    REPORT_TOO_SHORT,
    REPORT_TYPO,
    mimic_report,
)

from medvlp.datamodules.formats.reports import (
    get_sectioner,
    mgca_sentences,
    mgca_text,
    normalize_section_name,
    section_impression_only,
    section_report,
    split_sections,
)


def test_full_report_sections():
    s = section_report(REPORT_FULL)
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["findings"].startswith("Lungs are well expanded") and s["findings"].endswith("Heart size is normal.")
    assert s["comparison"] == "___"
    assert s["preamble"] == "FINAL REPORT"
    assert "last_paragraph" not in s


def test_mgca_text_impression_then_findings():
    text = mgca_text(section_report(REPORT_FULL))
    assert text.startswith("no acute cardiopulmonary process lungs are well expanded")
    assert "." not in text and text == text.lower()


def test_typo_headers_are_normalised():
    s = section_report(REPORT_TYPO)
    assert s["impression"] == "Worsening right lower lobe consolidation."
    assert s["findings"] == "Right basal opacity has increased in size."


@pytest.mark.parametrize(
    "header, name",
    [
        ("IMPRESSON", "impression"), ("CONCLUSION", "impression"), ("FINDINGS AND IMPRESSION", "impression"),
        ("FINDINGS/IMPRESSION", "impression"), ("FINIDNGS", "findings"), ("CHEST, TWO VIEWS", "findings"),
        ("PA AND LATERAL VIEWS OF THE CHEST", "findings"), ("PORTABLE SEMI-UPRIGHT", "findings"),
        ("CLINICAL HISTORY", "history"), ("PFI", "history"), ("REASON FOR EXAMINATION", "indication"),
        ("COMPARISONS", "comparison"), ("NDICATION", "impression"), ("ADDENDUM TO REPORT", "addendum"),
        ("WET READ", "wet read"), ("TECHNIQUE", "technique"),
    ],
)
def test_name_normalisation(header, name):
    assert normalize_section_name(header) == name


def test_no_header_gives_full_report_and_last_paragraph():
    s = section_report(REPORT_NO_HEADER)
    assert set(s) == {"full report", "last_paragraph"}
    assert s["last_paragraph"].startswith("The lungs are clear")
    assert mgca_text(s) is None  # MGCA uses impression + findings only
    assert mgca_text(s, names=["impression", "findings", "last_paragraph"]).startswith("the lungs are clear")


def test_findings_only():
    s = section_report(REPORT_FINDINGS_ONLY)
    assert "impression" not in s
    assert mgca_text(s) == "portable view of the chest small left pleural effusion is new mild cardiomegaly"


def test_numbered_list_is_split_into_sentences():
    sentences, count = mgca_sentences(section_report(REPORT_NUMBERED))
    assert sentences == ["no pneumothorax", "mild edema"]
    assert count == 4


def test_too_short_is_dropped():
    s = section_report(REPORT_TOO_SHORT)
    assert s["impression"] == "Normal."
    assert mgca_text(s) is None
    assert mgca_text({"impression": "No effusion."}, min_tokens=3) is None
    assert mgca_text({"impression": "No effusion."}, min_tokens=2) == "no effusion"


def test_empty_sections_dropped_and_last_occurrence_wins():
    text = mimic_report(FINDINGS="", IMPRESSION="First impression here.", ADDENDUM="Late note.", CONCLUSION="Second one wins.")
    s = section_report(text)
    assert "findings" not in s
    assert s["impression"] == "Second one wins."
    names = [n for n, _ in split_sections(text)]
    assert names.count("impression") == 2


def test_header_later_on_same_line_is_not_a_section():
    text = "   FINAL REPORT\n IMPRESSION:  Stable.\n ABC: not a header because the line goes on\n"
    # the second line *is* a header (it starts a line); only headers at line starts count
    assert "abc" in section_report(text)
    inline = "   FINAL REPORT\n IMPRESSION:  Stable. COMPARISON: none here.\n"
    assert set(section_report(inline)) == {"preamble", "impression"}
    # the whitespace after a header's colon may be the newline: the next line then belongs to it
    glued = "   FINAL REPORT\n IMPRESSION:\n FINDINGS: kept inside.\n"
    assert section_report(glued)["impression"] == "FINDINGS: kept inside."


def test_one_token_sentences_and_non_ascii():
    s = {"impression": "Clear. Lungs clear\u00e9 bilaterally. 3. Ok", "findings": None}
    sentences, count = mgca_sentences(s)
    assert sentences == ["lungs clear bilaterally"]
    assert count == 3


def test_sectioners_are_pluggable():
    assert get_sectioner("mimic") is section_report
    assert get_sectioner("chexzero") is section_impression_only
    assert get_sectioner("medvlp.datamodules.formats.reports:section_report") is section_report
    with pytest.raises(ValueError, match="Did you mean 'mimic'"):
        get_sectioner("mimc")
    imp = section_impression_only("FINDINGS: x IMPRESSION: old IMPRESSION: New edema. RECOMMENDATION(S): CT")
    assert imp == {"impression": "New edema."}
    assert section_impression_only("no headers at all") == {}
