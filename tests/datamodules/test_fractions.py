"""Label-fraction subsets: the MGCA draw, stratification, and one shared file for every method."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medvlp import api
from medvlp import config as C
from medvlp.cache import cache_dir
from medvlp.datamodules import fractions
from medvlp.datamodules.base import DataError, Record


def recs(n: int, k: int = 3, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.3).astype(np.float32)
    labels[rng.random((n, k)) < 0.1] = np.nan
    return [Record(f"s{i:05d}", f"/x/{i}.jpg", "", labels[i]) for i in range(n)]


def test_mgca_draw_equals_pandas_sample():
    records = recs(503)
    for frac in (0.01, 0.1, 0.5):
        ids = fractions.draw(records, frac, 42, "mgca")
        df = pd.DataFrame({"study": [r.study_id for r in records]})
        expected = sorted(df.sample(frac=frac, random_state=42)["study"])
        assert sorted(ids) == expected
        assert ids == sorted(ids)  # record order
    assert fractions.draw(records, 1.0, 42, "mgca") == [r.study_id for r in records]


def test_stratified_keeps_every_label_pattern():
    records = recs(400)
    ids = set(fractions.draw(records, 0.05, 42, "stratified"))
    patterns = {fractions._pattern(r.labels) for r in records}
    assert {fractions._pattern(r.labels) for r in records if r.study_id in ids} == patterns
    assert 0.04 * 400 <= len(ids) <= 0.05 * 400 + len(patterns)


def test_studies_with_several_images_stay_whole():
    records = [Record(f"s{i // 2}", f"/x/{i}.jpg", "", None) for i in range(40)]  # 2 images per study
    ids = fractions.draw(records, 0.25, 0, "mgca")
    assert len(ids) == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="label_fraction"):
        fractions.draw(recs(10), 0.0, 0, "mgca")
    with pytest.raises(ValueError, match="fraction_sampling='random'"):
        fractions.draw(recs(10), 0.5, 0, "random")


def _train_ids(config_file=None, method="clip", extra=()):
    cfg = C.compose(method=method, data="demo_cxr", config_file=config_file,
                    overrides=["data.demo_size=tiny", "data.label_fraction=0.5", *extra])
    api.resolve_data_root(cfg)
    return [r.study_id for r in api.build_datamodule(cfg).records("train")], cfg


def test_fraction_file_is_shared_across_runs_and_methods():
    ids_a, cfg = _train_ids()
    ids_b, _ = _train_ids(config_file=str(C.config_dir() / "experiment" / "clip_vit_demo.yaml"))
    ids_c, _ = _train_ids()
    assert ids_a == ids_b == ids_c and ids_a
    full, _ = _train_ids(extra=["data.label_fraction=1.0"])
    assert set(ids_a) < set(full)
    digest_dirs = list(cache_dir().glob("label_fractions/mimic_cxr-*"))
    files = [d / "50pct_seed42_mgca.txt" for d in digest_dirs if (d / "50pct_seed42_mgca.txt").is_file()]
    assert len(files) == 1
    text = files[0].read_text().splitlines()
    assert text[0].startswith("# medvlp-label-fraction v1 dataset=mimic_cxr fraction=0.5 seed=42 sampling=mgca")
    assert len(set(text[1:])) == len(set(ids_a))


def test_explicit_file_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "subset.txt"
    ids, _ = _train_ids(extra=[f"data.fraction_file={path}"])
    assert path.is_file()
    with pytest.raises(DataError, match="drawn with other settings"):
        _train_ids(extra=[f"data.fraction_file={path}", "data.fraction_seed=7"])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "s99999999"]) + "\n")
    with pytest.raises(DataError, match="not in the train split"):
        _train_ids(extra=[f"data.fraction_file={path}"])
