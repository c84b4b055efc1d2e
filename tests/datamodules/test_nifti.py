"""NIfTI reading, geometry, orientation, resampling and HU conversion (specs/datasets.md §8.4)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom_hu, truncate, write_nifti

from medvlp.datamodules.base import DataError
from medvlp.datamodules.formats import nifti


def _marker_volume() -> np.ndarray:
    a = np.zeros((6, 8, 10), dtype=np.int16)
    a[1, 2, 3] = 100  # a unique voxel: its physical position identifies the orientation
    a[4, 6, 8] = 50
    return a


def test_lps_and_ras_files_agree_after_canonical_orientation(tmp_path):
    a = _marker_volume()
    spacing_zyx = (2.0, 0.5, 0.7)
    origin = np.array([-10.0, 20.0, 30.0])
    lps = write_nifti(tmp_path / "lps.nii.gz", a, spacing_zyx, origin)
    # same physical content stored with x and y reversed (a RAS-ordered array)
    d, h, w = a.shape
    ras_origin = origin + np.array([(w - 1) * 0.7, (h - 1) * 0.5, 0.0])
    ras = write_nifti(tmp_path / "ras.nii.gz", a[:, ::-1, ::-1].copy(), spacing_zyx, ras_origin, (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    img_lps, img_ras = nifti.read_image(lps), nifti.read_image(ras)
    assert not np.array_equal(nifti.to_array(img_lps), nifti.to_array(img_ras))
    out_lps, out_ras = nifti.orient(img_lps, "LPS"), nifti.orient(img_ras, "LPS")
    np.testing.assert_array_equal(nifti.to_array(out_lps), nifti.to_array(out_ras))
    np.testing.assert_allclose(out_lps.GetOrigin(), out_ras.GetOrigin(), atol=1e-4)
    assert nifti.spacing_zyx(out_ras) == pytest.approx(spacing_zyx)
    # asking for RAS flips the LPS array
    np.testing.assert_array_equal(nifti.to_array(nifti.orient(img_lps, "ras")), a[:, ::-1, ::-1])
    assert nifti.orient(img_ras, "") is img_ras


@pytest.mark.parametrize("bad", ["LPX", "LLS", "LP", "XYZ"])
def test_bad_orientation_code(bad):
    with pytest.raises(ValueError, match="3-letter code"):
        nifti.validate_orientation(bad)


def test_spacing_override_and_iop_direction(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", _marker_volume())
    img = nifti.read_image(path)
    nifti.set_geometry(img, (2.5, 0.8, 0.7), (-166, 9, 56.3), nifti.direction_from_iop([1, 0, 0, 0, 1, 0]))
    assert img.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))  # SimpleITK order (x, y, z)
    assert nifti.spacing_zyx(img) == pytest.approx((2.5, 0.8, 0.7))
    assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # columns of the direction matrix are the row cosine, the column cosine and their cross product
    direction = np.array(nifti.direction_from_iop([0, 1, 0, 0, 0, -1])).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], [0, 1, 0])
    np.testing.assert_allclose(direction[:, 1], [0, 0, -1])
    np.testing.assert_allclose(direction[:, 2], np.cross([0, 1, 0], [0, 0, -1]))


def test_resample_shape_spacing_and_extent(tmp_path):
    hu = phantom_hu((16, 32, 30))
    img = nifti.read_image(write_nifti(tmp_path / "v.nii.gz", hu.astype(np.int16), (2.5, 0.8, 0.8)))
    out = nifti.resample(img, (5.0, 1.6, 1.6))
    assert nifti.to_array(out).shape == (8, 16, 15)  # int(size * spacing / target)
    assert nifti.spacing_zyx(out) == pytest.approx((5.0, 1.6, 1.6))
    assert out.GetPixelID() == sitk.sitkFloat32

    def centre(im):
        return np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()]))

    np.testing.assert_allclose(centre(out), centre(img), atol=1e-4)
    # a constant image stays constant up to the borders (no default value leaks in)
    const = sitk.Image(img.GetSize(), sitk.sitkInt16) + 7
    const.CopyInformation(img)
    assert np.all(nifti.to_array(nifti.resample(const, (3.0, 1.0, 1.0), default_value=-999)) == 7)


def test_resample_label_map_is_nearest(tmp_path):
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[2:8, 4:12, 4:10] = 1
    labels[2:8, 12:16, 10:16] = 4
    img = nifti.read_image(write_nifti(tmp_path / "m.nii.gz", labels, (1.5, 0.7, 0.7)))
    out = nifti.resample(img, (3.0, 1.0, 1.0), label=True)
    arr = nifti.to_array(out)
    assert arr.dtype == np.uint8
    assert set(np.unique(arr)) == {0, 1, 4}


@pytest.mark.parametrize("intercept, dtype", [(-8192, np.int16), (-1024, np.int16), (-1024, np.uint16)])
def test_hu_from_stored_values(tmp_path, intercept, dtype):
    hu = phantom_hu()
    path = write_nifti(tmp_path / "v1.nii.gz", (hu - intercept).astype(dtype))
    img = nifti.read_image(path)
    np.testing.assert_array_equal(nifti.to_array(nifti.rescale(img, 1.0, intercept)), hu)
    assert nifti.lung_region_median(hu) == pytest.approx(-850, abs=30)
    nifti.check_hu(hu, path)
    with pytest.raises(DataError, match="v1.nii.gz"):  # rescale forgotten
        nifti.check_hu(nifti.to_array(nifti.rescale(img)), path)


def test_v2_double_rescale_is_caught(tmp_path):
    hu = phantom_hu()
    path = write_nifti(tmp_path / "train_1_a_1.nii.gz", hu.astype(np.int16), (2.5, 0.8, 0.8))
    img = nifti.read_image(path)
    nifti.check_hu(nifti.to_array(nifti.rescale(img)), path)  # v2: already HU
    for intercept in (-1024, -8192):
        with pytest.raises(DataError, match="train_1_a_1.nii.gz.*applied twice"):
            nifti.check_hu(nifti.to_array(nifti.rescale(img, 1.0, intercept)), path)


def test_truncated_missing_and_corrupt_files(tmp_path):
    path = write_nifti(tmp_path / "train_9_a_1.nii.gz", phantom_hu().astype(np.int16))
    nifti.check_nifti_file(path)
    truncate(path, 0.6)
    assert sitk.ReadImage(str(path)).GetSize() == (32, 32, 16)  # SimpleITK alone does not notice
    with pytest.raises(DataError, match="train_9_a_1.nii.gz is truncated"):
        nifti.read_image(path)
    with pytest.raises(DataError, match="missing.nii.gz does not exist"):
        nifti.read_image(tmp_path / "missing.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a gzip stream at all" * 4)
    with pytest.raises(DataError, match="garbage.nii.gz"):
        nifti.read_image(garbage)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.nii.gz is empty"):
        nifti.read_image(empty)
    # uncompressed .nii: truncation is a size mismatch
    plain = write_nifti(tmp_path / "plain.nii", phantom_hu().astype(np.int16))
    nifti.check_nifti_file(plain)
    truncate(plain, 0.5)
    with pytest.raises(DataError, match="plain.nii is truncated"):
        nifti.read_image(plain)


def test_multi_member_gzip_is_accepted(tmp_path):
    """pigz/bgzip-style files: the gzip trailer describes only the last member."""
    a = phantom_hu().astype(np.int16)
    plain = write_nifti(tmp_path / "v.nii", a)
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    np.testing.assert_array_equal(nifti.to_array(nifti.read_image(multi)), a)
    multi.write_bytes(multi.read_bytes()[:-3000])
    with pytest.raises(DataError, match="multi.nii.gz is truncated or corrupt"):
        nifti.read_image(multi)


def test_window_and_crop_pad():
    w = nifti.window(np.array([-2000.0, -1150.0, -400.0, 350.0, 900.0]), -1150, 350)
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert w.dtype == np.float32
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    out = nifti.center_crop_or_pad(a, (3, 8, 7), pad_value=-1)
    assert out.shape == (3, 8, 7)
    np.testing.assert_array_equal(out[:, 1:7, :], a[1:4])
    assert np.all(out[:, 0] == -1) and np.all(out[:, 7] == -1)
    with pytest.raises(ValueError):
        nifti.center_crop_or_pad(a, (3, 8))
