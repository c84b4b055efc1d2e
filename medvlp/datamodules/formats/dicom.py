"""DICOM chest radiographs with pydicom: pixels with MONOCHROME2 polarity, header tags.

Conventions:

* :func:`read_dicom` returns one 2D image ``[H, W]`` in which dense tissue is bright, whatever
  the file's Photometric Interpretation, scaled to ``0..255`` (uint8) or ``[0, 1]`` (float32).
* Stored values go through the Modality LUT (or Rescale Slope/Intercept), then the VOI LUT (or
  Window Center/Width) when the file has one, then MONOCHROME1 files are inverted.
* Every failure raises :class:`~medvlp.datamodules.base.DataError` naming the file.

RSNA Pneumonia and SIIM-ACR files are 8-bit Secondary Captures, often JPEG Baseline compressed
(``specs/datasets.md`` §3.5, §4.5). Pillow decodes JPEG Baseline and pydicom decodes RLE Lossless;
JPEG-LS, JPEG 2000 and lossless JPEG need pylibjpeg or GDCM. pydicom and Pillow are imported
inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.datamodules.base import DataError
from medvlp.datamodules.errors import os_error

_INSTALL_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg  (or: pip install python-gdcm)"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422")


def _check_choice(key: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{key}='{value}' is not valid; choose one of {', '.join(options)}.")


def _open(path: str | os.PathLike, **kwargs: Any) -> tuple[Any, list[warnings.WarningMessage]]:
    """``pydicom.dcmread`` with every failure turned into a DataError naming the file.

    Returns the dataset and the warnings pydicom gave while reading, which the caller re-issues
    with :func:`_reissue` on success: a truncated encapsulated file only produces a warning and
    a dataset without Pixel Data, so the caller turns that into a DataError instead.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"DICOM file {p} does not exist.")
    if p.stat().st_size == 0:
        raise DataError(f"DICOM file {p} is empty (0 bytes); re-download it.")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(p, **kwargs)
    except InvalidDicomError as err:
        raise DataError(
            f"{p} is not a DICOM Part-10 file (expected a 128-byte preamble followed by 'DICM'): {err}"
        ) from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on malformed input
        named = os_error(p, err) if isinstance(err, OSError) else None
        raise (named or DataError(
            f"DICOM file {p} is truncated or corrupt ({type(err).__name__}: {err}); re-download it."
        )) from err
    return ds, list(caught)


def _reissue(caught: Sequence[warnings.WarningMessage]) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _decode_first_frame(
    ds: Any, path: Path, read_warnings: Sequence[warnings.WarningMessage] = ()
) -> np.ndarray:
    """First frame of the Pixel Data as stored (``[H, W]`` or ``[H, W, 3]`` RGB), or DataError."""
    from pydicom.pixels import get_decoder, pixel_array

    ended_early = [w for w in read_warnings if "end of file" in str(w.message).lower()]
    if ended_early or ("PixelData" not in ds and read_warnings):
        said = "; ".join(str(w.message) for w in ended_early or read_warnings)
        raise DataError(
            f"DICOM file {path} is truncated or corrupt: its Pixel Data could not be read (pydicom: {said}). "
            f"Re-download it."
        )
    if "PixelData" not in ds:
        raise DataError(
            f"DICOM file {path} has no Pixel Data (7FE0,0010) (or ends before it); expected an image, "
            f"not e.g. a structured report (if it should be an image, it is truncated or corrupt: re-download it)."
        )
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not uid:
        raise DataError(
            f"DICOM file {path} has no Transfer Syntax UID (0002,0010) in its file meta; "
            f"cannot decode its pixels."
        )
    syntax = f"'{uid.name}' ({uid})"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise DataError(
            f"DICOM file {path} uses transfer syntax {syntax}, which pydicom cannot decode."
        ) from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DataError(
            f"DICOM file {path} is compressed with {syntax} and no decoder for it is installed "
            f"(missing: {missing}). Install one: {_INSTALL_HINT}"
        )
    try:
        return pixel_array(ds, index=0)
    except Exception as err:  # noqa: BLE001 - decoder plugins raise many types on bad data
        raise DataError(
            f"Could not decode the pixels of DICOM file {path} ({syntax}): {type(err).__name__}: {err}. "
            f"The file is probably truncated or corrupt; re-download it."
        ) from err


def _window01(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing (PS3.3 C.11.2.1.2 / C.11.2.1.3) onto ``[0, 1]`` instead of the display range."""
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for SIGMOID, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width must be >= 1 for LINEAR, got {width}")
        center, width = center - 0.5, width - 1.0
        if width == 0:  # width 1: a hard threshold
            return (x > center).astype(np.float64)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for LINEAR_EXACT, got {width}")
    else:
        raise ValueError(f"VOI LUT Function '{function}' is not one of LINEAR, LINEAR_EXACT, SIGMOID")
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _apply_voi01(x: np.ndarray, ds: Any) -> np.ndarray | None:
    """The file's VOI transform mapped onto ``[0, 1]``; None when the file has none.

    A VOI LUT Sequence wins over Window Center/Width (pydicom's ``prefer_lut`` default). The LUT
    output is scaled by the min and max of the LUT table itself (not of the image), which is
    image-independent and survives LUT Descriptors that misstate the entry bit depth.
    """
    from pydicom.pixels import apply_voi

    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        entries, first_map = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
        table = apply_voi(np.arange(first_map, first_map + entries, dtype=np.int64), ds).astype(np.float64)
        lo, hi = float(table.min()), float(table.max())
        y = apply_voi(np.rint(x).astype(np.int64), ds).astype(np.float64)
        return (y - lo) / (hi - lo) if hi > lo else np.zeros_like(y)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
        return _window01(x, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    return None


def _check_finite(x: np.ndarray, path: Path) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        row, col = (int(v) for v in np.argwhere(~finite)[0])
        raise DataError(
            f"DICOM file {path}: {x.size - int(np.count_nonzero(finite))} pixel(s) are not finite after its Modality "
            f"LUT / Rescale Slope and Intercept (NaN or inf; the first at row {row}, column {col}); expected finite "
            f"values: check its Float Pixel Data or RescaleSlope / RescaleIntercept."
        )


def _minmax01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros(x.shape, dtype=np.float64)


def read_dicom(path: str | os.PathLike, *, voi: str = "auto", out: str = "uint8") -> np.ndarray:
    """Read a chest radiograph DICOM as a 2D image with MONOCHROME2 polarity (dense = bright).

    Pipeline: decode the first frame -> Modality LUT or Rescale Slope/Intercept -> VOI -> scale to
    ``[0, 1]`` -> invert if MONOCHROME1 -> ``out``.

    Scaling rule:

    * With a VOI transform (``voi="auto"`` and the file has a VOI LUT Sequence or Window
      Center/Width; the first of several windows is used): the VOI output range is mapped onto
      ``[0, 1]`` (window bottom -> 0, top -> 1; a LUT's smallest entry -> 0, largest -> 1), i.e.
      what a viewer shows, independent of the image. A VOI LUT wins over a window.
    * Otherwise (no VOI in the file, or ``voi="none"``): per-image min-max of the Modality LUT
      output. For the usual 8-bit RSNA/SIIM files whose darkest pixel is 0 this equals MGCA's
      ``cv2.convertScaleAbs(x, alpha=255 / x.max())``; unlike that rule, it gives the same image for
      a MONOCHROME1 file and its MONOCHROME2 twin. A constant image comes back all zeros.

    Bits Stored / Pixel Representation (8-16 bits, signed or not) are handled by pydicom's decoder,
    which masks unused high bits and sign-extends. Multi-frame files: only the first frame is
    decoded. Colour files (RGB / YBR_FULL / YBR_FULL_422, Samples per Pixel 3) are converted to
    gray with ITU-R BT.601 luma (``0.299 R + 0.587 G + 0.114 B``, as Pillow's ``convert("L")``),
    then min-max scaled; Modality and VOI LUTs do not apply to colour. Presentation LUT Shape is
    ignored: for CR/DX it only restates the Photometric Interpretation.

    Args:
        path: the ``.dcm`` file (a DICOM Part-10 file with preamble).
        voi: ``"auto"`` applies the file's VOI LUT / window when present, ``"none"`` skips it.
        out: ``"uint8"`` (``round(x * 255)``) or ``"float"`` (float32 in ``[0, 1]``).

    Returns:
        ``[H, W]`` uint8 or float32 array (H = Rows, W = Columns).

    Raises:
        DataError: missing, empty, non-DICOM, truncated or corrupt file; no Pixel Data; an
            unsupported Photometric Interpretation; a compressed transfer syntax without an
            installed decoder (the message says what to install).
    """
    _check_choice("voi", voi, ("auto", "none"))
    _check_choice("out", out, ("uint8", "float"))
    from pydicom.pixels import apply_modality_lut

    p = Path(path)
    ds, read_warnings = _open(p)
    arr = _decode_first_frame(ds, p, read_warnings)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if photometric in _COLOR and arr.ndim == 3:  # pydicom already converted YBR to RGB
            y = _minmax01(arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
        elif photometric in _GRAY and arr.ndim == 2:
            x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
            _check_finite(x, p)  # NaN would make the min-max scaling return a black image
            y = _apply_voi01(x, ds) if voi == "auto" else None
            y = _minmax01(x) if y is None else y
            if photometric == "MONOCHROME1":
                y = 1.0 - y
        else:
            raise DataError(
                f"DICOM file {p} has Photometric Interpretation '{photometric}' with pixel array shape "
                f"{arr.shape}; expected MONOCHROME1/MONOCHROME2 [H, W] or RGB/YBR_FULL/YBR_FULL_422 "
                f"[H, W, 3]."
            )
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - malformed LUT / window elements
        raise DataError(
            f"DICOM file {p}: could not apply its Modality/VOI LUT ({type(err).__name__}: {err}); "
            f"try voi='none' or fix the header."
        ) from err
    _reissue(read_warnings)
    if out == "float":
        return y.astype(np.float32)
    return np.rint(y * 255.0).astype(np.uint8)


def _plain(value: Any) -> Any:
    """pydicom element value -> plain Python (str, int, float, list, bytes)."""
    name = type(value).__name__
    if name == "MultiValue" or isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if name == "PersonName":
        return str(value)
    if name in ("DSfloat", "DSdecimal"):
        return float(value)
    if name == "IS":
        return int(value)
    if name == "UID":
        return str(value)
    return value


def _tag_for(keyword: str) -> int:
    from pydicom.datadict import keyword_dict, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        close = difflib.get_close_matches(keyword, list(keyword_dict), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown DICOM keyword '{keyword}'.{hint} Use keywords such as 'PatientID', 'Rows'."
        )
    return tag


def read_dicom_header(path: str | os.PathLike, tags: Sequence[str]) -> dict[str, Any]:
    """Read only the named header elements (stops before Pixel Data; nothing is decoded).

    Args:
        path: the ``.dcm`` file.
        tags: DICOM keywords, e.g. ``["Rows", "Columns", "ViewPosition", "PatientID"]``.

    Returns:
        ``{keyword: value}`` for every requested keyword, as plain Python values (str, int, float,
        list for multi-valued elements such as ``PixelSpacing``); None when the element is absent.
    """
    numbers = [_tag_for(k) for k in tags]
    ds, read_warnings = _open(path, stop_before_pixels=True, specific_tags=numbers)
    _reissue(read_warnings)
    result: dict[str, Any] = {}
    for keyword, tag in zip(tags, numbers):
        elem = ds.get(tag)
        result[keyword] = None if elem is None or elem.value is None else _plain(elem.value)
    return result
