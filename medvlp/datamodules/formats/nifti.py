"""NIfTI volumes with SimpleITK: reading, geometry, orientation, resampling, windowing, crop/pad.

Axis conventions (the source of most 3D bugs, so spelled out everywhere):

* SimpleITK images index ``(x, y, z)``; ``GetSpacing()``, ``GetSize()`` and ``GetOrigin()`` are
  in that order.
* Arrays returned here are ``(z, y, x)`` (``sitk.GetArrayFromImage`` order), and every function
  taking a spacing or size for an array takes it as ``(z, y, x)`` (names end in ``_zyx``).
* Physical coordinates are DICOM/ITK LPS (SimpleITK converts NIfTI's RAS on read).

See ``specs/datasets.md`` §8.4 and ``specs/methods/{hlip,fvlm}.md`` §3.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvlp.datamodules.base import DataError
from medvlp.datamodules.errors import check_readable, os_error

_NIFTI1_HEADER = 348
_NIFTI2_HEADER = 540
# NIfTI datatype codes of floating-point voxels -> numpy type (complex types are read as their parts)
_FLOAT_TYPES = {16: "f4", 64: "f8", 1536: "f16", 32: "f4", 1792: "f8"}


@dataclass(frozen=True)
class NiftiHeader:
    """What the checks need from a NIfTI-1/2 header (read with :func:`_parse_header`)."""

    expected: int  # bytes of header + extensions + voxels
    start: int  # offset of the first voxel
    datatype: int
    bitpix: int
    endian: str  # "<" or ">"
    dims: tuple[int, ...]  # the ndim sizes (x, y, z, ...)
    pixdim: tuple[float, ...]  # the ndim spacings
    qform_code: int
    sform_code: int


def _parse_header(header: bytes) -> NiftiHeader | None:
    """The header of a single-file NIfTI; None if ``header`` is not one."""
    if len(header) < 4:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == _NIFTI1_HEADER and len(header) >= _NIFTI1_HEADER:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", header[70:74])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            (vox_offset,) = struct.unpack(endian + "f", header[108:112])
            qform, sform = struct.unpack(endian + "hh", header[252:256])
            start = max(int(vox_offset), 352)
            break
        if sizeof_hdr == _NIFTI2_HEADER and len(header) >= _NIFTI2_HEADER:
            datatype, bitpix = struct.unpack(endian + "hh", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            (vox_offset,) = struct.unpack(endian + "q", header[168:176])
            qform, sform = struct.unpack(endian + "ii", header[344:352])
            start = max(int(vox_offset), 544)
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n = 1
    for d in dims[1 : ndim + 1]:
        n *= max(int(d), 1)
    return NiftiHeader(start + n * bitpix // 8, start, int(datatype), int(bitpix), endian,
                       tuple(int(d) for d in dims[1 : ndim + 1]), tuple(float(v) for v in pixdim[1 : ndim + 1]),
                       int(qform), int(sform))


def _expected_payload(header: bytes) -> int | None:
    """Bytes of a single-file NIfTI (header + extensions + voxels) described by ``header``."""
    parsed = _parse_header(header)
    return None if parsed is None else parsed.expected


def _unreadable(p: Path, err: OSError | EOFError | struct.error) -> DataError:
    named = os_error(p, err) if isinstance(err, OSError) else None
    return named or DataError(f"NIfTI file {p} is corrupt or not gzip-compressed ({err}); re-download it.")


def read_header(path: str | os.PathLike) -> NiftiHeader:
    """The header of the NIfTI file ``path``; DataError naming the file if it cannot be read or parsed."""
    p = Path(path)
    try:
        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rb") as f:
            header = f.read(_NIFTI2_HEADER)
    except (OSError, EOFError, struct.error) as err:
        raise _unreadable(p, err) from err
    parsed = _parse_header(header)
    if parsed is None:
        raise DataError(f"NIfTI file {p} has no valid NIfTI-1/2 header; re-download it.")
    return parsed


def check_nifti_file(path: str | os.PathLike) -> NiftiHeader:
    """Raise :class:`DataError` if ``path`` is missing, unreadable, empty or visibly truncated; else
    return its header.

    SimpleITK reads a truncated ``.nii.gz`` *without an error* (the missing voxels come back as
    zeros), so completeness is checked here: the gzip trailer stores the uncompressed length, which
    must equal header + voxel bytes. Cost: two small reads, no decompression of the voxels.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"NIfTI file {p} does not exist.")
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"NIfTI file {p} is empty (0 bytes); re-download it.")
    gz = p.name.endswith(".gz")
    parsed = read_header(p)
    try:
        if gz:
            with open(p, "rb") as f:
                f.seek(-4, os.SEEK_END)
                (stored_len,) = struct.unpack("<I", f.read(4))
        else:
            stored_len = size
    except (OSError, EOFError, struct.error) as err:
        raise _unreadable(p, err) from err
    expected = parsed.expected
    if gz and stored_len != expected % (1 << 32):
        # The trailer describes only the last gzip member; a multi-member file (pigz, bgzip) is
        # valid, so decide by decompressing (this cost is paid only by unusual or broken files).
        total, problem = _gunzipped_length(p)
        if problem or total < expected:
            raise DataError(
                f"NIfTI file {p} is truncated or corrupt: the header describes {expected} bytes, the gzip "
                f"stream {problem or f'holds {total}'}. Re-download it (or add it to data.exclude)."
            )
    if not gz and stored_len < expected:
        raise DataError(f"NIfTI file {p} is truncated: {stored_len} bytes on disk, {expected} expected.")
    return parsed


def _gunzipped_length(path: Path) -> tuple[int, str]:
    """(decompressed bytes, "" or what went wrong) of a gzip file, streamed."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        return total, f"ends early ({err})"
    return total, ""


def check_finite_voxels(path: str | os.PathLike, header: NiftiHeader | None = None) -> None:
    """Raise :class:`DataError` if a floating-point NIfTI file holds NaN or infinite voxels.

    ITK's NIfTI reader turns NaN voxels into 0 without a word (which a rescale then turns into,
    e.g., -1024 HU), so the stored voxels are checked here, streamed. Integer files cannot hold
    NaN and cost nothing; float files are decompressed once more.
    """
    p = Path(path)
    h = header or read_header(p)
    code = _FLOAT_TYPES.get(h.datatype)
    if code is None:
        return
    dtype = np.dtype(h.endian + code)
    bad, first, seen = 0, -1, 0
    opener = gzip.open if p.name.endswith(".gz") else open
    chunk = dtype.itemsize * (1 << 20)
    try:
        with opener(p, "rb") as f:
            f.read(h.start)
            total = (h.expected - h.start) // dtype.itemsize
            while seen < total:
                buf = f.read(min(chunk, (total - seen) * dtype.itemsize))
                if not buf:
                    break
                vals = np.frombuffer(buf[: len(buf) - len(buf) % dtype.itemsize], dtype=dtype)
                finite = np.isfinite(vals)
                if not finite.all():
                    if first < 0:
                        first = seen + int(np.argmin(finite))
                    bad += int(vals.size - np.count_nonzero(finite))
                seen += vals.size
    except (OSError, EOFError, zlib.error) as err:
        raise _unreadable(p, err) from err
    if bad:
        per_voxel = 2 if h.datatype in (32, 1792) else 1  # complex: two numbers per voxel
        index = np.unravel_index(first // per_voxel, tuple(max(d, 1) for d in h.dims), order="F")
        where = ", ".join(str(int(i)) for i in index)
        raise DataError(
            f"NIfTI file {p} holds {bad} non-finite voxel value(s) (NaN or inf; the first at voxel (x, y, z) = "
            f"({where})); SimpleITK would read them as 0. Expected finite intensities: re-export the volume, "
            f"or list it in data.exclude."
        )


def check_header_spacing(path: str | os.PathLike, header: NiftiHeader | None = None) -> None:
    """Raise :class:`DataError` if the header gives a zero or non-finite voxel size (pixdim) for a
    spatial axis and no sform: SimpleITK would silently read it as 1 mm."""
    h = header or read_header(path)
    if h.sform_code > 0:
        return
    for axis, (size, step) in enumerate(zip(h.dims[:3], h.pixdim[:3])):
        if not np.isfinite(step) or step == 0:
            raise DataError(
                f"NIfTI file {path}: the header gives voxel spacing {step} along {'xyz'[axis]} (pixdim[{axis + 1}], "
                f"{size} voxels) and no sform; a volume needs a positive spacing (SimpleITK would assume 1 mm). "
                f"Fix the header, or take the spacing from the dataset's metadata."
            )


def read_image(path: str | os.PathLike, check: bool = True, header_geometry: bool = True) -> sitk.Image:
    """Read a NIfTI file with SimpleITK, raising :class:`DataError` naming the file on failure.

    With ``check`` the file is first checked (:func:`check_nifti_file`: missing, permission,
    truncated; :func:`check_finite_voxels`: NaN / inf in a float file; and with
    ``header_geometry``, i.e. when the header's spacing is used, :func:`check_header_spacing`).
    """
    if check:
        header = check_nifti_file(path)
        check_finite_voxels(path, header)
        if header_geometry:
            check_header_spacing(path, header)
    else:
        check_readable(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise DataError(f"NIfTI file {path} could not be read: {detail}") from err


def check_finite(arr: np.ndarray, path: str | os.PathLike, what: str = "voxel") -> None:
    """Raise :class:`DataError` naming ``path`` if ``arr`` holds NaN or infinite values."""
    if arr.dtype.kind not in "fc":
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), arr.shape))
    raise DataError(f"{path}: {arr.size - int(np.count_nonzero(finite))} non-finite {what} value(s) (NaN or inf; "
                    f"the first at {first}, array order); expected finite intensities. Re-export the file, or "
                    f"list it in data.exclude.")


MIN_SLICES = 2


def check_volume_geometry(img: sitk.Image, path: str | os.PathLike) -> None:
    """Raise :class:`DataError` naming ``path`` if ``img`` is not a usable 3D volume: fewer than
    :data:`MIN_SLICES` voxels along an axis (a single-slice scout, a 2D image), or a spacing that
    is not a positive finite number."""
    size_zyx = tuple(reversed(img.GetSize()))
    spacing = spacing_zyx(img) if img.GetDimension() == 3 else tuple(reversed(img.GetSpacing()))
    if img.GetDimension() != 3:
        raise DataError(f"{path}: a {img.GetDimension()}-D image of shape {size_zyx}; expected a 3-D volume "
                        f"(z, y, x).")
    if size_zyx[0] < MIN_SLICES:
        raise DataError(f"{path}: a single-slice volume (shape {size_zyx}, z, y, x); a CT volume needs at least "
                        f"{MIN_SLICES} slices. It is probably a scout / localizer image or a truncated export; "
                        f"list it in data.exclude.")
    if min(size_zyx[1:]) < MIN_SLICES:
        raise DataError(f"{path}: a degenerate volume (shape {size_zyx}, z, y, x); each slice needs at least "
                        f"{MIN_SLICES} x {MIN_SLICES} pixels.")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{path}: voxel spacing {tuple(float(s) for s in spacing)} mm (z, y, x); every spacing "
                        f"must be a positive number.")


def direction_from_iop(iop: Sequence[float]) -> tuple[float, ...]:
    """SimpleITK direction (row-major 3x3, columns = index axes) from DICOM ImageOrientationPatient.

    ``iop`` = row cosine (direction of increasing column index, x) followed by column cosine
    (direction of increasing row index, y); the slice axis is their cross product.

    Differences from the official code: fVLM (``data/fix_data.py``) passes the three cosines as the
    *rows* of the matrix; we place them as columns, which is what ITK means. Both agree for the
    axis-aligned orientations found in CT-RATE.
    """
    if len(iop) != 6:
        raise ValueError(f"ImageOrientationPatient needs 6 numbers, got {list(iop)}")
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    row /= np.linalg.norm(row) or 1.0
    col /= np.linalg.norm(col) or 1.0
    normal = np.cross(row, col)
    return tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())


def set_geometry(
    img: sitk.Image,
    spacing_zyx: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
) -> sitk.Image:
    """Override the header geometry (in place; returns ``img``). ``origin`` is LPS (x, y, z) mm."""
    if spacing_zyx is not None:
        sp = [float(s) for s in spacing_zyx]
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {sp}")
        img.SetSpacing(tuple(reversed(sp)))
    if origin is not None:
        img.SetOrigin(tuple(float(v) for v in origin))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in direction))
    return img


def validate_orientation(orientation: str | None) -> str:
    """Upper-cased orientation code (``"lps"`` -> ``"LPS"``; ``""`` stays ``""``); ValueError if invalid."""
    if not orientation:
        return ""
    code = str(orientation).upper()
    axis_of = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
    if len(code) != 3 or any(c not in axis_of for c in code) or len({axis_of[c] for c in code}) != 3:
        raise ValueError(
            f"orientation must be a 3-letter code with one of L/R, one of A/P and one of S/I, such as "
            f"'LPS' or 'RAS' (or '' to keep the stored axes), got '{orientation}'"
        )
    return code


def orient(img: sitk.Image, orientation: str | None = "LPS") -> sitk.Image:
    """Permute/flip axes so the image is in the canonical frame ``orientation``.

    ``orientation`` is a DICOM-style code of the direction each index axis (x, y, z) points to,
    e.g. ``"LPS"`` (x to the patient's left, y posterior, z superior) or ``"RAS"``. ``""``/None
    keeps the stored order. Oblique directions go to the closest axis-aligned frame.
    """
    code = validate_orientation(orientation)
    if not code:
        return img
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    if current == code:
        return img
    return sitk.DICOMOrient(img, code)


def resample(
    img: sitk.Image,
    spacing_zyx: Sequence[float],
    label: bool = False,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample to ``spacing_zyx`` mm over the same physical extent.

    The new grid covers the old one edge to edge (like ``torch.nn.functional.interpolate`` with
    ``align_corners=False``); its size per axis is ``int(size * spacing / target)`` (at least 1),
    as in HLIP ``data/ct_rate/process.py`` (plus 1e-6 against floating-point round-down). Images use linear interpolation and come back as
    float32; label maps (``label=True``) use nearest neighbour and keep their pixel type.
    """
    target = tuple(float(s) for s in reversed(list(spacing_zyx)))  # x, y, z
    if len(target) != 3 or min(target) <= 0:
        raise ValueError(f"target spacing must be 3 positive numbers (z, y, x), got {list(spacing_zyx)}")
    old_spacing = np.asarray(img.GetSpacing(), dtype=float)
    new_spacing = np.asarray(target)
    # + 1e-6: 32 * 0.7 / 1.6 is 13.999999... in floating point but 14 voxels are meant
    size = [max(1, int(n * s / t + 1e-6)) for n, s, t in zip(img.GetSize(), old_spacing, new_spacing)]
    if size == list(img.GetSize()) and np.allclose(old_spacing, new_spacing):
        return img if label else sitk.Cast(img, sitk.sitkFloat32)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    # corner of the old grid, then the centre of the first new voxel
    corner = np.asarray(img.GetOrigin()) - direction @ (old_spacing / 2)
    origin = corner + direction @ (new_spacing / 2)
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel_type = img.GetPixelID() if label else sitk.sitkFloat32
    return sitk.Resample(
        img, size, sitk.Transform(), interpolator, origin.tolist(), target, img.GetDirection(),
        float(default_value), pixel_type,
    )


def to_array(img: sitk.Image) -> np.ndarray:
    """Voxel array in ``(z, y, x)`` order (a copy)."""
    return sitk.GetArrayFromImage(img)


def spacing_zyx(img: sitk.Image) -> tuple[float, float, float]:
    """Voxel spacing of ``img`` in ``(z, y, x)`` order (mm)."""
    x, y, z = img.GetSpacing()
    return (z, y, x)


def rescale(img: sitk.Image, slope: float = 1.0, intercept: float = 0.0) -> sitk.Image:
    """``stored * slope + intercept`` as float32 (e.g. DICOM stored values -> HU)."""
    out = sitk.Cast(img, sitk.sitkFloat32)
    if slope != 1.0:
        out = out * float(slope)
    if intercept != 0.0:
        out = out + float(intercept)
    return out


def window(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and map linearly to ``[0, 1]`` (float32)."""
    if high <= low:
        raise ValueError(f"window must satisfy low < high, got [{low}, {high}]")
    out = np.array(arr, dtype=np.float32, copy=True)  # one pass; the rest in place
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def center_crop_or_pad(arr: np.ndarray, size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """Centre-pad with ``pad_value`` to at least ``size``, then centre-crop to exactly ``size``.

    ``size`` has one entry per axis of ``arr`` (e.g. ``(D, H, W)``); odd margins put the extra
    voxel at the end, as MONAI's ``SpatialPad``/``CenterSpatialCrop`` do.
    """
    size = [int(s) for s in size]
    if len(size) != arr.ndim:
        raise ValueError(f"size {size} does not match an array of shape {arr.shape}")
    # Crop the axes that are too long first (a memory-mapped array then reads only that part),
    # then pad the ones that are too short: the same result as padding first.
    slices, pads = [], []
    for n, s in zip(arr.shape, size):
        start = max((n - s) // 2, 0)
        slices.append(slice(start, start + min(n, s)))
        extra = max(s - n, 0)
        pads.append((extra // 2, extra - extra // 2))
    arr = arr[tuple(slices)]
    if any(p != (0, 0) for p in pads):
        arr = np.pad(arr, pads, mode="constant", constant_values=pad_value)
    return arr


def lung_region_median(hu: np.ndarray) -> float:
    """Median HU of the dark (air/lung) part of the central region of a chest CT.

    The central half of the volume along each axis lies inside the thorax and inside the
    reconstruction circle. Its voxels darker than the midpoint of the region's 1st and 99th
    percentiles are air and lung; their median is about -850 HU on a correctly scaled scan, about
    +170 when a -1024 intercept was forgotten and about -1900 when it was applied twice.
    """
    d, h, w = hu.shape[-3:]
    box = hu[..., d // 4 : d - d // 4, h // 4 : h - h // 4, w // 4 : w - w // 4]
    step = max(1, int(round((box.size / 2_000_000) ** (1 / 3))))  # at most ~2M voxels
    sample = np.asarray(box[..., ::step, ::step, ::step], dtype=np.float32).ravel()
    if sample.size == 0:
        return float("nan")
    lo, hi = np.percentile(sample, [1, 99])
    dark = sample[sample <= (lo + hi) / 2]
    return float(np.median(dark)) if dark.size else float(np.median(sample))


def check_hu(hu: np.ndarray, path: str | os.PathLike, valid: Sequence[float] = (-1100.0, -500.0)) -> float:
    """Raise :class:`DataError` unless :func:`lung_region_median` of ``hu`` lies in ``valid``."""
    value = lung_region_median(hu)
    low, high = float(valid[0]), float(valid[1])
    if not (low <= value <= high):
        raise DataError(
            f"{path}: after conversion the air/lung region has median {value:.0f} HU, outside the plausible "
            f"[{low:.0f}, {high:.0f}]. The intensity rescale is probably wrong (missing for a v1 file, or "
            f"applied twice to a v2 *_fixed file); check data.version and data.apply_metadata_rescale, or set "
            f"data.hu_sanity_check=false if this volume is genuinely unusual."
        )
    return value
