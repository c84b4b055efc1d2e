"""Failure paths of runs: a forgotten data.root, run directories under concurrency and DDP, checkpoints
that are cut short, corrupt or unsafe."""

import functools
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medvlp import api
from medvlp import config as C
from medvlp.checkpoints import (
    CheckpointError,
    NoCheckpointError,
    UnsafeCheckpointError,
    load_latest,
    read_checkpoint,
)
from medvlp.registry import DATAMODULES

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "medvlp.cli"]


@functools.cache
def real_data_configs() -> dict[str, str]:
    """``configs/data`` files of real datasets (``data.root`` must be given) -> their datamodule."""
    out = {}
    for name in C.group_options("data"):
        cfg = C.compose(data=name, sections=("data",))
        if OmegaConf.is_missing(cfg.data, "root"):
            out[name] = cfg.data.name
    return out


# ------------------------------------------------------------------------------------ data.root
def test_every_datamodule_has_a_real_data_config():
    assert set(real_data_configs().values()) == set(DATAMODULES.names())


@pytest.mark.parametrize("data", sorted(real_data_configs()))
def test_fit_without_data_root_says_what_to_set(data, capsys):
    """``medvlp fit --data <real dataset>`` without ``data.root``: what to set and the expected layout,
    at once, without a traceback."""
    from medvlp.cli import main

    start = time.perf_counter()
    assert main(["fit", "--method", "clip", "--data", data]) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    layout = DATAMODULES.get(real_data_configs()[data]).EXPECTED_LAYOUT.strip().splitlines()
    assert err.startswith("medvlp fit: error: data.root is not set.") and "Set data.root=/path/to/the/download" in err
    assert layout[0].strip() in err and layout[-1].strip() in err
    assert "Traceback" not in err and elapsed < 5


def test_fit_without_data_root_fails_fast_in_a_new_process():
    code = ("import sys\nfrom medvlp.cli import main\n"
            "print(main(['fit', '--method', 'clip', '--data', 'mimic_cxr']), 'torch' in sys.modules)")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert time.perf_counter() - start < 5
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
    assert "data.root is not set" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------ run directories
def test_run_directories_made_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    """Eight runs named in the same second: eight directories, each with its own config.yaml."""
    cfg = C.compose("clip", overrides=[f"run.out_dir={tmp_path}", "data.root=/data/mimic"])
    monkeypatch.setattr(api.time, "strftime", lambda fmt, *a: "20261205-120000")
    barrier, made, errors = threading.Barrier(8), [], []

    def start() -> None:
        barrier.wait()
        try:
            made.append(api.new_run_dir(cfg))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stem = "clip-mimic-20261205-120000"
    assert sorted(p.name for p in made) == sorted([stem] + [f"{stem}-{i}" for i in range(1, 8)])
    assert all((p / api.CONFIG_NAME).is_file() for p in made)


def test_a_named_run_directory_is_claimed_once(tmp_path):
    cfg = C.compose("clip", overrides=[f"run.out_dir={tmp_path}", "run.name=mine", "data.root=/data/mimic"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sweep_request.json").write_text("{}")  # prepared by a sweep: not a run yet
    assert api.new_run_dir(cfg) == (tmp_path / "mine").resolve()
    with pytest.raises(C.ConfigError, match=r"already holds a run.*medvlp fit --resume"):
        api.new_run_dir(cfg)
    assert (tmp_path / "mine" / "sweep_request.json").is_file() and not list((tmp_path / "mine").glob(".*tmp"))


def complete(run_dir: Path) -> bool:
    return all((run_dir / rel).is_file() for rel in ("config.yaml", "run_info.json", "text_encoder/config.json",
                                                       "checkpoints/last.ckpt", "metrics.csv"))


@pytest.mark.slow  # 18 s; the run-directory claim itself is checked in the default suite
def test_fits_started_together_get_their_own_complete_run_directories(tmp_path):
    """A ``medvlp fit`` and a two-process DDP ``medvlp fit`` (gloo on CPU) started together into one folder,
    where the names of the coming minutes are already taken: they race for the same next names and end in
    two different, complete directories; the DDP run has one (rank 0 names it, the other process uses it,
    only rank 0 writes the config, run info and text encoder files)."""
    cfg = C.compose("clip")
    api.resolve_data_root(cfg)
    stem = f"clip-{Path(cfg.data.root).name}-"
    now = time.time()
    taken = {stem + time.strftime("%Y%m%d-%H%M%S", time.localtime(now + s)) for s in range(-5, 180)}
    for name in taken:
        (tmp_path / name).mkdir()
    args = ["fit", "--method", "clip", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            "data.limit_train=128", f"run.out_dir={tmp_path}"]
    ddp = subprocess.Popen([*CLI, *args, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from medvlp.cli import main

    assert main(args) == 0  # meanwhile, in this process
    out, err = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, err[-3000:]
    made = sorted(p for p in tmp_path.iterdir() if p.name not in taken)
    assert len(made) == 2 and all(p.name.rsplit("-", 1)[0] in taken for p in made), made
    assert all(complete(p) for p in made)
    assert out.split("run directory: ")[1].split()[0] in {str(p) for p in made}
    assert api.RUN_DIR_ENV not in os.environ


# ------------------------------------------------------------------------------------ checkpoints
def save(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.full((256, 256), float(step))}, "global_step": step}, path)
    os.utime(path, (mtime, mtime))
    return path


def damage_inside(path: Path) -> None:
    """Flip bytes in the middle of the tensor data: the zip directory at the end stays intact."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))
    assert zipfile.is_zipfile(path)


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_corrupt_newest_checkpoint_is_named_and_passed_over(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    save(ck / "step3.ckpt", 3, 1000)
    save(ck / "step6.ckpt", 6, 2000)
    damage_inside(save(ck / "step9.ckpt", 9, 3000))
    with pytest.raises(CheckpointError, match=r"step9.ckpt is corrupt.*CRC"):
        read_checkpoint(ck / "step9.ckpt")
    path, state = load_latest(tmp_path)
    assert path.name == "step6.ckpt" and state["global_step"] == 6
    assert "skipping checkpoint step9.ckpt" in caplog.text and "CRC" in caplog.text


def test_a_truncated_checkpoint_is_passed_over(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    save(ck / "step3.ckpt", 3, 1000)
    cut = save(ck / "step6.ckpt", 6, 2000)
    cut.write_bytes(cut.read_bytes()[:5000])
    os.utime(cut, (2000, 2000))
    assert load_latest(tmp_path)[0].name == "step3.ckpt"
    assert "step6.ckpt" in caplog.text and "not a zip archive" in caplog.text


def test_every_checkpoint_broken_says_so(tmp_path):
    ck = tmp_path / "checkpoints"
    damage_inside(save(ck / "step3.ckpt", 3, 1000))
    (ck / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"Every checkpoint in .* is broken") as err:
        load_latest(tmp_path)
    assert "step3.ckpt: " in str(err.value) and "last.ckpt: " in str(err.value)
    assert "before its first checkpoint" not in str(err.value)
    with pytest.raises(NoCheckpointError, match="stopped before its first checkpoint"):
        load_latest(tmp_path / "empty")


def test_an_unsafe_checkpoint_is_refused_and_runs_nothing(tmp_path):
    ck, marker = tmp_path / "checkpoints", tmp_path / "ran"
    save(ck / "step3.ckpt", 3, 1000)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, ck / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"Refusing to load .*last.ckpt.*posix.system.*Nothing in it was run"):
        load_latest(tmp_path)  # no fallback to step3: a planted file stops the run
    assert not marker.exists()
    torch.load(ck / "last.ckpt", weights_only=False)  # the control: unpickled in full, it does run
    assert marker.exists()


def test_an_unreadable_checkpoint_is_named_as_such(tmp_path, monkeypatch):
    from medvlp import checkpoints

    path = save(tmp_path / "checkpoints" / "step3.ckpt", 3, 1000)

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(checkpoints, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint .*step3.ckpt: permission denied"):
        read_checkpoint(path)
