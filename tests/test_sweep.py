"""The benchmark sweep (``python -m medvlp.sweep`` / ``make sweep``): task specs and the grid, validation
before any work, the summary by hand on written results, the command each combination runs in its own
process, and resuming after a kill for real (tiny runs; the ``medvlp`` commands run in this process
so that the tests can count and interrupt the library calls behind them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medvlp import api, cli
from medvlp import config as C
from medvlp import sweep as S
from medvlp.sweep import run as sweep_run


@pytest.fixture
def in_process(monkeypatch):
    """Run the sweep's ``medvlp`` commands through ``medvlp.cli.main`` in this process (monkeypatched
    library calls then apply); a non-zero status fails the step as a dead process would."""
    commands: list[list[str]] = []

    def execute(argv, log_path):
        assert argv[:3] == [sys.executable, "-m", "medvlp.cli"], argv
        commands.append(argv[3:])
        code = cli.main(argv[3:])
        if code:
            raise sweep_run.StepFailed(f"`medvlp {' '.join(argv[3:])}` exited with status {code}")

    monkeypatch.setattr(sweep_run, "execute", execute)
    return commands


def _cfg(tmp_path: Path, **kw) -> S.SweepConfig:
    return S.SweepConfig(**{"methods": ["clip"], "tasks": ["classification"], "fractions": [1.0], "seeds": [0],
                            "out": str(tmp_path / "results"), "runs": str(tmp_path / "runs"), **kw})


# --------------------------------------------------------------------------- specs, grid, validation
def test_task_specs_fill_in_defaults_and_switch_to_real_data_when_a_root_is_given():
    assert S.parse_task("classification") == S.TaskSpec("classification", "demo_chexpert", "linear")
    assert S.parse_task("classification", {"chexpert": "/data/chexpert"}).data == "chexpert"
    assert S.parse_task("segmentation") == S.TaskSpec("segmentation", "demo_siim", "frozen")
    assert S.parse_task("segmentation:demo_rsna:finetune") == S.TaskSpec("segmentation", "demo_rsna", "finetune")
    assert S.parse_task("detection") == S.TaskSpec("detection", "demo_rsna", "frozen")
    assert S.parse_task("zeroshot") == S.TaskSpec("zeroshot", "", "")
    with pytest.raises(C.ConfigError, match="Did you mean 'classification'"):
        S.parse_task("clasification")
    with pytest.raises(C.ConfigError, match="takes no protocol"):
        S.parse_task("zeroshot:demo_cxr:linear")
    with pytest.raises(C.ConfigError, match="not one of linear, frozen, finetune"):
        S.parse_task("classification:demo_covidx:frozen_head")
    # a paper's preset in place of a mode, for transfer and evaluation tasks it covers
    assert S.parse_task("segmentation:demo_siim:g2d") == S.TaskSpec("segmentation", "demo_siim", "g2d")
    assert S.parse_task("zeroshot:demo_rsna:g2d") == S.TaskSpec("zeroshot", "demo_rsna", "g2d")
    with pytest.raises(C.ConfigError, match="protocol 'mgca' has no zeroshot protocol"):
        S.parse_task("zeroshot:demo_rsna:mgca")


def test_the_grid_names_each_combination_and_runs_evaluation_tasks_once_per_method(tmp_path):
    cfg = _cfg(tmp_path, methods=["clip", "mgca"], tasks=["classification", "zeroshot", "segmentation:siim_pneumothorax"],
               fractions=[0.1, 1.0], seeds=[0, 1], roots={"siim_pneumothorax": "/data/siim"})
    combos = S.grid(cfg)
    assert len(combos) == 2 * (4 + 1 + 4)
    first = combos[0]
    assert first.folder(cfg.runs) == Path(cfg.runs) / "clip" / "downstream" / "classification-demo_chexpert-linear-f0.1-s0"
    zs = [c for c in combos if c.task == "zeroshot"]
    assert [(c.method, c.data, c.fraction, c.seed, c.name) for c in zs] == [
        ("clip", "demo_cxr", None, None, "zeroshot-demo_cxr"), ("mgca", "demo_cxr", None, None, "zeroshot-demo_cxr")]
    seg = [c for c in combos if c.task == "segmentation"]
    assert {c.root for c in seg} == {"/data/siim"} and {c.root for c in combos if c.task == "classification"} == {""}
    # quick settings on the synthetic data only, and only when no length is given
    assert S.settings_for(cfg, S.Combination("clip", "segmentation", "demo_siim", "frozen", 1.0, 0)) == {"max_steps": 150}
    assert S.settings_for(cfg, seg[0]) == {}
    assert S.settings_for(_cfg(tmp_path, settings={"max_epochs": 3}),
                          S.Combination("clip", "segmentation", "demo_siim", "frozen", 1.0, 0)) == {"max_epochs": 3}


def test_mistakes_fail_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("no work may start")

    monkeypatch.setattr(api, "fit", no_work)
    monkeypatch.setattr(api, "downstream", no_work)
    cases = [
        ({"methods": ["mgac"]}, "Unknown method 'mgac'. Did you mean 'mgca'"),
        ({"tasks": ["classification:demo_chexpret"]}, "Did you mean 'demo_chexpert'"),
        ({"tasks": ["classification:chexpert"]}, r"--roots chexpert=/path .*demo_chexpert"),
        ({"tasks": ["detectoin"]}, "Unknown task 'detectoin'. Did you mean 'detection'"),
        ({"tasks": ["segmentation:demo_siim:linaer"]}, "protocol 'linaer' is not one of frozen, linear, finetune"),
        ({"fractions": [0.0, 1.0]}, r"label fractions are in \(0, 1\]"),
        ({"roots": {"chexpret": "/x"}}, "Did you mean 'chexpert'"),
        ({"pretrain_data": "mimic_cxr"}, "--pretrain-root"),
    ]
    for kw, message in cases:
        with pytest.raises(C.ConfigError, match=message):
            S.run_sweep(_cfg(tmp_path, **kw))
    (tmp_path / "runs" / "clip").mkdir(parents=True)
    (tmp_path / "runs" / "clip" / S.REQUEST).write_text(json.dumps({**S.pretrain_request(_cfg(tmp_path), "clip"), "steps": 7}))
    with pytest.raises(C.ConfigError, match="other settings .*steps 7 -> 200"):
        S.run_sweep(_cfg(tmp_path))
    assert S.main(["--methods", "mgac", "--runs", str(tmp_path / "r2"), "--out", str(tmp_path / "o2")]) == 2
    assert "Did you mean 'mgca'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- the summary by hand
def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_summary_means_and_stds_over_seeds_by_hand(tmp_path):
    cfg = _cfg(tmp_path, methods=["clip", "mgca"], tasks=["classification", "classification:demo_covidx", "zeroshot"],
               fractions=[0.1, 1.0], seeds=[0, 1])
    combos = S.grid(cfg)
    values = {("clip", 0.1): (0.7, 0.8), ("clip", 1.0): (0.9, 0.9), ("mgca", 0.1): (0.75, 0.85), ("mgca", 1.0): (0.95, 0.91)}
    for c in combos:
        path = c.folder(cfg.runs) / S.RESULT
        if c.task == "zeroshot":
            _write(path, {"zeroshot": {"mean_auroc": 0.61 if c.method == "clip" else 0.66}, "retrieval": None})
        elif c.data == "demo_chexpert":
            _write(path, {"mean_auroc": values[c.method, c.fraction][c.seed], "sweep": {"seconds": 2.0}})
        elif (c.method, c.fraction, c.seed) != ("mgca", 1.0, 1):  # one never ran
            _write(path, {"mean_auroc": 0.5, "accuracy": 0.6 + 0.1 * c.seed, "multiclass": True, "seconds": 1.0})
    cut = combos[1].folder(cfg.runs) / S.RESULT  # clip, chexpert, 10 %, seed 1: cut short by a kill
    cut.write_text(cut.read_text()[:5])
    for m, sec in (("clip", 30.0), ("mgca", 50.0)):
        _write(Path(cfg.runs) / m / S.DONE, {"seconds": sec})
    failures = {f"clip/{combos[1].name}": "RuntimeError: out of memory"}
    rows = S.collect(cfg, combos, failures)
    assert [r.status for r in rows].count("ok") == len(combos) - 2

    files = S.write_summary(cfg, rows, elapsed=12.0, computed=3, skipped=4)
    md = files["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.split(" | ")[1:] == [
        "classification demo_chexpert AUROC @ 10%", "classification demo_chexpert AUROC @ 100%",
        "classification demo_covidx accuracy @ 10%", "classification demo_covidx accuracy @ 100%", "zeroshot demo_cxr AUROC @ – |"]
    clip = next(line for line in md.splitlines() if line.startswith("| clip")).split(" | ")
    mgca = next(line for line in md.splitlines() if line.startswith("| mgca")).split(" | ")
    assert clip[1] == "0.700 (1), 1 failed" and mgca[1] == "**0.800 ± 0.071 (2)**"  # std over seeds: sample std
    assert clip[2] == "0.900 ± 0.000 (2)" and mgca[2] == "**0.930 ± 0.028 (2)**"
    assert clip[3] == mgca[3] == "**0.650 ± 0.071 (2)**" and mgca[4] == "0.600 (1)" and clip[4] == "**0.650 ± 0.071 (2)**"
    assert clip[5] == "0.610 (1) |" and mgca[5] == "**0.660 (1)** |"
    assert "pre-training (200 steps on demo_cxr) clip 30 s, mgca 50 s" in md and "total compute 101 s" in md
    assert "- mgca classification demo_covidx linear f=1 s=1: missing" in md and "out of memory" in md

    lines = files["csv"].read_text().splitlines()
    assert lines[0] == "method,task,data,protocol,fraction,seed,metric,value,seconds,status,result,error"
    assert len(lines) == 1 + len(combos)
    assert lines[1].startswith("clip,classification,demo_chexpert,linear,0.1,0,mean_auroc,0.7,2.0,ok,")
    assert lines[2].startswith("clip,classification,demo_chexpert,linear,0.1,1,mean_auroc,,,failed,,RuntimeError")
    assert any(line.startswith("mgca,zeroshot,demo_cxr,,,,zeroshot.mean_auroc,0.66,,ok,") for line in lines)

    from PIL import Image

    png = files["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.size[0] > 5 * 130 and len(img.getcolors(1 << 16)) > 5  # bars in several colours
    assert not list(Path(cfg.out).glob(".*.tmp"))


# --------------------------------------------------------------------------- failures and resuming
def test_a_failing_combination_is_recorded_the_others_go_on_and_the_next_sweep_retries_it(tmp_path, monkeypatch, capsys,
                                                                                           in_process):
    calls: list[float] = []

    def fake_downstream(task, data, run_dir, fraction=1.0, out=None, **kw):
        calls.append(fraction)
        if fraction == 0.1 and len(calls) < 3:
            raise RuntimeError("the head diverged")
        (Path(out) / "result.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps({"mean_auroc": fraction / 2}))
        return {}  # as another process of a DDP run: nothing printed

    monkeypatch.setattr(sweep_run, "ensure_pretrained", lambda cfg, method: tmp_path / "runs" / method)
    monkeypatch.setattr(api, "downstream", fake_downstream)
    argv = ["--methods", "clip", "--tasks", "classification", "--fractions", "0.1", "1", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "results")]
    assert S.main(argv) == 1
    assert "1 of 2 combinations failed" in capsys.readouterr().err and calls == [0.1, 1.0]
    csv_rows = (tmp_path / "results" / "summary.csv").read_text().splitlines()
    assert ",failed,," in csv_rows[1] and "the head diverged" in csv_rows[1] and ",ok," in csv_rows[2]
    assert "failed" in (tmp_path / "results" / "summary.md").read_text()
    assert S.main(argv) == 0 and calls == [0.1, 1.0, 0.1]  # only the failed one again
    assert "| clip | 0.050 (1) | 0.500 (1) |" in (tmp_path / "results" / "summary.md").read_text()


@pytest.mark.slow  # 9 s
def test_a_killed_sweep_completes_only_what_is_missing(tmp_path, monkeypatch, in_process):
    """Tiny real runs: pre-training (8 steps), a linear probe at two fractions and zero-shot."""
    cfg = _cfg(tmp_path, tasks=["classification", "zeroshot"], fractions=[0.1, 1.0], pretrain_steps=8,
               pretrain_overrides=["trainer.limit_val_batches=1"], settings={"max_epochs": 2})
    real_fit, real_downstream, real_evaluate = api.fit, api.downstream, api.evaluate
    calls = {"fit": [], "downstream": [], "evaluate": 0}

    def fit(run_cfg, resume=None):
        calls["fit"].append(Path(resume) if resume else None)
        return real_fit(run_cfg, resume=resume)

    def killed_on_second(*a, **k):
        calls["downstream"].append(k["fraction"])
        if len(calls["downstream"]) == 2:
            raise KeyboardInterrupt  # as a kill between two combinations would
        return real_downstream(*a, **k)

    def evaluate(*a, **k):
        calls["evaluate"] += 1
        return real_evaluate(*a, **k)

    monkeypatch.setattr(api, "fit", fit)
    monkeypatch.setattr(api, "downstream", killed_on_second)
    monkeypatch.setattr(api, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(cfg)
    first, second, zs = S.grid(cfg)
    run_dir = Path(cfg.runs).resolve() / "clip"
    assert calls["fit"] == [None] and (run_dir / S.DONE).is_file()
    assert S.is_done(cfg, first) and not S.is_done(cfg, second) and not S.is_done(cfg, zs)
    assert not (Path(cfg.out) / "summary.md").exists()
    kept = (first.folder(cfg.runs) / S.RESULT).read_text()
    kept_mtime = (first.folder(cfg.runs) / S.RESULT).stat().st_mtime_ns
    marker = (run_dir / S.DONE).read_text()

    monkeypatch.setattr(api, "downstream", lambda *a, **k: calls["downstream"].append(k["fraction"]) or real_downstream(*a, **k))
    out = S.run_sweep(cfg)
    assert out.ok and (out.computed, out.skipped) == (2, 1)
    assert calls["fit"] == [None] and calls["downstream"] == [0.1, 1.0, 1.0] and calls["evaluate"] == 1
    assert (first.folder(cfg.runs) / S.RESULT).read_text() == kept
    assert (first.folder(cfg.runs) / S.RESULT).stat().st_mtime_ns == kept_mtime and (run_dir / S.DONE).read_text() == marker
    assert [r.status for r in out.rows] == ["ok", "ok", "ok"] and 0.0 <= out.rows[2].value <= 1.0
    assert out.rows[2].metric == "zeroshot.mean_auroc" and "zeroshot demo_cxr AUROC @ –" in out.files["md"].read_text()

    path = zs.folder(cfg.runs) / S.RESULT  # a result cut short by a kill is computed again
    path.write_text(path.read_text()[:40])
    out = S.run_sweep(cfg)
    assert (out.computed, out.skipped) == (1, 2) and calls["evaluate"] == 2 and calls["downstream"] == [0.1, 1.0, 1.0]
    assert json.loads(path.read_text())["zeroshot"]["mean_auroc"] == out.rows[2].value

    # pre-training: a run without its marker continues from its checkpoint; one without a checkpoint starts
    # again in place from step 0, and nothing it wrote is deleted
    (run_dir / S.DONE).unlink()
    assert S.ensure_pretrained(cfg, "clip") == run_dir and calls["fit"] == [None, run_dir]
    assert json.loads((run_dir / S.DONE).read_text())["resumed_from"].endswith(".ckpt")
    (run_dir / S.DONE).unlink()
    for ckpt in (run_dir / api.CKPT_DIR).glob("*.ckpt"):
        ckpt.unlink()
    S.ensure_pretrained(cfg, "clip")
    assert calls["fit"] == [None, run_dir, run_dir] and (run_dir / S.REQUEST).is_file()
    assert json.loads((run_dir / S.DONE).read_text())["resumed_from"] == "step 0"
    assert (run_dir / "downstream").is_dir() and (run_dir / api.CKPT_DIR / "last.ckpt").is_file()


@pytest.mark.slow
def test_make_sweep_killed_halfway_and_restarted(tmp_path):
    """Two methods x two tasks x two fractions in a subprocess, killed once the first results are written."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "-m", "medvlp.sweep", "--methods", "clip", "mgca", "--tasks", "classification", "segmentation",
           "--fractions", "0.1", "1", "--pretrain-steps", "20", "--max-steps", "10", "--runs", str(runs), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(runs.glob("*/downstream/*/result.json"))) < 2:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in runs.glob("*/downstream/*/result.json") if json.loads(p.read_text() or "0")}
    assert 2 <= len(done) < 8 and not (out / "summary.md").exists()
    fits = {m: (runs / m / "config.yaml").stat().st_mtime_ns for m in ("clip", "mgca") if (runs / m / S.DONE).is_file()}

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert all((runs / m / "config.yaml").stat().st_mtime_ns == t for m, t in fits.items())
    assert len(list(runs.glob("*/downstream/*/result.json"))) == 8
    assert res.stderr.count("skipped (done before)") == len(done)
    md = (out / "summary.md").read_text()
    assert "| mgca |" in md and "segmentation demo_siim Dice @ 100%" in md and (out / "summary.png").stat().st_size > 1000


def test_each_combination_is_one_medvlp_command(tmp_path):
    """What the sweep runs, process by process: downstream with the task settings, evaluate on another dataset."""
    cfg = _cfg(tmp_path, tasks=["segmentation", "zeroshot:demo_chexpert", "grounding:demo_siim:g2d"],
               roots={"demo_chexpert": "/data/x"}, settings={"max_steps": 5})
    seg, zs, gr = S.grid(cfg)
    assert gr.name == "grounding-demo_siim-g2d"
    assert sweep_run.combination_command(cfg, gr, tmp_path)[3:] == [
        "evaluate", "--task", "grounding", "--run", str(tmp_path), "--split", "test", "--data", "demo_siim", "--protocol",
        "g2d", "--json", str(gr.folder(cfg.runs) / S.RESULT)]
    run_dir = tmp_path / "runs" / "clip"
    argv = sweep_run.combination_command(cfg, seg, run_dir)
    assert argv[:3] == [sys.executable, "-m", "medvlp.cli"]
    assert argv[3:] == ["downstream", "--task", "segmentation", "--data", "demo_siim", "--run", str(run_dir),
                        "--fraction", "1", "--protocol", "frozen", "--seed", "0", "--out", str(seg.folder(cfg.runs)),
                        "--set=max_steps=5"]
    assert sweep_run.combination_command(cfg, zs, run_dir)[3:] == [
        "evaluate", "--task", "zeroshot", "--run", str(run_dir), "--split", "test", "--data", "demo_chexpert",
        "--json", str(zs.folder(cfg.runs) / S.RESULT), "data.root=/data/x"]


def test_a_dead_process_fails_its_step_with_the_log_tail(tmp_path):
    with pytest.raises(sweep_run.StepFailed, match=r"exited with status 3: boom .*log: "):
        sweep_run.execute([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)", "x"], tmp_path / "log.txt")
    assert "boom" in (tmp_path / "log.txt").read_text()

