"""Free-text radiology reports: sectioning and the MGCA pre-training text.

``section_report`` re-implements the behaviour of the MIMIC-CXR section parser that every 2D seed
method relies on (MIT-LCP ``mimic-cxr: txt/section_parser.py``, copied into MGCA
``mgca/preprocess/utils.py``); see ``specs/datasets.md`` §1.9. ``mgca_text`` turns the sections into
the text MGCA trains on (§1.10). Sectioners are pluggable: ``get_sectioner(name)`` maps a config
value (``data.sectioner``) to a function ``str -> dict[str, str]``.

Differences from the official code:
    * The ~54 studies that MIT-LCP special-cases by hand are not special-cased here (their text is
      sectioned like any other report); MGCA silently drops them, we keep them.
    * ``section_report`` returns every normalised section (last occurrence wins), not only the four
      columns of ``mimic_cxr_sectioned.csv``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable

from medvlp.registry import did_you_mean

Sectioner = Callable[[str], dict[str, str]]

# A header: start of a line (newline + the single leading space of MIMIC reports), upper-case words,
# a colon, one whitespace character.
_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
_PARAGRAPH = "\n \n"

# Exact header names (lower-cased) -> canonical section name. Frequent spellings, synonyms and the
# typos observed in the corpus.
_CANONICAL: dict[str, str] = {
    # synonyms
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "clinical history": "history",
    "patient history": "history",
    "clinical information": "history",
    "pfi": "history",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "clinical indication": "indication",
    "exam": "examination",
    "type of examination": "examination",
    "conclusion": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "chest, two views": "findings",
    "reference findings": "findings",
    "recommendation": "recommendations",
    "recommendation(s)": "recommendations",
    "wetread": "wet read",
    "ndication": "impression",  # sic: the reference parser maps this truncated header to impression
    # typos
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "idication": "indication",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
}
# A header *containing* one of these words is that section (checked in this order).
_MAIN = ("impression", "findings", "history", "comparison", "addendum")
# Headers that describe the views of the study ("CHEST, PA AND LATERAL:") hold the findings.
_VIEW_DESCRIPTION = re.compile(
    "|".join(
        re.escape(p)
        for p in (
            "chest", "portable", "pa and lateral", "lateral and pa", "ap and lateral", "lateral and ap",
            "frontal and", "two views", "frontal view", "pa view", "ap view", "one view", "lateral view",
            "bone window", "frontal upright", "frontal semi-upright", "ribs", "pa and lat",
        )
    )
)


def normalize_section_name(name: str) -> str:
    """Canonical name of a report header (``"IMPRESSON"`` -> ``"impression"``)."""
    key = name.lower().strip()
    if key in _CANONICAL:
        return _CANONICAL[key]
    for main in _MAIN:
        if main in key:
            return main
    if _VIEW_DESCRIPTION.search(key):
        return "findings"
    return key


def split_sections(text: str) -> list[tuple[str, str]]:
    """Split a report into ``(normalised name, raw text)`` pairs, in order of appearance.

    Text before the first header is ``preamble``; a report without any header is a single
    ``full report`` section. Empty ``impression``/``findings`` sections are removed; when neither
    remains, the last section is cut at its first blank line and the rest becomes
    ``last_paragraph``.
    """
    sections: list[tuple[str, str]] = []
    match = _HEADER.search(text)
    if match is None:
        sections.append(("full report", text))
    else:
        sections.append(("preamble", text[: match.start(1)]))
        while match is not None:
            name = match.group(1)
            body_start = match.end()
            # resume the search at the end of the header's line, so a header-like token further on
            # the same line cannot open a new section
            newline = text.find("\n", body_start)
            match = _HEADER.search(text, newline if newline != -1 else body_start)
            body_end = match.start() if match is not None else len(text)
            sections.append((normalize_section_name(name), text[body_start:body_end]))

    sections = [(n, t) for n, t in sections if n not in ("impression", "findings") or t.strip()]
    names = {n for n, _ in sections}
    if "impression" not in names and "findings" not in names:
        last_name, last_text = sections[-1]
        if _PARAGRAPH in last_text:
            head, tail = last_text.split(_PARAGRAPH, 1)
            sections[-1] = (last_name, head)
            sections.append(("last_paragraph", tail))
    return sections


def section_report(text: str) -> dict[str, str]:
    """Sections of a MIMIC-CXR report: canonical name -> stripped text (last occurrence wins).

    Args:
        text: the report file content, unmodified (lines start with one space in MIMIC).

    Returns:
        e.g. ``{"preamble": ..., "findings": ..., "impression": ...}``; ``last_paragraph`` appears
        only when the report has neither impression nor findings.
    """
    out: dict[str, str] = {}
    for name, body in split_sections(text):
        out[name] = body.strip()
    return out


_CHEXZERO_STOP = {"RECOMMENDATION(S):", "RECOMMENDATIONS:", "RECOMMENDATION:", "NOTIFICATION:"}


def section_impression_only(text: str) -> dict[str, str]:
    """CheXzero's rule: the words after the last ``IMPRESSION:`` up to a recommendation/notification.

    Differences from the official code (CheXzero ``data_process.py``): a report without an
    impression yields ``{}`` (the study's text is then missing) instead of the literal
    ``"NO IMPRESSION"``.
    """
    words = text.split()
    starts = [i for i, w in enumerate(words) if w == "IMPRESSION:"]
    if not starts:
        return {}
    kept: list[str] = []
    for w in words[starts[-1] + 1 :]:
        if w in _CHEXZERO_STOP:
            break
        kept.append(w)
    body = " ".join(kept).strip()
    return {"impression": body} if body else {}


SECTIONERS: dict[str, Sectioner] = {
    "mimic": section_report,
    "chexzero": section_impression_only,
}


def get_sectioner(name: str) -> Sectioner:
    """The sectioner called ``name`` (``data.sectioner``), or a ``"package.module:function"``."""
    if name in SECTIONERS:
        return SECTIONERS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"data.sectioner '{name}' could not be imported: {err}") from err
        if not callable(fn):
            raise ValueError(f"data.sectioner '{name}' is not a function.")
        return fn
    options = sorted(SECTIONERS)
    raise ValueError(
        f"Unknown data.sectioner '{name}'.{did_you_mean(name, options)} Available: {', '.join(options)} "
        f"(or 'package.module:function' returning dict[str, str])."
    )


_NUMBERED = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")


def mgca_sentences(sections: dict[str, str], names: Iterable[str] = ("impression", "findings")) -> tuple[list[str], int]:
    """MGCA's sentence list of a study and its token count.

    The listed sections are joined with a space (missing ones count as empty), newlines become
    spaces, the text is cut at numbered-list markers (``[0-9]+\\.``) and then at every ``.``; each
    piece is lower-cased and tokenised with ``\\w+``; pieces with at most one token are dropped;
    non-ASCII characters are removed from tokens.

    Returns:
        (sentences, each a space-joined token string; total number of kept tokens)
    """
    text = " ".join(sections.get(n) or "" for n in names).replace("\n", " ")
    sentences: list[str] = []
    count = 0
    for item in _NUMBERED.split(text):
        for piece in item.split("."):
            if not piece:
                continue
            tokens = _WORD.findall(piece.replace("\ufffd\ufffd", " ").lower())
            if len(tokens) <= 1:
                continue
            ascii_tokens = [t for t in (tok.encode("ascii", "ignore").decode("ascii") for tok in tokens) if t]
            if ascii_tokens:
                sentences.append(" ".join(ascii_tokens))
            count += len(ascii_tokens)
    return sentences, count


def mgca_text(
    sections: dict[str, str], min_tokens: int = 3, names: Iterable[str] = ("impression", "findings")
) -> str | None:
    """The pre-training text MGCA builds from a sectioned report, or None if too short.

    Args:
        sections: output of a sectioner.
        min_tokens: a study with fewer kept tokens in total is dropped (MGCA: 3).
        names: sections joined in this order (MGCA: impression then findings).

    Returns:
        the kept sentences joined by single spaces (lower-case, no punctuation), or None.
    """
    sentences, count = mgca_sentences(sections, names)
    if count < min_tokens or not sentences:
        return None
    return " ".join(sentences)
