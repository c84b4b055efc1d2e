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


WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... under pytest -n N; "" in one process
if WORKER:  # one thread per test process (and the processes it starts, which must compute as it does)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def shared_dir(tmp_path_factory) -> Path:
    """A folder every test process of the session sees (the parent of the per-process ones under -n)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if WORKER else base) / "shared"


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """The session's shared learning runs (``tests/learning.py``): ``learned["clip"]`` trains once, in
    whichever test process needs it first. Under ``pytest -n N`` each process first trains its share of
    the runs whose learning tests were collected, so that none waits for another's run."""
    from learning import LearnedRuns

    runs = LearnedRuns(shared_dir(tmp_path_factory))
    if WORKER and _LEARNING:
        index, count = int(WORKER[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        for key in _LEARNING[index::count]:
            runs[key]  # noqa: B018 - trains (or loads) it now
    return runs


@pytest.fixture(scope="session", autouse=True)
def _prefetch_learning_runs(request):
    if WORKER and _LEARNING:
        request.getfixturevalue("learned")


# the learning runs, longest first, dealt to the test processes in turn: fvlm, mgca, clip | hlip, g2d, medblip
PREFETCH = ("fvlm", "hlip", "mgca", "g2d", "clip", "medblip")
_LEARNING: list[str] = []


def pytest_collection_finish(session):
    """The learning runs whose learning tests (``tests/methods/test_<key>_learns.py``) this session runs."""
    wanted = {Path(str(item.fspath)).name for item in session.items}
    _LEARNING[:] = [k for k in PREFETCH if f"test_{k}_learns.py" in wanted]
