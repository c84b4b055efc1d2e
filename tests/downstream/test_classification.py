"""Classification transfer (``medvlp downstream --task classification``): metrics by hand, the loss rules,
and linear / fine-tune runs of every registered 2D method on the demo worlds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp import api
from medvlp import config as C
from medvlp.cli import main
from medvlp.downstream.classification import classification_loss, scores_and_metrics, settings_for
from medvlp.downstream.metrics import accuracy, roc_curve
from medvlp.registry import RegistryError

METHODS_2D = ("clip", "mgca", "g2d")


def test_accuracy_and_roc_curve_by_hand():
    assert accuracy(np.array([0, 2, 1, 1]), np.array([0, 1, 1, 1])) == 0.75
    fpr, tpr = roc_curve(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, np.nan]))
    assert fpr.tolist() == [0.0, 0.0, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0]  # the tie moves both rates
    fpr, tpr = roc_curve(np.array([0.3, 0.2]), np.array([1.0, 1.0]))  # one class: the diagonal
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]


def test_metrics_for_labels_and_exclusive_classes():
    logits = np.array([[2.0, -1.0, 0.1], [0.0, 3.0, 1.3], [1.0, 0.5, 2.0], [-1.0, 2.2, 0.4]])
    onehot = np.eye(3)[[0, 1, 2, 2]]
    m = scores_and_metrics(logits, onehot, ["a", "b", "c"], multiclass=True)
    assert m["accuracy"] == 0.75 and m["auroc"]["a"] == 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    c_pos, c_neg = probs[2:, 2], probs[:2, 2]
    assert math.isclose(m["auroc"]["c"], float(np.mean([(p > q) + 0.5 * (p == q) for p in c_pos for q in c_neg])))
    multi = scores_and_metrics(np.array([[1.0], [-1.0], [0.5]]), np.array([[1.0], [0.0], [np.nan]]), ["x"], False)
    assert multi["auroc"]["x"] == 1.0 and "accuracy" not in multi


def test_loss_ignores_unknown_labels_and_uses_softmax_for_classes():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expect = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 0.5, 0.5]), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isclose(classification_loss(logits, labels, False), expect)
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.isclose(classification_loss(logits, onehot, True), torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
    assert settings_for("linear").lr == 5e-4 and settings_for("finetune").lr == 1e-4 and settings_for("linear").batch_size == 48
    with pytest.raises(ValueError, match="Unknown classifier setting"):
        settings_for("linear", momentum=0.9)


def test_a_head_trained_on_standardized_features_is_folded_back_exactly():
    from medvlp.downstream.classification import fold_standardization

    torch.manual_seed(0)
    x = torch.randn(6, 4) * 3 + 1
    mean, std = x.mean(0), x.std(0)
    head = torch.nn.Linear(4, 2)
    expected = head((x - mean) / std)
    fold_standardization(head, mean, std)
    assert torch.allclose(head(x), expected, atol=1e-5)


# CLIP in the default suite; MGCA and G2D (about 20 s each) with the slow tests
@pytest.mark.parametrize("method", [m if m == "clip" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS_2D])
def test_linear_probe_at_ten_percent_nearly_matches_lbfgs(runs, method, tmp_path):
    """The default probe on 10 % of demo CheXpert (48 images, 1 step per epoch: patience counts after 1000 steps;
    z-scored features) reaches at least 90 % of the AUROC of CLIP's L-BFGS logistic regression on the same
    frozen features."""
    lin = api.downstream("classification", "demo_chexpert", runs[method], fraction=0.1, out=tmp_path / "lin")
    ref = api.downstream("classification", "demo_chexpert", runs[method], fraction=0.1, probe="lbfgs", out=tmp_path / "ref")
    assert lin["protocol"] == "linear" and lin["n_train"] == ref["n_train"] < 60 and set(lin["auroc"]) == set(lin["labels"])
    assert lin["history"]["steps"] >= 1000 and lin["settings"]["min_steps"] == 1000 and lin["settings"]["standardize"]
    assert ref["history"]["solver"] == "lbfgs" and 1e-6 <= ref["history"]["C"] <= 1e6
    assert lin["mean_auroc"] >= 0.9 * ref["mean_auroc"], (lin["auroc"], ref["auroc"])
    assert ref["mean_auroc"] > 0.8, ref["auroc"]
    assert json.loads((tmp_path / "lin" / "result.json").read_text())["mean_auroc"] == lin["mean_auroc"]
    assert lin["dropped"] == {"count": 0, "by_split": {}, "file": None}  # no study left out of the demo set
    assert (tmp_path / "lin" / "roc.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="probe=lbfgs fits a logistic regression on frozen features"):
        settings_for("finetune", probe="lbfgs")


@pytest.mark.slow  # 17 s; the linear probe above trains the same task module in the default suite
@pytest.mark.parametrize("method", METHODS_2D)
def test_finetuning_beats_chance_for_every_2d_method(runs, method, tmp_path):
    ft = api.downstream("classification", "demo_rsna", runs[method], protocol="finetune", out=tmp_path / "ft",
                        max_steps=30, max_epochs=5)
    assert ft["history"]["steps"] <= 30 and ft["labels"] == ["Pneumonia"]
    assert ft["mean_auroc"] > 0.6, ft["auroc"]


@pytest.mark.slow  # 11 s; the softmax loss and the class metrics are checked in the default suite
def test_exclusive_classes_fractions_and_the_cli(runs, tmp_path, capsys):
    """COVIDx (softmax over its classes, accuracy) through the CLI; a label fraction trains on fewer images."""
    rc = main(["downstream", "--data", "demo_covidx", "--run", str(runs["clip"]), "--out", str(tmp_path / "cov")])
    assert rc == 0
    res = json.loads((tmp_path / "cov" / "result.json").read_text())
    assert res["multiclass"] and len(res["labels"]) >= 3 and res["accuracy"] > 1.5 / len(res["labels"])
    assert "accuracy" in capsys.readouterr().out
    few = api.downstream("classification", "demo_chexpert", runs["clip"], fraction=0.1, out=tmp_path / "few", max_epochs=3)
    assert few["n_train"] < 100 and few["fraction"] == 0.1
    with pytest.raises(RegistryError, match="Unknown downstream task 'captioning'.*Available: classification, detection"):
        api.downstream("captioning", "demo_rsna", runs["clip"])
    with pytest.raises(C.ConfigError, match="zeroshot evaluates a run as it is"):
        api.downstream("zeroshot", "demo_rsna", runs["clip"])
    with pytest.raises(C.ConfigError, match="classification takes no setting.*pyramid_channels"):
        api.downstream("classification", "demo_chexpert", runs["clip"], pyramid_channels=8)


@pytest.mark.distributed
@pytest.mark.slow  # 17 s: two processes
def test_ddp_transfer_on_two_processes_writes_one_result(runs, tmp_path):
    """``medvlp downstream ... trainer.devices=2 trainer.accelerator=cpu trainer.strategy=ddp``: Lightning
    starts a second process (gloo); both train, rank 0 alone tests, prints and writes the result."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "medvlp.cli", "downstream", "--task", "classification", "--data",
                           "demo_chexpert", "--run", str(runs["clip"]), "--max-epochs", "3", "--out", str(out),
                           "trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp",
                           "trainer.enable_progress_bar=false"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("result.json")) == [Path("ddp/result.json")]
    res = json.loads((out / "result.json").read_text())
    assert res["history"]["epochs"] == 3 and len(res["history"]["val_loss"]) == 3 and res["n_train"] == 486  # train.csv less its validation patients
    assert 0.0 <= res["mean_auroc"] <= 1.0 and proc.stdout.count("wrote ") == 1
    assert "distributed_backend=gloo" in proc.stderr or "world_size: 2" in proc.stderr.lower() or "2 processes" in proc.stderr
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "metrics.csv").is_file()


def test_linear_probe_on_augmented_images_keeps_the_encoder_frozen(runs, tmp_path, monkeypatch):
    """augment=true (MGCA's code): the head trains on random crops of the letterbox through the frozen encoder,
    whose weights and batch-norm statistics are untouched; standardisation is off (no fixed features)."""
    import medvlp.downstream.classification as cls

    seen: dict = {}
    train_finetune = cls.train_finetune

    def spy(model, dm, *args, **kwargs):
        seen["before"] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
        seen["crop"] = dm.transform.crop_from
        out = train_finetune(model, dm, *args, **kwargs)
        seen["after"] = model.encoder.state_dict()
        return out

    monkeypatch.setattr(cls, "train_finetune", spy)
    size = int(api.load_config(runs["clip"]).data.image_size)
    res = api.downstream("classification", "demo_chexpert", runs["clip"], augment=True, max_steps=6, out=tmp_path / "aug",
                         overrides=[f"data.crop_from={size + 8}"])
    assert res["settings"]["augment"] and not res["settings"]["standardize"] and res["history"]["steps"] == 6
    assert seen["crop"] == size + 8 and set(seen["before"]) == set(seen["after"])
    assert any("running_mean" in k for k in seen["before"])  # a CNN: its batch norms stayed in eval mode
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])
    assert 0.0 <= res["mean_auroc"] <= 1.0
    with pytest.raises(ValueError, match="augment=true trains the linear head"):
        settings_for("linear", augment=True, probe="lbfgs")
    with pytest.raises(ValueError, match="augment=true trains the linear head"):
        settings_for("finetune", augment=True)
    with pytest.raises(ValueError, match="augment=true trains the linear head"):
        settings_for("linear", augment=True, standardize=True)
