"""``medvlp bench``: how fast a method's training step runs on this machine, and where the time goes.

One configuration (``--method`` / ``--config`` and ``key=value`` overrides, as ``medvlp fit``) is built once
per *setup* - how the step runs: eager or ``torch.compile`` d encoders, fp32 or bf16 autocast, the plain or the
fused AdamW - and every setup runs the method's real training step (``training_step`` -> backward ->
optimiser) on batches of its real datamodule. With several setups (``--compare``) the steps are
interleaved, one of each in turn, so that whatever else the machine does slows them alike, and the
report gives their ratio: absolute times on a shared machine mean little, ratios measured in one run do.

Reported per setup (``--json`` writes all of it):

* samples/s and ms/step: median, p10 and p90 over the timed steps after ``--warmup`` steps;
* the step split into data wait (the next batch, moved to the device), forward (the losses), backward and
  optimiser, each timed with a device synchronisation between parts (the split costs a little itself);
* peak memory: the device's (CUDA) and the process's resident set (host);
* model FLOPs per sample, counted once on the eager step with ``torch.utils.flop_counter.FlopCounterMode``
  (forward + backward), the achieved TFLOP/s and the MFU against the device's peak (:data:`PEAK_TFLOPS`,
  or ``--peak-tflops``; a CPU has no table entry);
* host reads per step (:func:`count_host_reads`): every ``.item()``, ``.tolist()``, ``bool(tensor)``, ...
  the method's step makes. On a GPU each is a device synchronisation that stalls the queue.

``--data-only`` times the training loader alone: items/s with images or volumes decoded from the raw
files and from the preprocessed cache (``medvlp preprocess``), per worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp import config as C

log = logging.getLogger(__name__)

# dense peak TFLOP/s per device (bf16 / fp16 tensor cores, tf32 tensor cores, plain fp32), from the vendors'
# data sheets; matched against torch.cuda.get_device_name() by substring, the longest name first
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "A40": {"bf16": 150.0, "tf32": 74.8, "fp32": 37.4},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100": {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7},  # no bf16: its fp16 tensor-core peak
    "RTX 4090": {"bf16": 165.0, "tf32": 82.6, "fp32": 82.6},
}

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")


@contextlib.contextmanager
def count_host_reads(where: Counter | None = None) -> Iterator[Counter]:
    """Count the calls that read a tensor's values on the host while the block runs.

    ``Tensor.item / tolist / numpy / nonzero``, ``bool()`` / ``float()`` / ``int()`` / ``operator.index`` of a
    tensor, and ``.cpu()`` of a tensor not already on the CPU: on a GPU each waits for the device. On a CPU
    they cost nothing, but they are the same calls, so a CPU test can bound what a GPU step will do.
    ``where`` (optional) collects ``"<call> <file>:<line>"`` of each, the caller's frame.
    """
    import torch

    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "cpu")}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if name != "cpu" or self.device.type != "cpu":
                counts[name] += 1
                if where is not None:
                    frame = traceback.extract_stack(limit=2)[0]
                    where[f"{name} {frame.filename}:{frame.lineno}"] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@dataclass(frozen=True)
class Setup:
    """How the step runs: ``compile`` both encoders, autocast ``bf16`` ("" = fp32), the fused AdamW."""

    name: str
    compile: bool = False
    autocast: str = ""
    fused: bool = False


EAGER = Setup("eager fp32")
FAST = Setup("compile + bf16 + fused", compile=True, autocast="bf16", fused=True)
FAST_FP32 = Setup("compile + fp32 + fused", compile=True, fused=True)


def bf16_native(device: Any) -> bool:
    """The device computes bf16 in hardware: a CUDA GPU (Ampere or newer), or a CPU with AVX512-BF16 / AMX
    (elsewhere torch emulates bf16 on the CPU, several times slower than fp32)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_setup(device: Any) -> Setup:
    """medvlp's switches for ``--compare``: compile, fused AdamW, and bf16 autocast where the device has it."""
    return FAST if bf16_native(device) else FAST_FP32
# --matrix: fp32 / bf16 autocast x eager / compiled, the fused AdamW in all four
MATRIX = [Setup("eager fp32", fused=True), Setup("eager bf16", autocast="bf16", fused=True),
          Setup("compile fp32", compile=True, fused=True), Setup("compile bf16", compile=True, autocast="bf16", fused=True)]


def setup_of(cfg: Any, compile_: bool | None = None, autocast: str | None = None, fused: bool | None = None) -> Setup:
    """The setup a run config asks for (``trainer.compile``, ``trainer.precision``, ``optim.fused``), the flags
    winning."""
    c = bool(cfg.trainer.compile) if compile_ is None else compile_
    a = ("bf16" if "bf16" in str(cfg.trainer.precision) else "") if autocast is None else autocast
    f = bool(fused) if fused is not None else bool(cfg.optim.get("fused") or False)
    name = " + ".join([p for p in ("compile" if c else "eager", a or "fp32", "fused" if f else "") if p])
    return Setup(name, c, a, f)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_peak_mib() -> float:
    """Peak resident set of this process, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if os.uname().sysname == "Darwin" else peak / 1024


@dataclass
class Runner:
    """One setup's method, optimiser and batches; :meth:`step` times one training step."""

    setup: Setup
    method: Any
    optimizer: Any
    batches: Iterator[Any]
    device: Any
    times: dict[str, list[float]] = field(default_factory=lambda: {"data": [], "forward": [], "backward": [],
                                                                    "optimizer": [], "step": []})
    host_reads: list[int] = field(default_factory=list)
    batch_size: int = 0
    step_index: int = 0

    def autocast(self) -> Any:
        import torch

        if not self.setup.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def next_batch(self) -> Any:
        """The next batch as Lightning hands it to the step: the method's host-side hook, then the transfer."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        batch = self.method.on_before_batch_transfer(next(self.batches), 0)
        return move_data_to_device(batch, self.device)

    def step(self, record: bool = True) -> None:
        d = self.device
        t0 = time.perf_counter()
        batch = self.next_batch()
        _sync(d)
        t1 = time.perf_counter()
        with count_host_reads() as reads:
            with self.autocast():
                loss = self.method.training_step(batch, self.step_index)
            _sync(d)
            t2 = time.perf_counter()
            if loss is not None:
                loss.backward()
            _sync(d)
            t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(d)
        t4 = time.perf_counter()
        self.step_index += 1
        if record:
            for key, value in zip(("data", "forward", "backward", "optimizer", "step"),
                                  (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                self.times[key].append(value)
            self.host_reads.append(sum(reads.values()))
            self.batch_size = len(batch)


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def build_runner(cfg: Any, setup: Setup, device: Any) -> Runner:
    """The method (seeded as ``medvlp fit`` seeds it), its optimiser groups and an endless training loader."""
    import lightning as L
    import torch

    from medvlp import api

    L.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    method = api.build_method(cfg).to(device)
    method.train()
    if setup.compile:
        method.image_encoder = torch.compile(method.image_encoder)
        method.text_encoder = torch.compile(method.text_encoder)
    o = cfg.optim
    kwargs: dict[str, Any] = {"lr": float(o.lr), "betas": tuple(o.betas), "eps": float(o.eps),
                              "weight_decay": float(o.weight_decay)}
    if setup.fused:
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(method.param_groups(), **kwargs)
    dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
    return Runner(setup, method, optimizer, _cycle(dm.train_dataloader()), device)


def _flops_by_dispatch(run: Any) -> int:
    """FLOPs of ``run()`` with the formulas of ``FlopCounterMode`` (its ``flop_registry``) but without its module
    tracker, which some steps trip over (a frozen module's inputs that require grad and have no grad_fn)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Flops(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Flops.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Flops():
        run()
    return int(Flops.total)


def count_flops(runner: Runner) -> int:
    """FLOPs of one training step (forward + backward) of an eager runner, on its next batch
    (``torch.utils.flop_counter.FlopCounterMode``; its formulas without the module tracker where that fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = runner.next_batch()

    def run() -> None:
        with runner.autocast():
            loss = runner.method.training_step(batch, runner.step_index)
        if loss is not None:
            loss.backward()

    try:
        with FlopCounterMode(display=False) as counter:
            run()
        total = int(counter.get_total_flops())
    except AssertionError:  # torch's module tracker: "Expected gradient function to be set"
        runner.optimizer.zero_grad(set_to_none=True)
        total = _flops_by_dispatch(run)
    runner.optimizer.zero_grad(set_to_none=True)
    return total


def device_peak(device: Any, setup: Setup, override: float | None = None) -> tuple[float | None, str]:
    """``(peak TFLOP/s, where it comes from)`` for the setup's precision on ``device``."""
    import torch

    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        # bf16 against the bf16 rate only where the CPU has bf16 units; elsewhere it is emulated, and the best
        # this CPU does is its fp32 rate
        native = bool(setup.autocast) and bf16_native(device)
        dtype, kind = (torch.bfloat16, "bf16") if native else (torch.float32, "fp32")
        return cpu_matmul_peak(dtype), f"this CPU's measured {kind} matmul rate (2048^3, best of 5)"
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if setup.autocast else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key][kind], f"{key} {kind} (dense)"
    return None, f"'{name}' is not in the peak table (give --peak-tflops)"


_CPU_PEAK: dict[Any, float] = {}


def cpu_matmul_peak(dtype: Any) -> float:
    """TFLOP/s of a 2048 x 2048 x 2048 matmul in ``dtype`` on this CPU with torch's threads (best of 5): the
    CPU has no data-sheet entry, so its MFU is against what its BLAS reaches on the friendliest shape."""
    import torch

    if dtype not in _CPU_PEAK:
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK[dtype] = 2 * 2048**3 / best / 1e12
    return _CPU_PEAK[dtype]


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

    return {"median": statistics.median(ordered), "p10": q(0.1), "p90": q(0.9)}


def report(runner: Runner, flops: int | None, peak: tuple[float | None, str]) -> dict[str, Any]:
    import torch

    step = _stats(runner.times["step"])
    out: dict[str, Any] = {
        "setup": runner.setup.name, "batch_size": runner.batch_size, "steps": len(runner.times["step"]),
        "samples_per_s": runner.batch_size / step["median"] if step["median"] > 0 else float("nan"),
        "ms_per_step": {k: 1e3 * v for k, v in step.items()},
        "breakdown_ms": {k: 1e3 * statistics.median(runner.times[k]) for k in ("data", "forward", "backward", "optimizer")},
        "host_reads_per_step": statistics.median(runner.host_reads) if runner.host_reads else 0,
        "peak_host_mib": _host_peak_mib(),
    }
    if runner.device.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(runner.device) / 2**20
    if flops:
        out["flops_per_sample"] = flops / max(1, runner.batch_size)
        out["tflops_per_s"] = flops / step["median"] / 1e12
        out["peak_tflops"], out["peak_source"] = peak
        out["mfu"] = out["tflops_per_s"] / peak[0] if peak[0] else None
    return out


def bench(cfg: Any, setups: list[Setup], steps: int = 10, warmup: int = 3, peak_tflops: float | None = None,
          device: str = "") -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of every setup, interleaved; the report per setup and,
    for two setups, ``ratio`` = the first's median step time / the second's."""
    import torch

    if steps < 1 or warmup < 0:
        raise C.ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}.")
    import warnings

    # the step runs outside a Trainer: the method's self.log calls have nowhere to go, by design here
    warnings.filterwarnings("ignore", message=r".*`self\.log\(\)`.*")
    dev = torch.device(device) if device else _default_device()
    runners = [build_runner(cfg, s, dev) for s in setups]
    eager = next((r for r in runners if not r.setup.compile), None)
    flops = count_flops(eager) if eager is not None else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup + steps):
        for r in runners:
            r.step(record=i >= warmup)
    reports = [report(r, flops, device_peak(dev, r.setup, peak_tflops)) for r in runners]
    out: dict[str, Any] = {"method": str(cfg.method.name), "data": str(cfg.data.name), "device": str(dev),
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "setups": reports}
    if len(reports) == 2:
        a, b = (r["ms_per_step"]["median"] for r in reports)
        out["ratio"] = a / b if b > 0 else float("nan")
    elif len(reports) > 2:  # speed of each setup relative to the first
        first = reports[0]["ms_per_step"]["median"]
        for r in reports:
            r["speedup"] = first / r["ms_per_step"]["median"] if r["ms_per_step"]["median"] > 0 else float("nan")
    return out


def bench_data(cfg: Any, batches: int = 10, workers: int | None = None) -> dict[str, Any]:
    """Items per second of the training loader alone, from the raw files and from the preprocessed cache
    (built first when missing), per worker."""
    from medvlp import api
    from medvlp.preprocess import preprocess

    if workers is not None:
        cfg.data.num_workers = int(workers)
    n_workers = max(1, int(cfg.data.num_workers))
    out: dict[str, Any] = {"method": str(cfg.method.name), "data": str(cfg.data.name), "workers": int(cfg.data.num_workers)}
    method = None
    for mode in ("false", "true"):
        if mode == "true":
            preprocess(cfg.data, splits=("train",), workers=int(cfg.data.num_workers), progress=False)
        cfg.data.use_preprocessed = mode
        if method is None:
            method = api.build_method(cfg)
        dm = api.build_datamodule(cfg, tokenizer=method.tokenizer)
        it = iter(_cycle(dm.train_dataloader()))
        next(it)  # worker start-up and first reads are not timed
        start, items = time.perf_counter(), 0
        for _ in range(batches):
            items += len(next(it))
        rate = items / (time.perf_counter() - start)
        out["raw" if mode == "false" else "cached"] = {"items_per_s": rate, "items_per_s_per_worker": rate / n_workers}
    out["ratio"] = out["cached"]["items_per_s"] / out["raw"]["items_per_s"]
    return out


def summary(res: dict[str, Any]) -> str:
    """The human report: one line per setup (and the ratio)."""
    if "raw" in res:
        return (f"{res['method']} / {res['data']} loader ({res['workers']} workers): raw {res['raw']['items_per_s']:.1f} "
                f"items/s, cached {res['cached']['items_per_s']:.1f} items/s ({res['ratio']:.2f}x)")
    lines = []
    for r in res["setups"]:
        b = r["breakdown_ms"]
        ms = r["ms_per_step"]
        line = (f"{res['method']} [{r['setup']}] batch {r['batch_size']}: {r['samples_per_s']:.2f} samples/s, "
                f"{ms['median']:.1f} ms/step (p10 {ms['p10']:.1f}, p90 {ms['p90']:.1f}); data {b['data']:.1f} / forward "
                f"{b['forward']:.1f} / backward {b['backward']:.1f} / optimiser {b['optimizer']:.1f} ms; "
                f"host reads {r['host_reads_per_step']:g}/step; peak host {r['peak_host_mib']:.0f} MiB")
        if "peak_device_mib" in r:
            line += f", device {r['peak_device_mib']:.0f} MiB"
        if "speedup" in r:
            line += f"; {r['speedup']:.2f}x the first"
        if "flops_per_sample" in r:
            line += f"; {r['flops_per_sample'] / 1e9:.3g} GFLOP/sample, {r['tflops_per_s']:.3g} TFLOP/s"
            line += f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") else f", MFU n/a ({r['peak_source']})"
        lines.append(line)
    if "ratio" in res:
        lines.append(f"ratio [{res['setups'][0]['setup']}] / [{res['setups'][1]['setup']}] step time: {res['ratio']:.2f}x")
    return "\n".join(lines)


MARKDOWN_HEADER = ("| method | device | setup | batch | samples/s | ms/step (p10-p90) | vs first | peak device MiB | "
                   "GFLOP/sample | TFLOP/s | MFU | host reads/step |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")


def markdown_rows(res: dict[str, Any]) -> str:
    """One Markdown table row per setup (:data:`MARKDOWN_HEADER`'s columns)."""
    rows = []
    for r in res["setups"]:
        ms = r["ms_per_step"]
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
        gflop = f"{r['flops_per_sample'] / 1e9:.3g}" if "flops_per_sample" in r else "-"
        tflops = f"{r['tflops_per_s']:.3g}" if "tflops_per_s" in r else "-"
        device_mib = f"{r['peak_device_mib']:.0f}" if "peak_device_mib" in r else "-"  # a CPU: see the host figure
        rows.append(f"| {res['method']} | {res['device']} | {r['setup']} | {r['batch_size']} | {r['samples_per_s']:.1f} | "
                    f"{ms['median']:.1f} ({ms['p10']:.1f}-{ms['p90']:.1f}) | {r.get('speedup', 1.0):.2f}x | "
                    f"{device_mib} | {gflop} | {tflops} | {mfu} | {r['host_reads_per_step']:g} |")
    return "\n".join(rows) + "\n"


def cmd_bench(args: Any) -> None:
    from medvlp import api

    cfg = C.compose(method=args.method, data=args.data, config_file=args.config, overrides=list(args.overrides))
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    if args.batch_size:
        cfg.data.batch_size = int(args.batch_size)
    if args.data_only:
        res = bench_data(cfg, batches=args.steps, workers=args.workers)
    else:
        if args.workers is not None:
            cfg.data.num_workers = int(args.workers)
        setups = ([EAGER, fast_setup(_default_device())] if args.compare else MATRIX if args.matrix
                  else [setup_of(cfg, args.compile, args.autocast, args.fused)])
        res = bench(cfg, setups, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops)
    print(summary(res))
    if args.markdown and "setups" in res:  # appended: one table over several invocations (make bench-gpu)
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(("" if path.stat().st_size else MARKDOWN_HEADER) + markdown_rows(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))


def add_arguments(p: Any) -> None:
    p.add_argument("--method", help="a configs/method name (default: the config file's, else clip)")
    p.add_argument("--data", help="a configs/data name (default: the method's demo data)")
    p.add_argument("--config", help="an experiment or saved config file")
    p.add_argument("--steps", type=int, default=10, help="timed steps (loader batches with --data-only; default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches; default 3)")
    p.add_argument("--batch-size", type=int, help="data.batch_size")
    p.add_argument("--workers", type=int, help="data.num_workers")
    p.add_argument("--compare", action="store_true", help="eager fp32 against compile + fused AdamW + bf16 autocast "
                                                          "(where the device computes bf16 natively), interleaved in one "
                                                          "process; prints the ratio")
    p.add_argument("--matrix", action="store_true", help="fp32 / bf16 autocast x eager / compiled (fused AdamW), interleaved")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile both encoders")
    p.add_argument("--autocast", choices=["", "bf16"], default=None, help="bf16 autocast (default: trainer.precision)")
    p.add_argument("--fused", action="store_true", default=None, help="the fused AdamW")
    p.add_argument("--data-only", action="store_true", help="the training loader alone: raw files vs the preprocessed cache")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for the MFU (default: the GPU table)")
    p.add_argument("--json", help="write the whole report to this file")
    p.add_argument("--markdown", help="append one table row per setup to this Markdown file (the header when it is new)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")


__all__ = ["EAGER", "FAST", "MATRIX", "PEAK_TFLOPS", "Setup", "bench", "bench_data", "count_host_reads", "device_peak", "summary"]
