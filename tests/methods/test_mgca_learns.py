"""MGCA measurably learns the 2D synthetic world on CPU, every term decreases - and untrained it fails.

300 steps of ``medvlp fit --method mgca`` (about 75 s on 2 idle cores).
"""

from __future__ import annotations

import pandas as pd

from medvlp import api
from medvlp import config as C


def test_mgca_learns_2d_demo(tmp_path):
    cfg = C.compose(method="mgca", data="demo_cxr",
                    overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=300", "trainer.max_epochs=100",
                               "trainer.enable_progress_bar=false", "trainer.limit_val_batches=2"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)

    def checks(res):
        auc, r5 = res["zeroshot"]["mean_auroc"], res["retrieval"]["image_to_text"]["R@5"]
        chance = res["retrieval"]["chance_R@5_i2t"]
        return auc >= 0.75, r5 >= 2 * chance, f"mean AUROC {auc:.3f}, R@5 {r5:.3f} (chance {chance:.3f})"

    auc_ok, r5_ok, msg = checks(api.evaluate_method(api.build_method(cfg), cfg))
    assert not auc_ok and not r5_ok, f"untrained model already passes: {msg}"
    run_dir = api.fit(cfg)
    auc_ok, r5_ok, msg = checks(api.evaluate(run_dir))
    assert auc_ok and r5_ok, msg

    metrics = pd.read_csv(run_dir / "metrics.csv")
    for term in ("ita", "cta", "cpa"):
        values = metrics[f"train/loss_{term}_step"].dropna().to_numpy()
        assert len(values) >= 20, term
        first, last = values[:3].mean(), values[-3:].mean()
        assert last < 0.9 * first, f"{term}: {first:.3f} -> {last:.3f}"
