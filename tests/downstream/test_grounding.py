"""Zero-shot grounding (G2D §7.5): recall / IoU / Dice of min-max scaled similarity maps, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medvlp.downstream.grounding import grounding_scores
from medvlp.methods.base import VLPMethod


def test_scores_by_hand():
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 3.0  # scaled to 1 there, 0 elsewhere: a 4-pixel prediction
    maps[1] = torch.arange(16.0).reshape(4, 4)  # >= 0.5 after scaling: values 7.5 .. 15 -> the last 8 pixels
    truth = torch.zeros(2, 4, 4)
    truth[0, :2, :3] = 1  # 6 pixels, 4 of them predicted
    truth[1, 0, 0] = 1  # not predicted
    s = grounding_scores(maps, truth)
    assert math.isclose(float(s["recall"][0]), 4 / 6, rel_tol=1e-6) and math.isclose(float(s["iou"][0]), 4 / 6, rel_tol=1e-6)
    assert math.isclose(float(s["dice"][0]), 2 * 4 / (4 + 6), rel_tol=1e-6)
    assert float(s["recall"][1]) == float(s["iou"][1]) == float(s["dice"][1]) == 0.0
    flat = grounding_scores(torch.ones(1, 2, 2), torch.ones(1, 2, 2))  # a constant map locates nothing
    assert float(flat["dice"][0]) == float(flat["recall"][0]) == 0.0


def test_methods_without_dense_embeddings_say_so():
    assert not VLPMethod.supports("dense_embeddings")
    from medvlp.methods.g2d import G2D

    assert G2D.supports("dense_embeddings")
    with pytest.raises(ValueError, match="Unknown capability"):
        VLPMethod.supports("grounding")


def test_g2d_grounds_the_demo_siim_finding(runs, capsys):
    from medvlp.cli import main

    rc = main(["evaluate", "--task", "grounding", "--protocol", "g2d", "--data", "demo_siim", "--run", str(runs["g2d"])])
    out = capsys.readouterr().out
    assert rc == 0 and "zero-shot grounding of 'pneumothorax' (Pneumothorax)" in out and "dice" in out
    from medvlp import api

    res = api.evaluate(runs["g2d"], tasks=("grounding",), data="demo_siim", protocol="g2d")["grounding"]
    assert res["n_positive"] > 5 and res["n_images"] > res["n_positive"]
    assert all(0.0 <= res[k] <= 1.0 for k in ("recall", "iou", "dice")) and res["iou"] <= res["dice"]
    with pytest.raises(ValueError, match="gives no dense embeddings"):
        api.evaluate(runs["clip"], tasks=("grounding",), data="demo_siim")
