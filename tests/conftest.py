"""Test-wide settings: offline hub, a repository-local cache for the demo data, markers."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MEDVLP_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "medvlp"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_medvlp_logger():
    """``medvlp.cli.main`` gives the ``medvlp`` logger its own handler and stops propagation (right for
    the command line); undo it after each test so that later tests' ``caplog`` still sees records."""
    import logging

    logger = logging.getLogger("medvlp")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """The session's shared learning runs (``tests/learning.py``): ``learned["clip"]`` trains once."""
    from learning import LearnedRuns

    return LearnedRuns(tmp_path_factory)
