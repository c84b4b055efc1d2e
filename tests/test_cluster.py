"""Cluster set-ups: the trainer presets (DDP, multi-node, FSDP), SLURM, and the example batch script."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from medvlp import api
from medvlp import config as C

ROOT = Path(__file__).resolve().parents[1]
SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "medvlp-fit", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}


def test_presets_compose_with_a_method(monkeypatch):
    ddp = C.compose("mgca", trainer="ddp").trainer
    assert (ddp.strategy, ddp.precision, ddp.accelerator) == ("ddp", "bf16-mixed", "gpu")
    assert C.compose("clip", trainer="multinode").trainer.num_nodes == 1  # outside SLURM
    monkeypatch.setenv("SLURM_NNODES", "3")
    multi = C.compose("hlip", trainer="multinode").trainer
    assert multi.num_nodes == 3 and multi.strategy == "ddp" and multi.checkpoint_every_n_steps > 0
    fsdp = C.compose("medblip", trainer="fsdp").trainer
    assert fsdp.strategy == "fsdp" and "FrozenLLM" in fsdp.fsdp_wrap and "Block" in fsdp.fsdp_wrap
    strategy = api._strategy(fsdp)
    assert type(strategy).__name__ == "FSDPStrategy"
    # the experiment's own trainer section still applies over a preset named on the command line
    exp = C.compose(trainer="ddp", config_file=str(C.config_dir() / "experiment" / "medblip_fsdp.yaml")).trainer
    assert exp.strategy == "fsdp" and list(exp.fsdp_wrap) == ["FrozenLLM"] and exp.gradient_clip_val == 1.0


def test_slurm_jobs_get_lightnings_environment_without_its_mid_step_requeue(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert api._cluster_plugins() == []
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    (env,) = api._cluster_plugins()
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
    assert env.global_rank() == 0 and env.world_size() == 1 and env.main_address == "node1"


def test_the_example_batch_script():
    script = ROOT / "examples" / "slurm" / "fit_multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--trainer multinode" in text and "medvlp fit --resume" in text and "run.name=" in text
    assert "--ntasks-per-node" in text and (C.config_dir() / "trainer" / "multinode.yaml").is_file()
    config = next(line.split(":-")[1].rstrip("}") for line in text.splitlines() if line.startswith("CONFIG="))
    C.compose(trainer="multinode", config_file=str(ROOT / config))  # the default recipe composes with the preset


@pytest.mark.parametrize("name", ["ddp", "multinode", "fsdp"])
def test_presets_pass_lightnings_choices(name):
    api.check_trainer_choices(C.compose("clip", trainer=name))
