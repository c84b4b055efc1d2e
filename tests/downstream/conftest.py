"""Short pre-training runs shared by the transfer tests of this folder (one per method and session)."""

from __future__ import annotations

import pytest

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
    """``runs[method]``: the 40-step run of a method, made on first use."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, name):
        self[name] = fit_demo(self.factory.mktemp(name), name)
        return self[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


@pytest.fixture
def demo_fit():
    """:func:`fit_demo` for tests that need a run with other settings."""
    return fit_demo
