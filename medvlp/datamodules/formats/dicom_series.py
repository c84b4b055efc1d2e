"""A folder of single-slice DICOM files (one CT series) as one volume in HU, with checked geometry.

File names do not follow anatomy (CQ500's ``CT000000.dcm`` numbering, RSNA's random ids), so slices
are ordered by their position along the slice normal (``ImagePositionPatient`` projected on the
cross product of the ``ImageOrientationPatient`` cosines), or by ``InstanceNumber`` when no slice
has a position. Before any pixel is read, the headers are checked, and every problem raises a
:class:`~medvlp.datamodules.base.DataError` naming the folder (and the file where there is one):

* several ``SeriesInstanceUID`` values, or differing ``Rows`` / ``Columns`` / orientation /
  ``PixelSpacing`` within the folder;
* two different slices at the same position (an exact copy of a file, same ``SOPInstanceUID``, is
  dropped and counted instead);
* a missing slice: a step between neighbours more than 1.5 times the median step;
* inconsistent spacing: steps differing from the median by more than ``tolerance`` (default 10 %).

Pixels: ``pixel_array * RescaleSlope + RescaleIntercept`` (float32 HU). Geometry: origin = the first
slice's position, spacing = (``PixelSpacing`` column, row, median step), direction = (row cosine,
column cosine, normal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.datamodules.base import DataError
from medvlp.datamodules.errors import os_error


@dataclass
class SliceHeader:
    path: str
    series_uid: str
    sop_uid: str
    rows: int
    cols: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    instance: int | None
    thickness: float | None


def dicom_files(folder: str | os.PathLike) -> list[str]:
    """The ``*.dcm`` files (any case) directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ".dicom"))


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_header(path: str) -> SliceHeader:
    """The geometry-related elements of one file (pixels not read)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - any parse error is a bad file
        named = os_error(path, err) if isinstance(err, OSError) else None
        raise (named or DataError(f"{path} is not a readable DICOM file ({type(err).__name__}: {err}).")) from err
    if "Rows" not in ds or "Columns" not in ds:
        raise DataError(f"{path} has no Rows / Columns: not an image slice.")
    spacing = _floats(ds.get("PixelSpacing"), 2) or (1.0, 1.0)
    instance = ds.get("InstanceNumber")
    thickness = ds.get("SliceThickness")
    return SliceHeader(
        path=path, series_uid=str(ds.get("SeriesInstanceUID", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
        rows=int(ds.Rows), cols=int(ds.Columns), iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3), pixel_spacing=(float(spacing[0]), float(spacing[1])),
        instance=int(instance) if instance not in (None, "") else None,
        thickness=float(thickness) if thickness not in (None, "") else None,
    )


def order_slices(headers: list[SliceHeader], folder: str, tolerance: float = 0.1) -> tuple[list[SliceHeader], float, int]:
    """Check and sort the slices of one series.

    Returns:
        ``(slices in increasing position along the normal, median step in mm, exact duplicates dropped)``.
    """
    if not headers:
        raise DataError(f"{folder} holds no .dcm files.")
    uids = sorted({h.series_uid for h in headers})
    if len(uids) > 1:
        raise DataError(f"{folder} mixes {len(uids)} series (SeriesInstanceUID {uids[0]}, {uids[1]}, ...); one folder "
                        f"must hold one series.")
    for key, label in (("rows", "Rows"), ("cols", "Columns"), ("iop", "ImageOrientationPatient"),
                       ("pixel_spacing", "PixelSpacing")):
        values = {getattr(h, key) for h in headers}
        if len(values) > 1:
            odd = next(h for h in headers if getattr(h, key) != getattr(headers[0], key))
            raise DataError(f"{folder}: {label} differs between slices ({getattr(headers[0], key)} in "
                            f"{Path(headers[0].path).name}, {getattr(odd, key)} in {Path(odd.path).name}).")
    dropped = 0
    if all(h.ipp is not None for h in headers) and headers[0].iop is not None:
        row, col = np.asarray(headers[0].iop[:3]), np.asarray(headers[0].iop[3:])
        normal = np.cross(row, col)
        pos = {h.path: float(np.dot(normal, h.ipp)) for h in headers}
        ordered = sorted(headers, key=lambda h: pos[h.path])
        unique: list[SliceHeader] = []
        for h in ordered:
            if unique and abs(pos[h.path] - pos[unique[-1].path]) < 1e-3:
                if h.sop_uid and h.sop_uid == unique[-1].sop_uid:
                    dropped += 1
                    continue
                raise DataError(f"{folder}: two different slices at the same position {pos[h.path]:.2f} mm "
                                f"({Path(unique[-1].path).name}, {Path(h.path).name}); remove the duplicate.")
            unique.append(h)
        steps = np.diff([pos[h.path] for h in unique])
    else:
        if any(h.instance is None for h in headers):
            raise DataError(f"{folder}: slices without ImagePositionPatient and without InstanceNumber cannot be ordered.")
        unique = sorted(headers, key=lambda h: h.instance)  # type: ignore[arg-type, return-value]
        steps = np.full(max(len(unique) - 1, 0), unique[0].thickness or 1.0)
    if len(unique) < 2:
        return unique, float(unique[0].thickness or 1.0), dropped
    step = float(np.median(steps))
    big = np.nonzero(steps > 1.5 * step)[0]
    if big.size:
        i = int(big[0])
        raise DataError(f"{folder}: missing slice(s) between {Path(unique[i].path).name} and "
                        f"{Path(unique[i + 1].path).name} (a {steps[i]:.2f} mm step where the series steps "
                        f"{step:.2f} mm).")
    off = np.nonzero(np.abs(steps - step) > tolerance * step)[0]
    if off.size:
        i = int(off[0])
        raise DataError(f"{folder}: inconsistent slice spacing ({steps[i]:.2f} mm between {Path(unique[i].path).name} "
                        f"and {Path(unique[i + 1].path).name}, median {step:.2f} mm).")
    return unique, step, dropped


def read_series(folder: str | os.PathLike | list[str], tolerance: float = 0.1, fix_wrapped_12bit: bool = False) -> Any:
    """One series as a float32 SimpleITK image in HU with its patient geometry.

    Args:
        folder: a folder holding exactly the series' files, or the list of its files (series
            gathered from a flat folder, e.g. RSNA haemorrhage).
        tolerance: allowed relative deviation of a slice step from the median.
        fix_wrapped_12bit: apply the RSNA haemorrhage correction to slices whose values wrapped
            (``BitsStored == 12``, ``PixelRepresentation == 0``, ``RescaleIntercept > -100``):
            add 1000, subtract 4096 from values >= 4096, use intercept -1000.
    """
    import pydicom
    import SimpleITK as sitk

    files = [str(f) for f in folder] if isinstance(folder, list) else dicom_files(folder)
    folder = str(Path(files[0]).parent) if isinstance(folder, list) and files else str(folder)
    slices, step, _ = order_slices([read_header(p) for p in files], folder, tolerance)
    planes = []
    for h in slices:
        try:
            ds = pydicom.dcmread(h.path)
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                raise DataError(f"{h.path} has no Pixel Data (7FE0,0010); expected an image slice.")
            arr = ds.pixel_array.astype(np.float32)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated pixel data, unsupported compression, ...
            named = os_error(h.path, err) if isinstance(err, OSError) else None
            if named is not None:
                raise named from err
            syntax = ""
            try:
                syntax = f" (transfer syntax {ds.file_meta.TransferSyntaxUID.name})"
            except Exception:  # noqa: BLE001
                pass
            raise DataError(f"{h.path}: the pixel data cannot be decoded{syntax}: {type(err).__name__}: {err}") from err
        if arr.shape != (h.rows, h.cols):
            raise DataError(f"{h.path}: pixel data of shape {arr.shape}, expected ({h.rows}, {h.cols}).")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if fix_wrapped_12bit and int(ds.get("BitsStored", 16)) == 12 and int(ds.get("PixelRepresentation", 0)) == 0 \
                and intercept > -100:
            arr = arr + 1000.0
            arr[arr >= 4096] -= 4096.0
            intercept = -1000.0
        plane = arr * slope + intercept
        finite = np.isfinite(plane)
        if not finite.all():
            row, col = (int(v) for v in np.argwhere(~finite)[0])
            raise DataError(f"{h.path}: {plane.size - int(np.count_nonzero(finite))} pixel(s) are not finite after "
                            f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} (the first at row {row}, column "
                            f"{col}); expected finite HU.")
        planes.append(plane)
    img = sitk.GetImageFromArray(np.stack(planes))
    first = slices[0]
    img.SetSpacing((first.pixel_spacing[1], first.pixel_spacing[0], step))
    if first.ipp is not None:
        img.SetOrigin(first.ipp)
    if first.iop is not None:
        from medvlp.datamodules.formats.nifti import direction_from_iop

        img.SetDirection(direction_from_iop(first.iop))
    return img


__all__ = ["SliceHeader", "dicom_files", "read_header", "order_slices", "read_series"]
