"""Synthetic RSNA Pneumonia Detection Challenge data in the Kaggle stage-2 layout (``specs/datasets.md`` §3).

:func:`write_rsna` writes any list of :class:`RsnaItem` (a gray image, its boxes and ids) as

```
stage_2_train_labels.csv            patientId,x,y,width,height,Target  (one row per box, 1024-px frame)
stage_2_detailed_class_info.csv     patientId,class                    (duplicated per box)
stage_2_train_images/<patientId>.dcm
stage_2_test_images/<patientId>.dcm + stage_2_sample_submission.csv   (only with test_items)
```

The tiny dataset of §3.7 that exercises every trap of §3.8 (``write_rsna_fixture``) lives in
``tests/format_fixtures.py``. Also here: :func:`synthetic_radiograph` (a procedural frontal chest
image) and :func:`uuid4_from`, shared with the SIIM writer and the test fixtures.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvlp.datamodules.demo._util import gaussian_blur, smooth_noise, soft, write_csv

LABELS_HEADER = ["patientId", "x", "y", "width", "height", "Target"]
CLASS_HEADER = ["patientId", "class"]
SUBMISSION_HEADER = ["patientId", "PredictionString"]
FRAME = 1024  # the labels CSV is in pixels of the 1024 x 1024 image, whatever the DICOM's size


@dataclass
class RsnaItem:
    """One image of the synthetic RSNA set.

    ``boxes`` are ``(x1, y1, x2, y2)`` in pixels of ``image`` (``[H, W]`` uint8, dense = bright);
    :func:`write_rsna` converts them to the CSV's 1024-pixel ``x, y, width, height``.
    """

    patient_id: str  # lowercase UUID4, the file stem and the DICOM PatientID
    image: np.ndarray
    boxes: Sequence[Sequence[float]] = ()
    detailed_class: str = ""  # "" -> "Lung Opacity" with boxes, else "Normal"
    view: str = "PA"  # ViewPosition: PA | AP
    sex: str = "M"
    age: int = 50
    photometric: str = "MONOCHROME2"  # MONOCHROME1 files store 255 - image
    transfer_syntax: str = "explicit"  # explicit | jpeg_baseline
    extra_tags: dict = field(default_factory=dict)

    def box_array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)

    def cls(self) -> str:
        return self.detailed_class or ("Lung Opacity" if len(self.box_array()) else "Normal")


def uuid4_from(rng: np.random.Generator) -> str:
    """A lowercase UUID4 string drawn from ``rng`` (matches the RSNA patientId pattern)."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def synthetic_radiograph(rng: np.random.Generator, height: int, width: int,
                         opacities: Sequence[Sequence[float]] = ()) -> np.ndarray:
    """A frontal chest image ``[H, W]`` uint8 (dense = bright): body, two dark lungs, a bright
    spine, a marker in the top-left corner (so flips and inversions show), and a bright opacity
    filling each ``(x1, y1, x2, y2)`` of ``opacities``. Uses the full range 0..255."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (xx + 0.5) / width, (yy + 0.5) / height
    img = 0.55 + 0.1 * smooth_noise(rng, (height, width), max(1.0, height / 16))
    for cx in (0.3, 0.7):
        lung = ((u - cx) / 0.17) ** 2 + ((v - 0.5) / 0.33) ** 2
        img -= 0.35 * soft(1.0 - lung, 0.15)
    img += 0.3 * soft(0.04 - np.abs(u - 0.5), 0.01)
    for x1, y1, x2, y2 in np.asarray(opacities, dtype=np.float32).reshape(-1, 4):
        inside = soft(xx + 0.5 - x1, 0.7) * soft(x2 - xx - 0.5, 0.7) * soft(yy + 0.5 - y1, 0.7) * soft(y2 - yy - 0.5, 0.7)
        img += 0.3 * inside
    img = gaussian_blur(img, 0.6)
    img[: max(2, height // 10), : max(2, width // 10)] = 1.0
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    img[-1, -1] = 0.0  # a black pixel: min-max scaling is then the identity (as in the real 8-bit files)
    return np.rint(img * 255).astype(np.uint8)


def _coord(v: float) -> str:
    """A coordinate as the real CSV writes it: ``264.0`` (floats, at most 3 decimals)."""
    return repr(float(round(float(v), 3)))


def _write_dicom(path: Path, item: RsnaItem) -> None:
    from medvlp.datamodules.demo.dicom import write_dicom

    image = np.asarray(item.image, dtype=np.uint8)
    stored = 255 - image if item.photometric == "MONOCHROME1" else image
    tags = {
        "PatientID": item.patient_id, "PatientName": item.patient_id, "PatientSex": item.sex,
        "PatientAge": str(int(item.age)), "ViewPosition": item.view, "SeriesDescription": f"view: {item.view}",
        "StudyDescription": "Cxr-Pneumonia", "PatientOrientation": None, **item.extra_tags,
    }
    write_dicom(path, stored, photometric=item.photometric, transfer_syntax=item.transfer_syntax,
                bits_stored=8, tags=tags)


def write_rsna(root: str | Path, items: Sequence[RsnaItem], test_items: Sequence[RsnaItem] = ()) -> Path:
    """Write ``items`` in the RSNA stage-2 layout under ``root``.

    Args:
        root: dataset root (created).
        items: train images; one labels row per box (one blank-coordinate row for a negative),
            class info duplicated per row, one DICOM each.
        test_items: optional images for ``stage_2_test_images/`` and the sample submission.

    Returns:
        ``root``.
    """
    root = Path(root)
    label_rows, class_rows = [], []
    for it in items:
        h, w = np.asarray(it.image).shape
        sx, sy = FRAME / w, FRAME / h
        boxes = it.box_array()
        if len(boxes):
            for x1, y1, x2, y2 in boxes:
                label_rows.append([it.patient_id, _coord(x1 * sx), _coord(y1 * sy), _coord((x2 - x1) * sx),
                                   _coord((y2 - y1) * sy), 1])
                class_rows.append([it.patient_id, it.cls()])
        else:
            label_rows.append([it.patient_id, None, None, None, None, 0])
            class_rows.append([it.patient_id, it.cls()])
        _write_dicom(root / "stage_2_train_images" / f"{it.patient_id}.dcm", it)
    write_csv(root / "stage_2_train_labels.csv", LABELS_HEADER, label_rows)
    write_csv(root / "stage_2_detailed_class_info.csv", CLASS_HEADER, class_rows)
    if test_items:
        for it in test_items:
            _write_dicom(root / "stage_2_test_images" / f"{it.patient_id}.dcm", it)
        write_csv(root / "stage_2_sample_submission.csv", SUBMISSION_HEADER,
                  [[it.patient_id, "0.5 0 0 100 100"] for it in test_items])
    return root
