"""Shared by the learning tests: train on the synthetic world, and check that zero-shot AUROC and
retrieval pass after training and fail before it."""

from __future__ import annotations

from typing import Any

from medvlp import api
from medvlp import config as C


def demo_overrides(tmp_path: Any, steps: int) -> list[str]:
    """Command-line overrides of a learning run: ``steps`` optimiser steps into ``tmp_path``, quiet."""
    return [f"run.out_dir={tmp_path}", f"trainer.max_steps={steps}", "trainer.max_epochs=100",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=2"]


def learning_checks(res: dict[str, Any], auc_min: float) -> tuple[bool, bool, str]:
    """``(mean AUROC >= auc_min, image-to-text R@5 >= 2 x chance, message)``."""
    auc = res["zeroshot"]["mean_auroc"]
    r5 = res["retrieval"]["image_to_text"]["R@5"]
    chance = res["retrieval"]["chance_R@5_i2t"]
    return auc >= auc_min, r5 >= 2 * chance, f"mean AUROC {auc:.3f}, R@5 {r5:.3f} (chance {chance:.3f})"


def train_and_check(auc_min: float, **compose: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Compose, assert the untrained method fails the checks, fit, assert the trained run passes.

    Returns:
        ``(cfg, run_dir, untrained method, trained evaluation)``.
    """
    cfg = C.compose(**compose)
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    untrained = api.build_method(cfg)
    auc_ok, r5_ok, msg = learning_checks(api.evaluate_method(untrained, cfg), auc_min)
    assert not auc_ok and not r5_ok, f"untrained model already passes: {msg}"
    run_dir = api.fit(cfg)
    trained = api.evaluate(run_dir)
    auc_ok, r5_ok, msg = learning_checks(trained, auc_min)
    print(f"{cfg.method.name} after training: {msg}", trained["zeroshot"]["auroc"])
    assert auc_ok and r5_ok, msg
    return cfg, run_dir, untrained, trained
