"""CLIP measurably learns the synthetic world (2D and 3D) - and the same checks fail untrained.

These train for 300 steps (2D about 2 minutes, 3D about 6 minutes on 2 cores), so they are
``slow``: run them with ``make test-slow``.
"""

import pytest

from medvlp import api
from medvlp import config as C


def _checks(res, auc_min):
    auc = res["zeroshot"]["mean_auroc"]
    r5 = res["retrieval"]["image_to_text"]["R@5"]
    chance = res["retrieval"]["chance_R@5_i2t"]
    return auc >= auc_min, r5 >= 2 * chance, f"mean AUROC {auc:.3f}, R@5 {r5:.3f} (chance {chance:.3f})"


def _train_and_check(tmp_path, auc_min, **compose):
    cfg = C.compose(**compose)
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    untrained = api.evaluate_method(api.build_method(cfg), cfg)
    auc_ok, r5_ok, msg = _checks(untrained, auc_min)
    assert not auc_ok and not r5_ok, f"untrained model already passes: {msg}"
    run_dir = api.fit(cfg)
    trained = api.evaluate(run_dir)
    auc_ok, r5_ok, msg = _checks(trained, auc_min)
    print(msg, trained["zeroshot"]["auroc"])
    assert auc_ok and r5_ok, msg
    return trained


@pytest.mark.slow
def test_clip_learns_2d_demo(tmp_path):
    _train_and_check(tmp_path, 0.75, method="clip", data="demo_cxr",
                     overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=300", "trainer.max_epochs=100", "trainer.enable_progress_bar=false",
                                "trainer.limit_val_batches=2"])


@pytest.mark.slow
def test_clip_learns_3d_demo(tmp_path):
    _train_and_check(tmp_path, 0.70, config_file=str(C.config_dir() / "experiment" / "clip_demo_ct.yaml"),
                     overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=300", "trainer.max_epochs=100", "trainer.enable_progress_bar=false",
                                "trainer.limit_val_batches=2"])


@pytest.mark.gpu
def test_fit_bf16_on_cuda(tmp_path):
    cfg = C.compose(method="clip", trainer="gpu", overrides=[f"run.out_dir={tmp_path}", "trainer.max_steps=20",
                                                            "trainer.devices=1", "trainer.enable_progress_bar=false"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    run_dir = api.fit(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
