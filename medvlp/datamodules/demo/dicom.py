"""DICOM Part-10 Secondary Capture writer of the synthetic world (read by :mod:`~medvlp.datamodules.formats.dicom`)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.datamodules.formats.dicom import _check_choice, _tag_for

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "jpeg_baseline": "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
}


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = "explicit",
    bits_stored: int = 8,
    tags: Mapping[str, Any] | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a DICOM Part-10 Secondary Capture file (for fixtures and the synthetic world).

    The header follows the RSNA/SIIM conversions (``specs/datasets.md`` §3.5, §4.5): SOP class
    Secondary Capture Image Storage, Modality CR, Conversion Type WSD, Body Part CHEST, Pixel
    Spacing 0.168 mm. PatientID/PatientName default to the file stem (as in RSNA); Study, Series
    and SOP Instance UIDs not given in ``tags`` are derived from PatientID and the file stem, so
    rewriting a fixture gives identical bytes.

    Args:
        path: output file (parent folders are created).
        pixels: stored values, ``[H, W]`` or ``[F, H, W]`` (multi-frame) for MONOCHROME1/2,
            ``[H, W, 3]`` for RGB; uint8, uint16 or int16 (int16 sets Pixel Representation 1).
            For MONOCHROME1 pass the stored, already inverted values (dense = dark).
        photometric: ``"MONOCHROME2"``, ``"MONOCHROME1"`` or ``"RGB"`` (RGB: explicit only).
        transfer_syntax: ``"explicit"`` (Explicit VR Little Endian), ``"jpeg_baseline"``
            (1.2.840.10008.1.2.4.50, Pillow at quality 95, uint8 only, Lossy Image Compression
            "01") or ``"rle"`` (RLE Lossless, pydicom's encoder).
        bits_stored: Bits Stored (8 for uint8; e.g. 10, 12, 14 or 16 for 16-bit arrays); values
            must fit in it.
        tags: extra or overriding elements by keyword, e.g. ``{"PatientID": ..., "ViewPosition": "PA"}``;
            values are written as given even when they break the VR (RSNA's bare ``PatientAge`` "51").
        rescale: ``(slope, intercept)`` -> Rescale Slope / Rescale Intercept.
        window: ``(center, width)`` -> Window Center / Window Width.

    Returns:
        The written path.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, generate_uid

    _check_choice("photometric", photometric, ("MONOCHROME2", "MONOCHROME1", "RGB"))
    _check_choice("transfer_syntax", transfer_syntax, tuple(_TRANSFER_SYNTAXES))
    arr = np.asarray(pixels)
    if arr.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"pixels must be uint8, uint16 or int16, got {arr.dtype}; cast the array first.")
    if photometric == "RGB" and transfer_syntax != "explicit":
        raise ValueError(
            f"photometric='RGB' is only written with transfer_syntax='explicit', got '{transfer_syntax}'."
        )
    if transfer_syntax == "jpeg_baseline" and (arr.dtype != np.uint8 or bits_stored != 8):
        raise ValueError(
            f"JPEG Baseline stores 8-bit pixels; got dtype {arr.dtype} with bits_stored={bits_stored}. "
            f"Pass uint8 pixels with bits_stored=8, or use transfer_syntax='explicit'."
        )
    tags = dict(tags or {})
    for keyword in tags:
        _tag_for(keyword)
    p = Path(path)
    patient = str(tags.get("PatientID", p.stem))

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(_TRANSFER_SYNTAXES["explicit"])
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient, p.stem, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient, p.stem, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[patient, p.stem, "instance"])
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = patient
    ds.PatientName = patient
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                    "StudyID", "AccessionNumber", "SeriesNumber", "InstanceNumber", "PatientOrientation"):
        setattr(ds, keyword, None)  # type 2: present, may be empty
    ds.PixelSpacing = [0.168, 0.168]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR")  # kept as given, like RSNA's ages
        for keyword, value in tags.items():
            setattr(ds, keyword, value)

    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    if transfer_syntax == "jpeg_baseline":
        from PIL import Image

        frames = arr if arr.ndim == 3 else arr[None]
        encoded = []
        for frame in frames:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="JPEG", quality=95)
            encoded.append(buf.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = UID(_TRANSFER_SYNTAXES["jpeg_baseline"])
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ratio = arr.nbytes / max(sum(len(e) for e in encoded), 1)
        ds.LossyImageCompressionRatio = f"{ratio:.2f}"
    elif transfer_syntax == "rle":
        ds.compress(_TRANSFER_SYNTAXES["rle"], encoding_plugin="pydicom", generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.preamble = b"\x00" * 128
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p
