"""``medvlp explain``: word-to-patch attention PNGs (MGCA) and pseudo-mask panels (G2D) from a trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medvlp import api
from medvlp import config as C
from medvlp.cli import main
from medvlp.datamodules.base import DataError
from medvlp.downstream.explain import heat_overlay, report_words


def _run(tmp_path, method):
    cfg = C.compose(method=method, data="demo_cxr", overrides=[
        f"run.out_dir={tmp_path}", "data.demo_size=tiny", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "data.batch_size=4", "trainer.limit_val_batches=1"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return api.fit(cfg)


def test_report_words_merge_pieces_and_stop_at_sep():
    class Tok:
        sep_token, pad_token = "[SEP]", "[PAD]"

        def convert_ids_to_tokens(self, ids):
            return ["[CLS]", "small", "pneumo", "##thorax", "[SEP]", "[PAD]", "extra"][: len(ids)]

    assert report_words(Tok(), torch.arange(7)) == ["small", "pneumothorax"]


def test_heat_overlay_is_rgb_and_hot_where_the_map_is_high():
    gray = np.full((8, 8), 0.5)
    heat = np.zeros((8, 8))
    heat[2, 3] = 1.0
    out = heat_overlay(gray, heat)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert out[2, 3, 0] > out[0, 0, 0] and out[0, 0, 2] > out[2, 3, 2]  # red at the peak, blue elsewhere


def test_explain_writes_one_png_per_word(tmp_path):
    run = _run(tmp_path / "runs", "mgca")
    out = tmp_path / "maps"
    assert main(["explain", "--run", str(run), "--out", str(out)]) == 0
    (folder,) = list(out.iterdir())
    info = json.loads((folder / "words.json").read_text())
    pngs = sorted(folder.glob("[0-9][0-9]_*.png"))
    assert pngs and len(pngs) == len(info["words"]) <= 8
    assert Image.open(pngs[0]).size == Image.open(folder / "image.png").size == (64, 64)
    assert all(w["word"] in info["text"] for w in info["words"])
    study = info["study"]
    assert main(["explain", "--run", str(run), "--out", str(out), "--study", study, "--words", info["words"][0]["word"]]) == 0
    from medvlp.downstream.explain import explain

    with pytest.raises(DataError, match="not in the test split"):
        explain(run, study="s00000000", out=out)
    with pytest.raises(ValueError, match="is a word"):
        explain(run, study=study, out=out, words=["zebra"])


def test_explain_needs_token_alignment(tmp_path, capsys):
    run = _run(tmp_path / "runs", "clip")
    assert main(["explain", "--run", str(run)]) == 2
    assert "token_alignment (e.g. mgca) or dense_outputs" in capsys.readouterr().err


def test_explain_g2d_writes_image_target_and_prediction_side_by_side(tmp_path, capsys):
    run = _run(tmp_path / "runs", "g2d")
    out = tmp_path / "maps"
    assert main(["explain", "--run", str(run), "--out", str(out)]) == 0
    assert "pseudo mask" in capsys.readouterr().out
    (folder,) = list(out.iterdir())
    dense = Image.open(folder / "dense.png")
    assert dense.size == (3 * 64 + 2 * 4, 64) and dense.mode == "RGB"
    target = np.asarray(Image.open(folder / "target.png"))
    assert target.shape == (64, 64) and 0 < (target >= 128).mean() < 0.3  # the top 15 % of the body, smoothed
    info = json.loads((folder / "dense.json").read_text())
    assert info["panels"] == ["image", "pseudo-mask target", "prediction"] and 0 <= info["dice_prediction_vs_target"] <= 1
    study = info["study"]
    assert main(["explain", "--run", str(run), "--out", str(tmp_path / "again"), "--study", study]) == 0
    assert (tmp_path / "again" / folder.name / "dense.png").is_file()
