"""Pre-training runs shared by the transfer tests: each method's learning run of the session (``tests/learning.py``)."""

from __future__ import annotations

import pytest
import torch

from medvlp import api
from medvlp import config as C


def fit_demo(out_dir, method: str = "clip", *overrides: str):
    """A 40-step run of ``method`` on the synthetic chest X-rays; returns its run directory."""
    cfg = C.compose(method=method, overrides=[f"run.out_dir={out_dir}", "trainer.max_steps=40", "trainer.enable_progress_bar=false",
                                              "trainer.limit_val_batches=1", *overrides])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return api.fit(cfg)


class Runs(dict):
    """``runs[method]``: the run directory of the method's shared learning run, made on first use."""

    def __init__(self, learned):
        super().__init__()
        self.learned = learned

    def __missing__(self, name):
        self[name] = self.learned[name].run_dir
        return self[name]


@pytest.fixture(scope="session")
def runs(learned):
    return Runs(learned)


class UntrainedMethod(torch.nn.Module):
    """A stand-in method with an untrained timm encoder: what the transfer tasks call (``export_encoder``)."""

    def __init__(self, **enc):
        super().__init__()
        from medvlp.config import TimmEncoderConfig
        from medvlp.registry import IMAGE_ENCODERS

        enc = {"in_chans": 1, **enc}
        self.image_encoder = IMAGE_ENCODERS.get("timm")(TimmEncoderConfig(pretrained=False, **enc))

    def export_encoder(self):
        from medvlp.methods.base import EncoderExport

        cfg = self.image_encoder.cfg
        return EncoderExport(self.image_encoder, "2d", int(cfg.in_chans), tuple(cfg.img_size))


@pytest.fixture
def untrained_method():
    """:class:`UntrainedMethod`, built as ``untrained_method(model="test_resnet")`` (one input channel unless
    ``in_chans`` is given)."""
    return UntrainedMethod


@pytest.fixture
def demo_fit():
    """:func:`fit_demo` for tests that need a run with other settings."""
    return fit_demo
