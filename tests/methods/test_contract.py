"""The method contract: every registered method - and a method added as a plug-in - passes the same checks.

Parametrised over ``METHODS.names()`` (so a new file in ``medvlp/methods/`` is tested the moment it
exists) plus ``convirt``, the README's worked example, installed from the README's own code blocks as
a plug-in package (an entry point in ``medvlp.plugins`` and its configs folder):

* every loss term is declared in ``terms``, finite and scalar; the weighted sum is what the base logs;
* every trainable parameter receives a finite gradient, and frozen parameters stay bit-identical
  through an optimiser step;
* a CPU bf16-autocast step runs and gives finite losses and gradients;
* the losses of two gloo processes on halves of a batch (with gathering) average to the loss of one
  process on the whole batch;
* a fit on the demo data lowers the loss on a fixed batch; the run directory reloads (``load_run``)
  into a method with identical embeddings; zero-shot and retrieval run on it. The fit is the method's
  shared learning run (``tests/learning.py``, the one its learning test asserts on); a method without
  one (a new method, the plug-in) gets a 25-step fit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import medvlp.registry as R
from medvlp import api
from medvlp import config as C
from medvlp.methods.base import CAPABILITIES, VLPMethod
from medvlp.registry import METHODS

README = Path(__file__).resolve().parents[2] / "README.md"
PLUGIN = "convirt"
BUILT_IN = METHODS.names()
ALL = [*BUILT_IN, PLUGIN]
FIT_STEPS = 25
BATCH = 16  # the fixed batch: big enough that its loss measures learning, not noise


# --------------------------------------------------------------------------- the README's plug-in
def readme_blocks() -> dict[str, str]:
    """The README's code blocks whose first line is ``# <path>``: path -> text."""
    blocks = re.findall(r"```(?:python|yaml|toml)\n(.*?)```", README.read_text(), flags=re.S)
    out = {}
    for block in blocks:
        first = block.partition("\n")[0].strip()
        if first.startswith("# ") and ("/" in first or first.endswith(".toml")):
            out[first[2:]] = block
    return out


def write_plugin(root: Path) -> Path:
    """The README's method file, YAML and ``register`` hook as the package ``my_package`` under ``root``,
    with a dist-info folder declaring its entry point (what ``pip install`` would write)."""
    blocks = readme_blocks()
    for key in ("medvlp/methods/convirt.py", "configs/method/convirt.yaml", "my_package/__init__.py", "pyproject.toml"):
        assert key in blocks, f"README.md has no code block starting with '# {key}'"
    pkg = root / "my_package"
    (pkg / "configs" / "method").mkdir(parents=True)
    (pkg / "__init__.py").write_text(blocks["my_package/__init__.py"])
    (pkg / "convirt.py").write_text(blocks["medvlp/methods/convirt.py"])
    (pkg / "configs" / "method" / "convirt.yaml").write_text(blocks["configs/method/convirt.yaml"])
    entry = re.search(r'^(\w+)\s*=\s*"([\w.:]+)"', blocks["pyproject.toml"], flags=re.M)
    assert entry and '[project.entry-points."medvlp.plugins"]' in blocks["pyproject.toml"]
    info = root / "my_package-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{R.ENTRY_POINT_GROUP}]\n{entry.group(1)} = {entry.group(2)}\n")
    return root


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory):
    """The README's plug-in, importable and registered for this session (removed afterwards)."""
    root = write_plugin(tmp_path_factory.mktemp("plugin"))
    sys.path.insert(0, str(root))
    R._plugins_loaded = False  # look at the entry points again
    yield root
    sys.path.remove(str(root))
    METHODS._items.pop(PLUGIN, None)
    C._extra_dirs[:] = [d for d in C._extra_dirs if root not in d.parents]
    for name in [m for m in sys.modules if m == "my_package" or m.startswith("my_package.")]:
        del sys.modules[name]


# --------------------------------------------------------------------------- per-method set-up (shared)
def slice_batch(batch: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a batch dataclass (tensors and lists along dim 0, dicts of per-row lists; scalars kept)."""
    values = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, dict):
            values[f.name] = {k: x[lo:hi] if isinstance(x, list) and len(x) == len(batch) else x for k, x in v.items()}
            continue
        values[f.name] = v[lo:hi] if isinstance(v, torch.Tensor | list) and len(v) == len(batch) else v
    return type(batch)(**values)


class Setup:
    """A method's learning-run config (``tests/learning.py``; a plug-in: its own config), a fresh seeded
    method, a fixed batch of training items, and the shared learning run on request."""

    def __init__(self, name: str, learned: Any, overrides: tuple[str, ...] = ()) -> None:
        from learning import demo_overrides

        self.name, self.learned = name, learned
        learned.add(name, None, {"method": name}, FIT_STEPS)  # methods without a learning run: a short fit
        _, compose, _ = learned.specs[name]
        self.cfg = C.compose(**compose, overrides=[*demo_overrides("unused", 1), f"data.batch_size={BATCH}",
                                                   f"data.eval_batch_size={BATCH}", *overrides])
        api.resolve_data_root(self.cfg)
        C.resolve(self.cfg)
        self.method = self.fresh()
        dm = api.build_datamodule(self.cfg, tokenizer=self.method.tokenizer)
        self.batch = slice_batch(next(iter(dm.eval_dataloader("train"))), 0, BATCH)

    def fresh(self) -> VLPMethod:
        torch.manual_seed(0)
        return api.build_method(self.cfg)

    def total(self, method: VLPMethod, batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = method.losses(batch if batch is not None else self.batch)
        return sum(method.loss_weight(k) * v for k, v in terms.items()), terms

    def run(self) -> Any:
        """The method's learning run (trained once per session, shared with the learning tests)."""
        return self.learned[self.name]

    @torch.no_grad()
    def train_loss(self, method: VLPMethod) -> float:
        """The loss of the fixed batch as training computes it (train mode: batch-norm statistics of the
        batch; the same dropout masks for every method measured), on a copy: a forward pass in train mode
        moves the batch-norm running statistics."""
        method = copy.deepcopy(method).train()
        torch.manual_seed(0)
        return float(self.total(method)[0])


@pytest.fixture(scope="session")
def setups(learned):
    cache: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in cache:
            cache[name] = Setup(name, learned)
        return cache[name]

    return get


@pytest.fixture(params=ALL)
def setup(request, setups) -> Setup:
    if request.param == PLUGIN:
        request.getfixturevalue("plugin_path")
    return setups(request.param)


# --------------------------------------------------------------------------- the contract
def test_declares_the_interface(setup):
    cls = type(setup.method)
    assert issubclass(cls, VLPMethod) and cls.terms and all(re.fullmatch(r"[a-z][a-z0-9_]*", t) for t in cls.terms)
    assert dataclasses.is_dataclass(cls.Config) and cls.Config().name == setup.name
    tau = setup.method.temperature()
    assert math.isfinite(tau) and tau > 0, f"{setup.name}.temperature() = {tau}"
    assert all(isinstance(cls.supports(c), bool) for c in CAPABILITIES)
    enc = setup.method.export_encoder()
    assert enc.module is setup.method.image_encoder and enc.modality in ("2d", "3d") and enc.in_chans > 0


def test_a_loss_weight_for_a_term_the_method_lacks_is_an_error(setup):
    cfg = setup.cfg.copy()
    cfg.method.loss_weights = {**cfg.method.loss_weights, "no_such_term": 1.0}
    with pytest.raises(ValueError, match=r"method.loss_weights.no_such_term: .* its terms are"):
        api.build_method(cfg)


# Host reads (``.item()``, ``.tolist()``, ``bool(tensor)``, ...: each a device synchronisation on a GPU) one training
# step of each method may make, counted on the CPU with medvlp.bench.count_host_reads after the method's host-side
# hook (``on_before_batch_transfer``, which Lightning runs before moving the batch). One is transformers' BERT mask
# check (``padding_mask.all()``), once per text pass: MedBLIP makes two (the description and the QA string through
# its Q-Former). fVLM reads once more: which samples each anatomy uses (whole in the volume), their flags and the
# label map's range, in one packed transfer (its texts are tokenised on the host). Any other method: 1.
HOST_READ_BOUND = {"medblip": 2, "fvlm": 2}


def test_terms_are_declared_finite_scalars_and_host_reads_bounded(setup):
    from medvlp.bench import count_host_reads

    m = setup.fresh().train()
    total, terms = setup.total(m)
    assert terms and set(terms) <= set(m.terms), f"{sorted(terms)} not within {m.terms}"
    for k, v in terms.items():
        assert v.ndim == 0 and torch.isfinite(v), f"{setup.name} term {k} = {v}"
    assert torch.isfinite(total)
    batch = m.on_before_batch_transfer(copy.copy(setup.batch), 0)  # on the host, before the transfer (Lightning)
    with count_host_reads() as reads:  # a second step: lazy set-up is not counted
        total, _ = setup.total(m, batch)
        total.backward()
    bound = HOST_READ_BOUND.get(setup.name, 1)
    assert sum(reads.values()) <= bound, f"{setup.name}: {dict(reads)} host reads in one step (bound {bound})"


def test_every_trainable_parameter_gets_a_gradient_and_frozen_ones_stay(setup):
    m = setup.fresh().train()
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert trainable
    total, _ = setup.total(m)
    total.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{setup.name}: no (finite) gradient for {missing[:8]}"
    opt = torch.optim.AdamW(m.param_groups(), lr=1e-3)
    opt.step()
    params = dict(m.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen parameter changed"
    assert any(not torch.equal(params[n], v) for n, v in trainable.items()), "the optimiser step changed nothing"


def test_a_cpu_bf16_autocast_step_runs(setup):
    m = setup.fresh().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = setup.total(m)
    assert torch.isfinite(total), terms
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())




def global_batch(name: str) -> tuple[str, ...]:
    return tuple(f"method.{k}=true" for k in METHODS.get(name).global_batch_keys)


class _NoRuns:
    """The spawned processes build configs only (no learning run)."""

    def __init__(self) -> None:
        from learning import RUNS

        self.specs = dict(RUNS)

    def add(self, key: str, auc_min: Any, compose: dict[str, Any], steps: int) -> None:
        self.specs.setdefault(key, (auc_min, compose, steps))


@pytest.mark.gpu
def test_a_cuda_bf16_step_runs(setup):
    """Every method trains in bf16 mixed precision on a CUDA GPU (finite losses and gradients)."""
    m = setup.fresh().cuda().train()
    values = {f.name: getattr(setup.batch, f.name) for f in dataclasses.fields(setup.batch)}
    batch = type(setup.batch)(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in values.items()})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, terms = setup.total(m, batch)
    assert torch.isfinite(total), terms
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def _rank_losses(rank: int, world: int, init: str, names: list[str], plugin: str, states: str, out: Any) -> None:
    """One gloo process: each method rebuilt from the same weights, its losses on its half of the batch."""
    sys.path[:0] = [plugin, str(Path(__file__).resolve().parents[1])]  # the plug-in; tests/ (learning.py)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        for name in names:
            s = Setup(name, _NoRuns(), global_batch(name))
            s.method.load_state_dict(torch.load(Path(states) / f"{name}.pt", weights_only=True))
            s.method.eval()
            n = len(s.batch) // world
            with torch.no_grad():
                terms = s.method.losses(slice_batch(s.batch, rank * n, (rank + 1) * n))
            out[(name, rank)] = {k: float(v) for k, v in terms.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 17 s; tests/losses/test_distributed.py checks the gather itself in the default suite
@pytest.mark.distributed
def test_gathered_loss_of_two_processes_equals_one_process_on_the_whole_batch(plugin_path, tmp_path):
    """Each method's losses with its ``global_batch_keys`` on, in eval mode (batch norm on running
    statistics): the mean over two gloo ranks of the per-rank losses equals the one-process loss on
    the concatenated batch."""
    out = mp.Manager().dict()
    single = {}
    for name in ALL:
        s = Setup(name, _NoRuns(), global_batch(name))
        m = s.fresh().eval()
        with torch.no_grad():
            single[name] = {k: float(v) for k, v in m.losses(s.batch).items()}
        torch.save(m.state_dict(), tmp_path / f"{name}.pt")
    mp.spawn(_rank_losses, nprocs=2, join=True, args=(2, str(tmp_path / "init"), ALL, str(plugin_path), str(tmp_path), out))
    for name in ALL:
        for k, v in single[name].items():
            mean = (out[(name, 0)][k] + out[(name, 1)][k]) / 2
            assert abs(mean - v) <= 1e-4 * max(1.0, abs(v)), f"{name} term {k}: 2 processes {mean}, 1 process {v}"


def test_a_short_demo_fit_lowers_the_loss(setup):
    r = setup.run()
    before, after = setup.train_loss(r.untrained), setup.train_loss(r.trained)
    assert after < before, f"{setup.name}: loss on a fixed batch {before:.4f} -> {after:.4f}"


def test_save_load_run_gives_identical_embeddings(setup):
    r = setup.run()
    loaded, _ = api.load_run(r.run_dir)
    b = setup.batch
    with torch.no_grad():
        for m in (r.trained, loaded):
            m.eval()
        img = [m.embed_batch(b) for m in (r.trained, loaded)]
        txt = [m.embed_text(b.input_ids, b.attention_mask) for m in (r.trained, loaded)]
    assert torch.equal(img[0].nan_to_num(), img[1].nan_to_num()) and torch.equal(txt[0], txt[1])
    assert r.trained.temperature() == pytest.approx(loaded.temperature())


def test_zero_shot_and_retrieval_run(setup):
    ev = setup.run().after
    z, ret = ev["zeroshot"], ev["retrieval"]
    assert ev["n"] > 0 and z["auroc"] and 0 <= z["mean_auroc"] <= 1 and z["logit_scale"] > 0
    for direction in ("image_to_text", "text_to_image"):
        assert all(0 <= v <= 1 for v in ret[direction].values())


# --------------------------------------------------------------------------- the README recipe, end to end
@pytest.mark.slow  # 18 s; in the default suite the contract above installs, trains and evaluates the same plug-in in-process
def test_the_readme_method_trains_and_evaluates_from_the_command_line(tmp_path):
    """``medvlp fit --method convirt trainer.max_steps=30`` then ``medvlp zeroshot`` through the command line's
    ``main`` in a fresh process that finds the plug-in only through its entry point (one process for both:
    the imports are paid once)."""
    root = write_plugin(tmp_path / "plugin")
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    runs = tmp_path / "runs"
    script = (
        "import sys, pathlib\n"
        "from medvlp.cli import main\n"
        f"rc = main(['fit', '--method', '{PLUGIN}', 'trainer.max_steps=30', 'run.out_dir={runs}', 'trainer.enable_progress_bar=false'])\n"
        f"(run,) = pathlib.Path('{runs}').iterdir()\n"
        "sys.exit(rc or main(['zeroshot', '--run', str(run)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    assert "train/loss_i2t" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "zero-shot AUROC" in out.stdout and "mean" in out.stdout, out.stdout[-2000:]


def test_a_module_dropped_into_a_methods_package_is_found_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg" / "methods"
    pkg.mkdir(parents=True)
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.py").write_text('raise RuntimeError("imported")\n\n@register_method("mine", help="my method")\n'
                                 'class Mine:\n    """Doc."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = R.Registry("method", "fakepkg.methods", ("register_method",))
    assert reg.names() == ["mine"] and reg.describe("mine") == "my method"
    with pytest.raises(RuntimeError, match="imported"):  # imported on first use only
        reg.get("mine")
    with pytest.raises(R.RegistryError, match="looked for in the modules of the fakepkg.methods package"):
        reg.get("yours")
