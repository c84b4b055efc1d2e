"""DICOM I/O (specs/datasets.md §3.5, §3.7, §4.5, §4.7): polarity, LUTs, codecs, errors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from medvlp.datamodules.base import DataError
from medvlp.datamodules.demo.dicom import write_dicom
from medvlp.datamodules.formats.dicom import read_dicom, read_dicom_header

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def phantom(h: int = 64, w: int = 64) -> np.ndarray:
    """Smooth synthetic radiograph, uint8 spanning 0..255: dark lungs, a bright spine and heart."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.35 + 0.25 * yy
    for cx in (0.3, 0.7):  # lungs (air = dark)
        img -= 0.3 * np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.45) / 0.25) ** 2))
    img += 0.45 * np.exp(-(((xx - 0.5) / 0.06) ** 2))  # spine (dense = bright)
    img += 0.3 * np.exp(-(((xx - 0.55) / 0.12) ** 2 + ((yy - 0.7) / 0.12) ** 2))  # heart
    img = (img - img.min()) / (img.max() - img.min())
    return np.rint(img * 255).astype(np.uint8)


def _window01(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR windowing (PS3.3 C.11.2.1.2.1) onto [0, 1], written independently."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------------- pixels and polarity


def test_explicit_monochrome2_round_trips_exactly(tmp_path):
    img = phantom()
    path = write_dicom(tmp_path / "a.dcm", img)
    out = read_dicom(path)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    np.testing.assert_array_equal(out, img)
    f = read_dicom(path, out="float")
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, img / 255.0, atol=1e-6)


def test_monochrome1_comes_out_with_monochrome2_polarity(tmp_path):
    img = phantom()
    mono2 = write_dicom(tmp_path / "m2.dcm", img)
    mono1 = write_dicom(tmp_path / "m1.dcm", 255 - img, photometric="MONOCHROME1")
    stored = pydicom.dcmread(mono1).pixel_array
    assert stored[32, 32] < stored[32, 18]  # stored: spine darker than lung (MONOCHROME1)
    out1, out2 = read_dicom(mono1), read_dicom(mono2)
    np.testing.assert_array_equal(out1, out2)
    assert out1[32, 32] > out1[32, 18] + 100  # returned: dense spine bright, lung dark


def test_monochrome1_jpeg_matches_monochrome2_jpeg(tmp_path):
    """Acceptance test: a MONOCHROME1 JPEG file reads like the MONOCHROME2 JPEG of the same image."""
    img = phantom(128, 128)
    mono2 = write_dicom(tmp_path / "m2.dcm", img, transfer_syntax="jpeg_baseline")
    mono1 = write_dicom(
        tmp_path / "m1.dcm", 255 - img, photometric="MONOCHROME1", transfer_syntax="jpeg_baseline"
    )
    out1, out2 = read_dicom(mono1).astype(int), read_dicom(mono2).astype(int)
    assert np.abs(out1 - out2).mean() < 1.0
    assert np.abs(out1 - out2).max() <= 8
    assert np.abs(out1 - img).mean() < 1.0  # not the inverted image (that would be ~100)
    assert out1[64, 64] > out1[64, 36] + 100


def test_jpeg_baseline_file_is_encapsulated_and_decodes_close_to_the_original(tmp_path):
    img = phantom(128, 128)
    path = write_dicom(tmp_path / "j.dcm", img, transfer_syntax="jpeg_baseline", tags={"ViewPosition": "PA"})
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
    assert ds["PixelData"].is_undefined_length and ds.LossyImageCompression == "01"
    assert b"\xff\xd8\xff" in ds.PixelData[:64]  # a JPEG SOI marker in the first fragment
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.PhotometricInterpretation) == (128, 128, 8, "MONOCHROME2")
    out = read_dicom(path).astype(int)
    assert np.abs(out - img).mean() < 1.0
    assert np.abs(out - img).max() <= 8


def test_rle_lossless_file_round_trips_exactly(tmp_path):
    img = phantom()
    path = write_dicom(tmp_path / "r.dcm", img, transfer_syntax="rle")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    np.testing.assert_array_equal(read_dicom(path), img)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_16bit_with_rescale_and_window(tmp_path, photometric):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(32, 48), dtype=np.uint16)  # 12 bits stored
    slope, intercept, center, width = 2.0, -1024.0, 3000.0, 4001.0
    path = write_dicom(tmp_path / "w.dcm", stored, photometric=photometric, bits_stored=12,
                       rescale=(slope, intercept), window=(center, width))
    ds = pydicom.dcmread(path)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    expected = _window01(stored * slope + intercept, center, width)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert 0.05 < (expected == expected.max()).mean() < 0.5  # the window clips part of the image
    np.testing.assert_allclose(read_dicom(path, out="float"), expected, atol=1e-6)
    np.testing.assert_array_equal(read_dicom(path), np.rint(expected * 255).astype(np.uint8))
    # voi="none": min-max of the rescaled values (a positive slope keeps the order)
    plain = (stored - stored.min()) / (stored.max() - stored.min())
    plain = 1.0 - plain if photometric == "MONOCHROME1" else plain
    np.testing.assert_allclose(read_dicom(path, voi="none", out="float"), plain, atol=1e-6)


def test_voi_lut_sequence_wins_over_window(tmp_path):
    rng = np.random.default_rng(2)
    stored = rng.integers(0, 1024, size=(16, 16), dtype=np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", stored, bits_stored=10, window=(100.0, 50.0))
    ds = pydicom.dcmread(path)
    lut = np.rint(np.sqrt(np.arange(900) / 899) * 4000 + 50).astype(int)  # 50..4050, 900 entries from 100
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [900, 100, 12])  # entries, first stored value mapped, bits
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    ds.VOILUTSequence = [item]
    ds.save_as(path)
    expected = (lut[np.clip(stored.astype(int) - 100, 0, 899)] - 50) / 4000
    np.testing.assert_allclose(read_dicom(path, out="float"), expected, atol=1e-6)
    plain = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(read_dicom(path, voi="none", out="float"), plain, atol=1e-6)


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_and_pixel_representation(tmp_path, bits, signed):
    rng = np.random.default_rng(bits)
    if signed:
        lo, hi, dtype = -(2 ** (bits - 1)), 2 ** (bits - 1), np.int16
    else:
        lo, hi, dtype = 0, 2**bits, np.uint16
    stored = rng.integers(lo, hi, size=(16, 20)).astype(dtype)
    stored[0, 0], stored[0, 1] = lo, hi - 1
    path = write_dicom(tmp_path / "b.dcm", stored, bits_stored=bits)
    if bits < 16:  # junk above the high bit (old overlay planes) must be ignored
        ds = pydicom.dcmread(path)
        raw = np.frombuffer(ds.PixelData, dtype="<u2") ^ np.uint16((0xFFFF << bits) & 0xFFFF)
        ds.PixelData = raw.tobytes()
        ds.save_as(path)
    assert pydicom.dcmread(path).PixelRepresentation == int(signed)
    expected = (stored.astype(float) - lo) / (hi - 1 - lo)
    np.testing.assert_allclose(read_dicom(path, out="float"), expected, atol=1e-6)


def test_multiframe_reads_the_first_frame(tmp_path):
    img = phantom()
    path = write_dicom(tmp_path / "mf.dcm", np.stack([img, 255 - img]))
    assert pydicom.dcmread(path).NumberOfFrames == 2
    np.testing.assert_array_equal(read_dicom(path), img)


def test_rgb_is_converted_to_gray_with_bt601_luma(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    expected = (luma - luma.min()) / (luma.max() - luma.min())
    out = read_dicom(path, out="float")
    assert out.shape == (16, 16)
    np.testing.assert_allclose(out, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------- header


def test_write_dicom_header_and_read_header_only(tmp_path):
    tags = {"ViewPosition": "AP", "PatientAge": "51", "PatientSex": "F", "PixelSpacing": [0.143, 0.143]}
    path = write_dicom(tmp_path / "0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm", phantom(), tags=tags)
    ds = pydicom.dcmread(path)
    assert ds.preamble == b"\x00" * 128
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert (ds.Modality, ds.ConversionType, ds.BodyPartExamined) == ("CR", "WSD", "CHEST")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # pixels cut off: a header-only read must not touch them
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that '51' is not a valid AS value; RSNA has it
        keywords = ["Rows", "Columns", "ViewPosition", "PatientID", "PixelSpacing", "PatientAge", "WindowCenter"]
        header = read_dicom_header(path, keywords)
    assert header == {
        "Rows": 64, "Columns": 64, "ViewPosition": "AP", "PatientID": "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
        "PixelSpacing": [0.143, 0.143], "PatientAge": "51", "WindowCenter": None,
    }
    with pytest.raises(DataError, match="0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm"):
        read_dicom(path)
    with pytest.raises(ValueError, match="Did you mean 'PatientID'"):
        read_dicom_header(path, ["PatientId"])


def test_write_dicom_is_deterministic_and_validates(tmp_path):
    img = phantom()
    a = write_dicom(tmp_path / "x" / "same.dcm", img, tags={"PatientID": "p1"})
    b = write_dicom(tmp_path / "y" / "same.dcm", img, tags={"PatientID": "p1"})
    assert a.read_bytes() == b.read_bytes()
    c = write_dicom(tmp_path / "z" / "same.dcm", img, tags={"PatientID": "p2"})
    assert pydicom.dcmread(c).SOPInstanceUID != pydicom.dcmread(a).SOPInstanceUID
    with pytest.raises(ValueError, match="8-bit"):
        write_dicom(tmp_path / "bad.dcm", img.astype(np.uint16), transfer_syntax="jpeg_baseline",
                    bits_stored=12)
    with pytest.raises(ValueError, match="bits_stored"):
        write_dicom(tmp_path / "bad.dcm", np.full((4, 4), 5000, np.uint16), bits_stored=12)
    with pytest.raises(ValueError, match="PatientSex"):
        write_dicom(tmp_path / "bad.dcm", img, tags={"PatientSx": "M"})


# ----------------------------------------------------------------------------------------------- errors


def _assert_data_error(path, *fragments):
    with pytest.raises(DataError) as info:
        read_dicom(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_missing_empty_and_non_dicom_files(tmp_path):
    _assert_data_error(tmp_path / "nope.dcm", "does not exist")
    (tmp_path / "empty.dcm").write_bytes(b"")
    _assert_data_error(tmp_path / "empty.dcm", "empty")
    (tmp_path / "text.dcm").write_text("patientId,x,y\n" * 20)
    _assert_data_error(tmp_path / "text.dcm", "not a DICOM")
    png = tmp_path / "image.dcm"
    from PIL import Image

    Image.fromarray(phantom()).save(png, format="PNG")
    _assert_data_error(png, "not a DICOM")
    for bad in (tmp_path / "nope.dcm", png):  # the header reader shares the checks
        with pytest.raises(DataError, match=bad.name):
            read_dicom_header(bad, ["Rows"])


@pytest.mark.parametrize("syntax", ["explicit", "jpeg_baseline"])
def test_truncated_files_raise_data_error_at_every_cut(tmp_path, syntax):
    data = write_dicom(tmp_path / "full.dcm", phantom(), transfer_syntax=syntax).read_bytes()
    # an encapsulated file ends with an 8-byte Sequence Delimiter; cut before it, or into the pixels
    end = len(data) - (8 if syntax == "jpeg_baseline" else 0)
    cut = tmp_path / "cut.dcm"
    for n in [*range(1, end, 97), end - 1]:
        cut.write_bytes(data[:n])
        _assert_data_error(cut)
    _assert_data_error(cut, "truncated")  # the last pixel byte missing


def test_no_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", phantom())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    _assert_data_error(path, "no Pixel Data")


def test_corrupt_jpeg_stream(tmp_path):
    path = write_dicom(tmp_path / "bad.dcm", phantom(), transfer_syntax="jpeg_baseline")
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path)
    _assert_data_error(path, "JPEG Baseline", JPEG_BASELINE, "decode")


@pytest.mark.skipif(get_decoder(JPEG_LS).is_available, reason="a JPEG-LS decoder is installed")
def test_missing_decoder_names_syntax_and_what_to_install(tmp_path):
    path = write_dicom(tmp_path / "jls.dcm", phantom())
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG_LS
    ds.save_as(path)
    _assert_data_error(
        path, "JPEG-LS Lossless", JPEG_LS, "pip install pylibjpeg pylibjpeg-libjpeg", "python-gdcm"
    )


def test_bad_options_and_light_import():
    with pytest.raises(ValueError, match="auto, none"):
        read_dicom("x.dcm", voi="window")
    with pytest.raises(ValueError, match="uint8, float"):
        read_dicom("x.dcm", out="uint16")
    code = (
        "import sys, medvlp.datamodules.formats.dicom, medvlp.datamodules.formats.rle;"
        "print(sorted(m for m in ('pydicom', 'PIL') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
