"""The synthetic "radiology world": small datasets written in the real on-disk formats.

Worlds, each a faithful copy of a published layout (``specs/datasets.md``) filled with
procedurally drawn images whose findings also appear, with side and location, in the reports:

* ``cxr`` - MIMIC-CXR-JPG (§1): JPG radiographs, ``s<study>.txt`` reports, the gzipped metadata /
  split / CheXpert / NegBio CSVs and the v2.1.0 test labels (:mod:`~medvlp.datamodules.demo.cxr`);
* ``ct`` - CT-RATE (§8): v1 NIfTI volumes (raw stored values, default header) plus a few v2
  ``*_fixed`` copies, reports / labels / metadata CSVs, and TotalSegmentator-style anatomy masks
  (:mod:`~medvlp.datamodules.demo.ct`);
* ``brain_mri`` - brain-MRI studies of 1-6 series (T1, T2, FLAIR, DWI, post-contrast T1) with report
  sentence lists in HLIP's study-JSON layout (§12.4) (:mod:`~medvlp.datamodules.demo.brain_mri`);
* ``adni`` - T1 brain MRI of ADNI / NACC / OASIS-2 / AIBL / MIRIAD-style cohorts with EHR text ending in
  ``The diagnosis is <LABEL>.``, in MedBLIP's tab-separated ``local_data/<list>.csv`` lists (§13.2); the
  diagnosis (CN / MCI / AD) shows as ventricle enlargement, cortical atrophy and hippocampal loss
  (:mod:`~medvlp.datamodules.demo.adni`);
* ``rad_chestct`` / ``cq500`` / ``rsna_ich`` / ``pub_brain5`` / ``medblip_mri`` - format examples: the small
  fixtures of those layouts (one size; for reading a format, too small to train on);
* ``chexpert`` / ``rsna`` / ``siim`` / ``nih14`` / ``covidx`` / ``object_cxr`` - the same synthetic
  chest X-rays (no reports) as CheXpert CSVs + JPGs, RSNA DICOMs + boxes, SIIM DICOMs + RLE masks,
  ChestX-ray14 PNGs + boxes, COVIDx label files and Object-CXR annotations, for the downstream
  tasks (:mod:`~medvlp.datamodules.demo.downstream`).

Ground truth that is not part of the official layouts lives in ``<root>/demo_truth/``
(``cxr_findings.csv`` + ``masks/*.png``, ``ct_findings.csv``, ``info.json``, the ``adni`` world's
``vqa.csv``); CT anatomy masks
live in ``<root>/anatomy_masks/<split>/<VolumeName>`` with ``labels.json``. The same seed gives
byte-identical CSVs and identical pixel arrays. ``ensure_demo`` generates a world once into the
cache and returns its root; ``medvlp demo --out DIR`` calls :func:`main_demo`.

Traps a loader meets (on the first studies / patients of every size, more at random in
``default``): MIMIC - LATERAL / LL / AP AXIAL extra images and a study whose only image has a
blank ViewPosition, AP and PA frontals, a float ``StudyTime`` below 100000, 22nd-century dates,
reports without headers, findings-only, ``IMPRESSON:`` / ``IMPRESSIONS:`` / ``CONCLUSION:`` /
``FINDINGS AND IMPRESSION:`` headers, a numbered impression, a "Stable." report (all 14 labels
blank), a study without a CheXpert row, -1.0 labels. CT-RATE - ``valid`` vs ``validation`` file
names, recon ``_10`` beside ``_1``/``_2``, a patient with scans ``a`` and ``b``, raw stored values
(int16 with intercept -1024, uint16 with -8192 on "Siemens Healthineers" rows) under a default
header, ``*_fixed`` v2 copies in HU with true geometry, list-valued metadata strings,
``Not given.`` and empty report cells. ADNI lists - every label spelling (``CN``, ``NC``, ``Control``,
``control``, ``Nondemented``, ``MCI``, ``AD``, ``Dementia``, ``Demented``), OASIS-2 ``Converted`` rows, ADNI
visits without a diagnosis sentence, rows missing an EHR field, subjects with several visits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medvlp.cache import cache_dir
from medvlp.datamodules.demo import adni, brain_mri, ct, cxr, downstream
from medvlp.datamodules.demo._util import pick, rng_for, write_json
from medvlp.datamodules.demo.brain_mri import BRAIN_FINDINGS
from medvlp.datamodules.demo.ct import CT_FINDINGS
from medvlp.datamodules.demo.cxr import CXR_FINDINGS

__all__ = [
    "BRAIN_FINDINGS", "CT_FINDINGS", "CXR_FINDINGS", "GEN_VERSION", "SIZES", "DemoSize", "cache_dir", "ensure_demo", "main_demo",
    "report_corpus", "write_adni_demo", "write_brain_mri_demo", "write_ct_demo", "write_cxr_demo",
]  # fmt: skip

GEN_VERSION = 2  # bump whenever the generated content changes, so cached copies are rebuilt


@dataclass(frozen=True)
class DemoSize:
    """Size preset of the synthetic world."""

    cxr_studies: int  # MIMIC-CXR studies (a few carry no frontal image: a trap)
    ct_patients: int  # CT-RATE patients, ~2/9 of them in the valid split
    downstream_images: int  # images of each downstream world (CheXpert, RSNA, SIIM, NIH14)
    brain_studies: int  # brain-MRI studies (HLIP layout), ~1/5 of them in the valid split
    adni_subjects: int  # training subjects of the MedBLIP-list world (ADNI ~55 %, NACC ~28 %, OASIS-2 the rest)


SIZES = {
    "tiny": DemoSize(cxr_studies=12, ct_patients=6, downstream_images=40, brain_studies=12, adni_subjects=20),  # unit tests: every trap, a few seconds
    "default": DemoSize(cxr_studies=1200, ct_patients=360, downstream_images=600, brain_studies=500, adni_subjects=360),  # CPU training demos
}
# format examples: the tiny fixtures of specs/datasets.md §9-13, one size (for reading a layout, not training)
FORMAT_KINDS = {
    "rad_chestct": ("rad_chestct", "write_rad_chestct_fixture", "rad-chestct"),
    "cq500": ("cq500", "write_cq500_fixture", "cq500"),
    "rsna_ich": ("rsna_ich", "write_rsna_ich_fixture", "rsna-ich"),
    "pub_brain5": ("pub_brain5", "write_pub_brain5_fixture", "pub-brain-5"),
    "medblip_mri": ("medblip_mri", "write_medblip_fixture", "medblip-mri"),
}
KINDS = ("cxr", "ct", "brain_mri", "adni", *downstream.KINDS, *FORMAT_KINDS)
_CORPUS_STREAM = 99


def _size(size: str) -> DemoSize:
    if size not in SIZES:
        raise ValueError(f"Unknown demo size '{size}'. Choose one of: {', '.join(SIZES)}.")
    return SIZES[size]




def write_cxr_demo(out: str | os.PathLike, size: str = "default", seed: int = 0) -> Path:
    """Write the MIMIC-CXR-JPG world into ``out`` (created; existing files are overwritten).

    Args:
        out: dataset root to write.
        size: a key of ``SIZES``.
        seed: world seed; the same seed gives identical files.

    Returns:
        The dataset root (``out``).
    """
    root = Path(out)
    cxr.write_dataset(root, _size(size).cxr_studies, seed)
    return root


def write_ct_demo(out: str | os.PathLike, size: str = "default", seed: int = 0) -> Path:
    """Write the CT-RATE world into ``out``, which plays the role of CT-RATE's ``dataset/`` folder.

    Args:
        out: dataset root to write (gets ``train/``, ``valid/``, ``radiology_text_reports/``, ...).
        size: a key of ``SIZES``.
        seed: world seed; the same seed gives identical files.

    Returns:
        The dataset root (``out``).
    """
    root = Path(out)
    ct.write_dataset(root, _size(size).ct_patients, seed)
    return root


def write_brain_mri_demo(out: str | os.PathLike, size: str = "default", seed: int = 0) -> Path:
    """Write the brain-MRI world (multi-series studies, HLIP's study-JSON layout) into ``out``.

    Args:
        out: dataset root to write (gets ``train.json``, ``valid.json``, ``labels.csv``, study folders).
        size: a key of ``SIZES``.
        seed: world seed; the same seed gives identical files.

    Returns:
        The dataset root (``out``).
    """
    root = Path(out)
    brain_mri.write_dataset(root, _size(size).brain_studies, seed)
    return root


def write_adni_demo(out: str | os.PathLike, size: str = "default", seed: int = 0) -> Path:
    """Write the Alzheimer's brain-MRI world (MedBLIP's ``local_data/<list>.csv`` lists) into ``out``.

    Args:
        out: dataset root to write (gets ``local_data/``, the cohort folders and ``demo_truth/``).
        size: a key of ``SIZES`` (``adni_subjects`` training subjects; class-balanced test lists).
        seed: world seed; the same seed gives identical lists and voxel arrays.

    Returns:
        The dataset root (``out``).
    """
    root = Path(out)
    adni.write_dataset(root, _size(size).adni_subjects, seed)
    return root


def _downstream_writer(kind: str) -> Callable[[str | os.PathLike, str, int], Path]:
    def write(out: str | os.PathLike, size: str = "default", seed: int = 0) -> Path:
        downstream.write_downstream(kind, Path(out), _size(size).downstream_images, seed)
        return Path(out)

    write.__doc__ = f"Write the {kind} downstream world (demo/downstream.py) into ``out``."
    return write


def _format_writer(kind: str) -> Callable[[str | os.PathLike, str, int], Path]:
    module, function, _ = FORMAT_KINDS[kind]

    def write(out: str | os.PathLike, size: str = "default", seed: int = 0) -> Path:
        import importlib

        root = Path(out)
        getattr(importlib.import_module(f"medvlp.datamodules.demo.{module}"), function)(root, seed=seed)
        files = [p for p in root.rglob("*") if p.is_file()]
        write_json(root / "demo_truth" / "info.json", {"world": kind, "seed": seed, "format_example": True,
                                                       "counts": {"files": len(files)}})
        return root

    write.__doc__ = f"Write the {kind} format example (demo/{module}.py; one size) into ``out``."
    return write


_WRITERS: dict[str, Callable[[str | os.PathLike, str, int], Path]] = {
    "cxr": write_cxr_demo,
    "ct": write_ct_demo,
    "brain_mri": write_brain_mri_demo,
    "adni": write_adni_demo,
    **{k: _downstream_writer(k) for k in downstream.KINDS},
    **{k: _format_writer(k) for k in FORMAT_KINDS},
}


def ensure_demo(kind: str, size: str = "default", seed: int = 0) -> Path:
    """The root of a cached demo world, generated on first use.

    The world is written into a temporary sibling folder and moved into place with one atomic
    rename, so an interrupted run never leaves a partial dataset and concurrent callers never see
    one: if another process finishes first, its copy is kept and ours is discarded.

    Args:
        kind: ``cxr`` (MIMIC-CXR-JPG), ``ct`` (CT-RATE), ``brain_mri`` (HLIP study JSON), ``adni`` (MedBLIP lists), a
            downstream world (``chexpert``, ``rsna``, ``siim``, ``nih14``, ``covidx``, ``object_cxr``) or a format example.
        size: a key of ``SIZES``.
        seed: world seed.

    Returns:
        ``cache_dir()/demo/<kind>-<size>-s<seed>-v<GEN_VERSION>``.
    """
    if kind not in _WRITERS:
        raise ValueError(f"Unknown demo kind '{kind}'. Choose one of: {', '.join(KINDS)}.")
    _size(size)
    final = cache_dir() / "demo" / f"{kind}-{size}-s{seed}-v{GEN_VERSION}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _WRITERS[kind](tmp, size, seed)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def report_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Report texts of the worlds (no pixels), e.g. to train the demo tokenizer.

    ``n`` texts, half MIMIC-style CXR reports (every layout style, traps included), half CT-RATE
    rows (clinical information, technique, findings and impression joined), then ``n // 3``
    brain-MRI sentence lists with HLIP's prefix. The generators' phrase banks cover every word of
    ``configs/prompts/cxr.yaml``, ``ct_rate.yaml`` and ``brain_mri.yaml``.

    Args:
        seed: corpus seed.
        n: number of CXR + CT texts.

    Returns:
        ``n + n // 3`` texts (fewer brain texts if some drawn studies have an empty report).
    """
    rng = rng_for(seed, _CORPUS_STREAM)
    styles = cxr.STYLES + cxr.TRAP_STYLES
    weights = [p * 0.9 for p in cxr.STYLE_P] + [0.1 / len(cxr.TRAP_STYLES)] * len(cxr.TRAP_STYLES)
    texts = []
    for i in range(n):
        if i % 2 == 0:
            style = str(rng.choice(styles, p=weights))
            view = pick(rng, ("PA", "AP"))
            text, _ = cxr.report_text(cxr.sample_findings(rng), rng, style, view, rng.random() < 0.3)
        else:
            row = ct.report_row(ct.sample_findings(rng), rng, float(pick(rng, (5.0, 6.0, 7.5))))
            text = " ".join(row.values())
        texts.append(text)
    return texts + brain_mri.example_report(seed, n // 3)


def main_demo(out: str | os.PathLike, kind: str = "all", size: str = "default", seed: int = 0) -> dict[str, Path]:
    """Write the demo worlds under ``out`` (``out/mimic-cxr-jpg``, ``out/ct-rate``, ...) and print a summary.

    Args:
        out: parent folder.
        kind: one of ``KINDS`` or ``all``.
        size: a key of ``SIZES``.
        seed: world seed.

    Returns:
        ``{kind: dataset root}`` of what was written.
    """
    kinds = KINDS if kind == "all" else (kind,)
    if any(k not in _WRITERS for k in kinds):
        raise ValueError(f"Unknown demo kind '{kind}'. Choose one of: all, {', '.join(KINDS)}.")
    folders = {"cxr": "mimic-cxr-jpg", "ct": "ct-rate", "chexpert": "CheXpert-v1.0-small", "rsna": "rsna-pneumonia",
               "siim": "siim-acr-pneumothorax", "nih14": "chestx-ray14", "covidx": "covidx", "object_cxr": "object-cxr", "brain_mri": "brain-mri",
               "adni": "adni-medblip",
               **{k: v[2] for k, v in FORMAT_KINDS.items()}}
    written = {}
    for k in kinds:
        start = time.perf_counter()
        root = _WRITERS[k](Path(out) / folders[k], size, seed)
        counts = json.loads((root / "demo_truth" / "info.json").read_text())["counts"]
        summary = ", ".join(f"{v} {name.replace('_', ' ')}" for name, v in counts.items())
        print(f"wrote {folders[k]} demo ({size}, seed {seed}) to {root}: {summary} [{time.perf_counter() - start:.1f} s]")
        written[k] = root
    return written
