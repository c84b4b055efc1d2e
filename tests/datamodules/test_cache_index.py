"""The preprocessed cache's index in compact form: digests and entries as arrays, built from ``index.jsonl``
once and reloaded from ``index.npz`` while the JSON lines are unchanged."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from medvlp.datamodules import cache as K


def write_index(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / K.INDEX, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_answers_as_the_json_lines_do_and_is_rebuilt_when_they_change(tmp_path, monkeypatch):
    rows = [["files/p10/s1/a.jpg", 2544, 3056], ["files/p10/s1/b.jpg", 3056, 2544], ["files/p11/s2/c.jpg", 7, 9]]
    write_index(tmp_path, [*rows, ["files/p10/s1/a.jpg", 100, 200]])  # written twice: the last line counts
    with open(tmp_path / K.INDEX, "a") as fh:
        fh.write('["files/torn", 12')  # a torn last line (an interrupted write)
    index = K.read_index(tmp_path)
    assert len(index) == 3 and "files/torn" not in index and "files/p10/s1/b.jpg" in index
    assert index.get("files/p10/s1/a.jpg") == (100, 200) and type(index.get("files/p11/s2/c.jpg")[0]) is int
    assert index.get("files/missing.jpg") is None and 5 not in index
    with pytest.raises(KeyError):
        index["files/missing.jpg"]
    with pytest.raises(TypeError, match="parse_index"):
        sorted(index)
    assert (tmp_path / K.COMPACT_INDEX).is_file()

    def no_parse(path):
        raise AssertionError("parsed again although index.jsonl is unchanged")

    monkeypatch.setattr(K, "parse_index", no_parse)
    assert K.read_index(tmp_path) == index  # from index.npz
    monkeypatch.undo()
    with open(tmp_path / K.INDEX, "a") as fh:  # the torn line ended (as preprocess does) and a volume added
        fh.write('\n["vol/x.nii.gz", 1.5, 0.75, 0.75, -170.5, -200.0, 12.0]\n')
    again = K.read_index(tmp_path)
    assert len(again) == 4 and again.get("vol/x.nii.gz") == (1.5, 0.75, 0.75, -170.5, -200.0, 12.0)
    assert again.get("files/p10/s1/b.jpg") == (3056, 2544) and again != index


def test_a_read_only_cache_and_a_damaged_compact_file(tmp_path):
    write_index(tmp_path, [["a.png", 10, 20]])
    (tmp_path / K.COMPACT_INDEX).write_bytes(b"PK\x03\x04 cut short")
    assert K.read_index(tmp_path).get("a.png") == (10, 20)  # rebuilt from the JSON lines, and rewritten
    assert K.CompactIndex.load(tmp_path / K.COMPACT_INDEX, _stamp(tmp_path)) is not None
    (tmp_path / K.COMPACT_INDEX).unlink()
    os.chmod(tmp_path, 0o555)
    try:
        assert K.read_index(tmp_path).get("a.png") == (10, 20)  # nothing written, still answered
    finally:
        os.chmod(tmp_path, 0o755)
    assert len(K.read_index(tmp_path / "absent")) == 0


def _stamp(folder):
    st = (folder / K.INDEX).stat()
    return st.st_size, st.st_mtime_ns


def _scale(tmp_path, n: int, volumes: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    if volumes:  # CT-RATE: train_<id>_<scan>_<reconstruction>.nii.gz, spacing and origin
        rows = [[f"dataset/train/train_{i // 6}/train_{i // 6}_{'ab'[i % 2]}/train_{i // 6}_{'ab'[i % 2]}_{i % 3 + 1}.nii.gz",
                 3.0, 1.0, 1.0, *np.round(rng.normal(0, 200, 3), 3).tolist()] for i in range(n)]
    else:  # MIMIC-CXR-JPG: files/p1x/p1xxxxxxx/sxxxxxxxx/<dicom id>.jpg, original height and width
        rows = [[f"files/p1{i % 10}/p1{i % 10}{i:06d}/s5{i:07d}/{i:08x}-{i * 7919 % 99991:05d}a1b2c3d4-e5f6.jpg",
                 int(2000 + i % 1000), int(2500 + i % 700)] for i in range(n)]
    write_index(tmp_path, rows)
    t0 = time.perf_counter()
    built = K.read_index(tmp_path)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = K.read_index(tmp_path)
    reload = time.perf_counter() - t0
    held = sum(a.nbytes for a in (loaded.hi, loaded.lo, loaded.meta, loaded.ints, loaded.widths))
    t0 = time.perf_counter()
    for row in rows[:: max(1, n // 2000)]:
        assert loaded.get(row[0]) == tuple(row[1:])
    lookup = (time.perf_counter() - t0) / len(rows[:: max(1, n // 2000)])
    assert len(built) == n and loaded == built
    return {"first": first, "reload": reload, "held_mb": held / 2**20, "lookup_us": lookup * 1e6,
            "jsonl_mb": (tmp_path / K.INDEX).stat().st_size / 2**20}


@pytest.mark.slow  # ~15 s: the two indexes at full size
@pytest.mark.parametrize("n, volumes", [(377_110, False), (50_188, True)], ids=["mimic_cxr", "ct_rate"])
def test_full_size_indexes_load_in_seconds(tmp_path, n, volumes):
    """MIMIC-CXR-JPG (377,110 images) and CT-RATE (50,188 reconstructions): the first read (parse and build)
    and every later one (``index.npz``) take under a few seconds, and the index holds a few MB."""
    fig = _scale(tmp_path, n, volumes)
    print(f"{n} entries: first read {fig['first']:.2f} s (index.jsonl {fig['jsonl_mb']:.0f} MB), "
          f"reload {fig['reload'] * 1000:.0f} ms, held {fig['held_mb']:.1f} MB, lookup {fig['lookup_us']:.1f} us")
    assert fig["first"] < 10.0 and fig["reload"] < 1.0 and fig["held_mb"] < 20  # 2.0 s and 8 ms measured alone
