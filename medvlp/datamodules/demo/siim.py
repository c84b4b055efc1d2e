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
or one ``-1`` row for an image without pneumothorax. :func:`write_siim_fixture` builds the tiny
dataset of §4.7 that exercises every trap of §4.8.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import rng_for, write_csv
from medvlp.datamodules.demo.rsna import synthetic_radiograph, uuid4_from

UID_ROOT = "1.2.276.0.7230010.3.1"  # + .4 (SOP instance) / .2 (study) / .3 (series) + .8323329.<n>.<10 digits>.<6 digits>
_IMAGE_STREAM, _ID_STREAM, _MASK_STREAM = 1, 2, 3


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
    from medvlp.datamodules.formats.dicom import write_dicom

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


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """An irregular blob mask (a wobbly ellipse) centred at ``(cx, cy)`` pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.arctan2(yy + 0.5 - cy, xx + 0.5 - cx)
    wobble = 1 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6.28))
    r = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2
    return (r <= wobble).astype(np.uint8)


def write_siim_fixture(root: str | Path, seed: int = 0, stage: int = 1) -> list[SiimItem]:
    """The tiny SIIM fixture of §4.7 (12 labelled images, 7 negative, + 1 test image; 64 px, < 200 kB).

    Traps covered (§4.8): the spaced header and spaced values (stage 1), ``-1`` negatives, an image
    with 2 overlapping RLE rows and one with 3 (union; split by image), masks that are thin
    horizontal bars and multi-column blobs (a transposed or absolute decode breaks them), JPEG
    Baseline and uncompressed files, a MONOCHROME1 file whose MONOCHROME2 twin holds the same image
    and mask, a 48 x 64 image (masks follow Rows x Columns), and an unlabelled test image.

    Args:
        root: dataset root.
        seed: fixture seed (pixels, ids, blob shapes).
        stage: 1 or 2 (see :func:`write_siim`).

    Returns:
        The labelled items in CSV order.
    """
    rng = rng_for(seed, _ID_STREAM)
    mrng = rng_for(seed, _MASK_STREAM)
    stamp = 1517875000 + int(rng.integers(0, 999))
    bar = np.zeros((64, 64), np.uint8)
    bar[10:13, 20:50] = 1  # a horizontal bar: transposing gives a vertical one
    specs = [  # (H, W), masks, photometric, transfer syntax
        ((64, 64), [], "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [_blob(mrng, 64, 64, 20, 30, 8, 12), _blob(mrng, 64, 64, 26, 36, 7, 9)], "MONOCHROME2", "explicit"),
        ((64, 64), [bar], "MONOCHROME1", "explicit"),
        ((64, 64), [bar], "MONOCHROME2", "explicit"),  # twin of the MONOCHROME1 file
        ((64, 64), [], "MONOCHROME2", "explicit"),
        ((64, 64), [_blob(mrng, 64, 64, 44, 20, 6, 10), _blob(mrng, 64, 64, 46, 44, 5, 6), bar], "MONOCHROME2",
         "jpeg_baseline"),
        ((48, 64), [_blob(mrng, 48, 64, 40, 20, 9, 7)], "MONOCHROME2", "explicit"),
        ((64, 64), [], "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [], "MONOCHROME2", "explicit"),
        ((64, 64), [], "MONOCHROME2", "explicit"),
        ((64, 64), [], "MONOCHROME2", "jpeg_baseline"),
        ((64, 64), [], "MONOCHROME2", "explicit"),
    ]
    items: list[SiimItem] = []
    counter = 100000 + int(rng.integers(10, 90))
    for i, ((h, w), masks, photometric, syntax) in enumerate(specs):
        counter += int(rng.integers(3, 40))
        sop, study, series = sop_uids(int(rng.integers(1000, 14000)), stamp + i, counter)
        if i == 3:
            image = items[-1].image
        else:
            image = synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, i), h, w)
            for m in masks:  # a pneumothorax is dark (no lung markings): darken the masked area a bit
                image = np.clip(image.astype(np.int16) - 40 * (m != 0), 0, 255).astype(np.uint8)
        items.append(SiimItem(
            image_id=sop, image=image, masks=masks, study_uid=study, series_uid=series, patient_id=uuid4_from(rng),
            view="AP" if i % 3 == 1 else "PA", sex="F" if i % 2 else "M", age=int(rng.integers(18, 90)),
            photometric=photometric, transfer_syntax=syntax,
        ))
    counter += 7
    sop, study, series = sop_uids(int(rng.integers(1000, 14000)), stamp + 50, counter)
    test = [SiimItem(sop, synthetic_radiograph(rng_for(seed, _IMAGE_STREAM, 99), 64, 64), study_uid=study,
                     series_uid=series, patient_id=uuid4_from(rng))]
    write_siim(root, items, stage=stage, test_items=test)
    return items
