"""``medvlp bench``: the report's parts on the CPU demo (samples/s, step split, FLOPs, host reads), interleaved
setups and their ratio, the GPU peak table, the loader alone (raw files vs the preprocessed cache), and the
host-read counter itself."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medvlp import api
from medvlp import config as C
from medvlp.bench import EAGER, Setup, bench, count_host_reads, device_peak
from medvlp.cli import main


def demo_cfg(*overrides, **compose):
    cfg = C.compose(**(compose or {"method": "clip"}), overrides=["data.batch_size=4", *overrides])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    return cfg


def test_host_reads_are_counted_and_the_tensor_class_restored():
    x = torch.arange(4.0)
    item = torch.Tensor.item
    where: dict = {}
    from collections import Counter

    where = Counter()
    with count_host_reads(where) as n:
        x.sum().item()
        bool(x[0] > 1)
        x.tolist()
        float(x[1])
        x.nonzero()
        x.cpu()  # already on the CPU: no read
        x * 2
    assert dict(n) == {"item": 1, "__bool__": 1, "tolist": 1, "__float__": 1, "nonzero": 1}
    assert all("test_bench.py" in k for k in where)
    assert torch.Tensor.item is item


def test_bench_reports_the_step_on_the_demo():
    res = bench(demo_cfg(), [EAGER], steps=2, warmup=1)
    r = res["setups"][0]
    assert res["method"] == "clip" and res["device"] == "cpu" and r["steps"] == 2 and r["batch_size"] == 4
    assert r["samples_per_s"] > 0 and r["ms_per_step"]["p10"] <= r["ms_per_step"]["median"] <= r["ms_per_step"]["p90"]
    parts = sum(r["breakdown_ms"].values())
    assert 0.8 * r["ms_per_step"]["median"] <= parts <= 1.2 * r["ms_per_step"]["median"] + 1
    assert r["flops_per_sample"] > 1e6 and r["tflops_per_s"] > 0
    # a CPU has no table entry: the MFU is against its measured matmul rate
    assert "measured fp32 matmul" in r["peak_source"] and 0 < r["mfu"] == pytest.approx(r["tflops_per_s"] / r["peak_tflops"])
    assert r["host_reads_per_step"] <= 2 and r["peak_host_mib"] > 100


def test_two_setups_run_interleaved_with_their_ratio(capsys):
    res = bench(demo_cfg(), [EAGER, Setup("eager fp32 fused", fused=True)], steps=2, warmup=1, peak_tflops=1.0)
    assert [r["setup"] for r in res["setups"]] == ["eager fp32", "eager fp32 fused"]
    a, b = (r["ms_per_step"]["median"] for r in res["setups"])
    assert math.isclose(res["ratio"], a / b) and res["setups"][0]["mfu"] == pytest.approx(res["setups"][0]["tflops_per_s"])
    rc = main(["bench", "--method", "clip", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--fused",
               "--json", str(tmp := __import__("tempfile").mkdtemp()) + "/b.json", "--markdown", f"{tmp}/t.md"])
    assert rc == 0
    assert main(["bench", "--method", "clip", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--markdown", f"{tmp}/t.md"]) == 0
    table = open(f"{tmp}/t.md").read().splitlines()
    assert table[0].startswith("| method | device | setup |") and len(table) == 4  # header, rule, one row per call
    assert table[2].startswith("| clip | cpu | eager + fp32 + fused | 2 |") and table[3].startswith("| clip | cpu | eager + fp32 | 2 |")
    out = capsys.readouterr().out
    assert "clip [eager + fp32 + fused] batch 2:" in out and "samples/s" in out and "GFLOP/sample" in out
    assert json.loads(open(f"{tmp}/b.json").read())["setups"][0]["batch_size"] == 2


def test_gpu_peak_table_and_override(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert device_peak(cuda, Setup("x", autocast="bf16")) == (989.0, "H100 bf16 (dense)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert device_peak(cuda, Setup("x", autocast="bf16"))[0] == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some GPU")
    assert device_peak(cuda, Setup("x"))[0] is None
    assert device_peak(torch.device("cpu"), EAGER, 2.5) == (2.5, "--peak-tflops")


def test_loader_alone_raw_and_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDVLP_CACHE", str(tmp_path / "cache"))
    rc = main(["bench", "--data-only", "--method", "clip", "--steps", "2", "--workers", "0", "data.demo_size=tiny",
               "--json", str(tmp_path / "d.json")])
    assert rc == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["raw"]["items_per_s"] > 0 and res["cached"]["items_per_s"] > 0 and res["workers"] == 0
    assert "raw" in capsys.readouterr().out
    assert any((tmp_path / "cache" / "preprocessed").iterdir())  # the cache was built, then read


def test_flop_formulas_without_the_module_tracker_equal_flop_counter_mode():
    """The fallback for steps FlopCounterMode's module tracker cannot follow counts what it counts."""
    from torch.utils.flop_counter import FlopCounterMode

    from medvlp.bench import _flops_by_dispatch

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)

    def run():
        model(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        run()
    assert _flops_by_dispatch(run) == counter.get_total_flops() == 3 * 2 * 8 * (16 * 32 + 32 * 4) - 2 * 8 * 16 * 32


def test_fit_compiles_both_encoders_and_the_run_reloads(tmp_path, monkeypatch):
    """trainer.compile=true: ``medvlp fit`` trains both encoders through ``torch.compile`` (TorchDynamo traces
    them; the eager backend here spares the CPU the code generation, which ``medvlp bench --compile`` runs),
    and the run directory reloads into a method with the trained weights."""
    import torch

    from medvlp import api
    from medvlp import config as C

    real, wrapped = torch.compile, []

    def traced(module, **kwargs):
        wrapped.append(type(module).__name__)
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", traced)
    cfg = C.compose("clip", overrides=[f"run.out_dir={tmp_path}", "trainer.compile=true", "trainer.max_steps=2",
                                       "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
                                       "data.limit_train=32", "data.batch_size=16"])
    api.resolve_data_root(cfg)
    C.resolve(cfg)
    run = api.fit(cfg)
    assert wrapped == ["TimmImageEncoder", "HFTextEncoder"]
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("image_encoder._orig_mod.") for k in weights)
    assert any(k.startswith("text_encoder._orig_mod.") for k in weights)
    method, _ = api.load_run(run)
    name = next(k for k in weights if k.startswith("text_encoder._orig_mod."))
    assert torch.equal(method.state_dict()[name.replace("._orig_mod.", ".")], weights[name])
