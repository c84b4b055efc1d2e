"""Synthetic SIIM-ACR Pneumothorax data in the Kaggle stage-1 or stage-2 layout (``specs/datasets.md`` §4).

:func:`write_siim` writes any list of :class:`SiimItem` (a gray image, one mask per annotation,
DICOM UIDs) as

```
stage 1: train-rle.csv                 'ImageId, EncodedPixels' (leading space in header and values)
         dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
         dicom-images-test/...         (only with test_items)
stage 2: stage_2_train.csv             'ImageId,EncodedPixels'
         stage_2_images/<ImageId>.dcm  (flat; labelled items and test_items alike)
         stage_2_sample_submission.csv (only with test_items)
```

One CSV row per mask (the relative column-major RLE of §4.3, :func:`~medvlp.datamodules.formats.rle.rle_encode`),
or one ``-1`` row for an image without pneumothorax. The tiny dataset of §4.7 that exercises every
trap of §4.8 (``write_siim_fixture``) lives in ``tests/format_fixtures.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import write_csv
from medvlp.datamodules.demo.rsna import uuid4_from

UID_ROOT = "1.2.276.0.7230010.3.1"  # + .4 (SOP instance) / .2 (study) / .3 (series) + .8323329.<n>.<10 digits>.<6 digits>


@dataclass
class SiimItem:
    """One image of the synthetic SIIM set.

    ``masks`` holds one ``[H, W]`` {0, 1} array per annotation (one CSV row each); ``[]`` writes a
    single ``-1`` row. ``image`` is ``[H, W]`` uint8 with dense = bright.
    """

    image_id: str  # SOPInstanceUID, the file stem
    image: np.ndarray
    masks: Sequence[np.ndarray] = ()
    study_uid: str = ""  # "" -> derived from image_id (.3.1.2.)
    series_uid: str = ""  # "" -> derived from image_id (.3.1.3.)
    patient_id: str = ""  # "" -> a UUID derived from image_id
    view: str = "PA"
    sex: str = "M"
    age: int = 50
    photometric: str = "MONOCHROME2"  # MONOCHROME1 files store 255 - image
    transfer_syntax: str = "jpeg_baseline"  # the real files are JPEG Baseline; or explicit
    extra_tags: dict = field(default_factory=dict)

    def union(self) -> np.ndarray:
        """The image's ground-truth mask: the union of ``masks`` (zeros without any)."""
        out = np.zeros(np.asarray(self.image).shape, dtype=np.uint8)
        for m in self.masks:
            out |= (np.asarray(m) != 0).astype(np.uint8)
        return out


def sop_uids(n: int, stamp: int, counter: int) -> tuple[str, str, str]:
    """``(SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID)`` in the pattern of the real files:
    ``1.2.276.0.7230010.3.1.4.8323329.<n>.<stamp: 10 digits>.<counter: 6 digits>`` (the study and
    series share ``n`` and ``stamp``, with the counter one and two below, as in the real data)."""
    if not (10**9 <= stamp < 10**10 and 10**5 + 2 <= counter < 10**6):
        raise ValueError(f"stamp must have 10 digits and counter 6 digits, got {stamp}, {counter}")
    tail = lambda kind, c: f"{UID_ROOT}.{kind}.8323329.{n}.{stamp}.{c}"  # noqa: E731
    return tail(4, counter), tail(2, counter - 2), tail(3, counter - 1)


def _uids(item: SiimItem) -> tuple[str, str]:
    parts = item.image_id.split(".")
    study, series = item.study_uid, item.series_uid
    if not study or not series:
        if item.image_id.startswith(UID_ROOT + ".4.") and len(parts) == 12 and parts[-1].isdigit():
            counter = int(parts[-1])
            base = ".".join(parts[8:11])
            study = study or f"{UID_ROOT}.2.{base}.{counter - 2}"
            series = series or f"{UID_ROOT}.3.{base}.{counter - 1}"
        else:
            study, series = study or f"{item.image_id}.2", series or f"{item.image_id}.3"
    return study, series


def _write_dicom(path: Path, item: SiimItem) -> None:
    from medvlp.datamodules.demo.dicom import write_dicom

    image = np.asarray(item.image, dtype=np.uint8)
    stored = 255 - image if item.photometric == "MONOCHROME1" else image
    study, series = _uids(item)
    digest = hashlib.sha256(item.image_id.encode()).digest()
    patient = item.patient_id or uuid4_from(np.random.default_rng(int.from_bytes(digest[:8], "little")))
    tags = {
        "PatientID": patient, "PatientName": patient, "PatientSex": item.sex, "PatientAge": str(int(item.age)),
        "ViewPosition": item.view, "SeriesDescription": f"view: {item.view}", "StudyInstanceUID": study,
        "SeriesInstanceUID": series, "SOPInstanceUID": item.image_id, **item.extra_tags,
    }
    write_dicom(path, stored, photometric=item.photometric, transfer_syntax=item.transfer_syntax,
                bits_stored=8, tags=tags)


def _path(root: Path, item: SiimItem, stage: int, folder: str) -> Path:
    if stage == 2:
        return root / "stage_2_images" / f"{item.image_id}.dcm"
    study, series = _uids(item)
    return root / folder / study / series / f"{item.image_id}.dcm"


def write_siim(root: str | Path, items: Sequence[SiimItem], *, stage: int = 1, spaced_values: bool = True,
               test_items: Sequence[SiimItem] = ()) -> Path:
    """Write ``items`` in the SIIM-ACR layout of ``stage`` under ``root``.

    Args:
        root: dataset root (created).
        items: labelled images; one CSV row per mask, ``-1`` without masks.
        stage: 1 (``train-rle.csv`` + nested ``dicom-images-train/``) or 2 (``stage_2_train.csv`` +
            flat ``stage_2_images/``).
        spaced_values: stage 1 only: values written as in the original file (``, -1``); False
            writes them unspaced (``,-1``) as re-saved copies do. The header keeps its space.
        test_items: unlabelled images (``dicom-images-test/`` in stage 1; ``stage_2_images/`` plus
            ``stage_2_sample_submission.csv`` in stage 2).

    Returns:
        ``root``.
    """
    from medvlp.datamodules.formats.rle import rle_encode

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    root = Path(root)
    space = " " if stage == 1 and spaced_values else ""
    rows = []
    for it in items:
        encoded = [rle_encode(m) for m in it.masks if np.any(m)] or ["-1"]
        rows.extend([it.image_id, space + rle] for rle in encoded)
        _write_dicom(_path(root, it, stage, "dicom-images-train"), it)
    for it in test_items:
        _write_dicom(_path(root, it, stage, "dicom-images-test"), it)
    if stage == 1:
        write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)
    else:
        write_csv(root / "stage_2_train.csv", ["ImageId", "EncodedPixels"], rows)
        if test_items:
            write_csv(root / "stage_2_sample_submission.csv", ["ImageId", "EncodedPixels"],
                      [[it.image_id, "-1"] for it in test_items])
    return root
