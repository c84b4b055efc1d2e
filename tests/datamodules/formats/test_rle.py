"""SIIM-ACR run-length encoding (specs/datasets.md §4.3, §4.4): layout, round trips, markers, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medvlp.datamodules.base import DataError
from medvlp.datamodules.formats.rle import rle_decode, rle_encode, rle_union


def _spec_mask() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[2:6, 3] = 1  # column 3, rows 2-5
    mask[2:6, 4] = 1  # column 4, rows 2-5
    return mask


def test_spec_example_decodes_column_major_and_encodes_back():
    mask = rle_decode("50 4 12 4", 16, 16)
    assert mask.dtype == np.uint8 and mask.shape == (16, 16) and mask.flags.c_contiguous
    np.testing.assert_array_equal(mask, _spec_mask())
    assert rle_encode(_spec_mask()) == "50 4 12 4"
    # row-major decoding (the transposition trap) would give rows 3-4, columns 2-5 instead
    assert not np.array_equal(mask, _spec_mask().T)


def test_non_square_layout():
    # 3 rows x 5 columns: flat index c * 3 + r; runs at 4..5 (col 1 rows 1-2) and 9 (col 3 row 0)
    mask = rle_decode("4 2 3 1", 3, 5)
    expected = np.zeros((3, 5), dtype=np.uint8)
    expected[1:3, 1] = 1
    expected[0, 3] = 1
    np.testing.assert_array_equal(mask, expected)
    assert rle_encode(expected) == "4 2 3 1"


@pytest.mark.parametrize("empty", ["-1", " -1", "-1 ", "", "   "])
def test_empty_markers(empty):
    mask = rle_decode(empty, 8, 6)
    assert mask.shape == (8, 6) and mask.dtype == np.uint8 and not mask.any()


def test_encode_empty_and_non_binary_masks():
    assert rle_encode(np.zeros((4, 4), dtype=bool)) == "-1"
    assert rle_encode(_spec_mask() * 255) == "50 4 12 4"
    assert rle_encode(_spec_mask().astype(bool)) == "50 4 12 4"
    full = np.ones((3, 4), dtype=np.uint8)
    assert rle_encode(full) == "0 12"
    np.testing.assert_array_equal(rle_decode("0 12", 3, 4), full)
    with pytest.raises(ValueError, match="2D"):
        rle_encode(np.zeros((2, 2, 2)))


def test_random_round_trips():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 7), (7, 1), (16, 16), (33, 17), (64, 128), (256, 256)]
    cases = 0
    for h, w in sizes:
        for density in (0.0, 0.01, 0.5, 0.99, 1.0):
            mask = (rng.random((h, w)) < density).astype(np.uint8)
            rle = rle_encode(mask)
            np.testing.assert_array_equal(rle_decode(rle, h, w), mask)
            np.testing.assert_array_equal(rle_decode(f" {rle}", h, w), mask)  # the CSV's leading space
            cases += 1
    for _ in range(15):  # sparse 1024x1024 masks like SIIM: a few blobs and isolated pixels
        mask = np.zeros((1024, 1024), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, 1000, size=2)
            mask[r : r + rng.integers(1, 60), c : c + rng.integers(1, 40)] = 1
        mask[rng.integers(0, 1024, 20), rng.integers(0, 1024, 20)] = 1
        mask[-1, -1] = rng.integers(0, 2)  # the very last pixel
        rle = rle_encode(mask)
        np.testing.assert_array_equal(rle_decode(rle, 1024, 1024), mask)
        assert rle_encode(rle_decode(rle, 1024, 1024)) == rle
        cases += 1
    assert cases >= 50


def test_union_of_rows():
    a = rle_encode(_spec_mask())
    other = np.zeros((16, 16), dtype=np.uint8)
    other[3:9, 4] = 1  # overlaps the first mask in column 4
    b = rle_encode(other)
    union = rle_union([a, " -1", b], 16, 16)
    np.testing.assert_array_equal(union, _spec_mask() | other)
    assert union.max() == 1 and union.dtype == np.uint8
    np.testing.assert_array_equal(rle_union("50 4 12 4", 16, 16), _spec_mask())  # a string is one row
    assert not rle_union(["-1", " -1"], 16, 16).any()
    with pytest.raises(DataError, match="row 1"):
        rle_union([a, "1 2 3"], 16, 16)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("50 4 12", "odd number"),
        ("50 4 x 4", "non-integer token 'x'"),
        ("50 4.5 12 4", "non-integer token '4.5'"),
        ("50 4 -1 4", "negative value -1"),
        ("-5 3", "negative value -5"),
        ("250 10", "runs past the end of the 16x16 image"),
        ("50 4 12 4 190 3", "runs past the end"),  # not increasing as starts: plain overflow
        ("50 4 66 4 200 3", "absolute"),  # starts 50 < 66 < 200: absolute encoding
    ],
)
def test_errors_name_the_problem(rle, message):
    with pytest.raises(DataError, match=message):
        rle_decode(rle, 16, 16)


def test_absolute_detection_only_when_relative_overflows():
    # "50 4 66 4" is increasing but fits as relative (runs 50-53 and 120-123), so it is accepted
    mask = rle_decode("50 4 66 4", 16, 16)
    assert mask.sum() == 8 and mask.reshape(-1, order="F")[120:124].all()


def test_bad_types_and_sizes():
    with pytest.raises(DataError, match="string"):
        rle_decode(float("nan"), 16, 16)
    with pytest.raises(ValueError, match="positive"):
        rle_decode("-1", 0, 16)
