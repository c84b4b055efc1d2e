"""MGCA measurably learns the 2D synthetic world on CPU, every term decreases - and untrained it fails.

200 steps of ``medvlp fit --method mgca`` (about 50 s on 2 idle cores; the shared run of ``tests/learning.py``).
"""

from __future__ import annotations

import pandas as pd


def test_mgca_learns_2d_demo(learned):
    r = learned["mgca"]
    r.assert_learned()
    run_dir = r.run_dir

    metrics = pd.read_csv(run_dir / "metrics.csv")
    for term in ("ita", "cta", "cpa"):
        values = metrics[f"train/loss_{term}_step"].dropna().to_numpy()
        assert len(values) >= 20, term
        first, last = values[:3].mean(), values[-3:].mean()
        assert last < 0.9 * first, f"{term}: {first:.3f} -> {last:.3f}"
