"""Hydra launcher presets compose; a real 2-job sweep through submitit_local (slow)."""

import json
import os
import subprocess
import sys

import pytest

FAST = [
    "debug=tiny",
    "matcher.outer_steps=1",
    "matcher.inner_steps=1",
    "matcher.init_candidates=2",
    "projector.topk=20",
    "num_per_class=2",
    "batch_size=2",
    "real_per_class=4",
    "dataset.length=6",
    "progress=false",
    "threads=1",
]
ENTRY = "from gmtext.cli import generate_main; generate_main()"


def _hydra_cfg(overrides):
    from hydra import compose, initialize_config_module

    from gmtext.config import register_configs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
        return compose(config_name="generate", overrides=overrides, return_hydra_config=True)


def test_slurm_preset_composes():
    cfg = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    ln = cfg.hydra.launcher
    assert ln._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (ln.partition, ln.gpus_per_node, ln.timeout_min, ln.array_parallelism, ln.cpus_per_task, ln.mem_gb) == (
        "gpu",
        1,
        240,
        16,
        8,
        32,
    )
    assert ln.max_num_timeout == 3 and ln.submitit_folder.endswith("/.submitit/%j")
    assert list(ln.setup) == ["export GMTEXT_DEVICE=auto"]  # the jobs' model.device: the node's GPU
    cpu = _hydra_cfg(["hydra/launcher=slurm_cpu"]).hydra.launcher
    assert (
        cpu.gpus_per_node is None and cpu.cpus_per_task == 4 and cpu.array_parallelism == 16 and list(cpu.setup) == []
    )
    jl = _hydra_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]).hydra.launcher  # built-in plugin preset
    assert jl._target_.endswith("JoblibLauncher") and jl.n_jobs == 2


def test_gmtext_device_sets_the_model_device_default(monkeypatch):
    """What the slurm preset's setup line does in a job: GMTEXT_DEVICE=auto makes auto the
    default of model.device (cuda on a GPU node); an explicit model.device and a model whose
    option sets its own device win; unset, cpu."""
    from gmtext.models import resolve_device

    assert _hydra_cfg([]).model.device == "cpu"
    monkeypatch.setenv("GMTEXT_DEVICE", "auto")
    cfg = _hydra_cfg([])
    assert cfg.model.device == "auto"
    import torch

    assert resolve_device(cfg.model.device).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _hydra_cfg(["model.device=cpu"]).model.device == "cpu"
    assert _hydra_cfg(["model=tiny_llama"]).model.device == "auto"


def test_cli_cfg_hydra_shows_slurm_launcher():
    r = subprocess.run(
        [sys.executable, "-c", ENTRY, "hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "SlurmLauncher" in r.stdout and "array_parallelism: 16" in r.stdout


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    # offline W&B in the jobs: each job its own run, grouped by the sweep dir's name
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(
        TOKENIZERS_PARALLELISM="false",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path / "wb"),
        WANDB_CACHE_DIR=str(tmp_path / "wbc"),
        WANDB_CONFIG_DIR=str(tmp_path / "wbcfg"),
        WANDB_DATA_DIR=str(tmp_path / "wbd"),
    )
    fast = [o for o in FAST if o != "logger=none"] + ["logger=wandb", "logger.mode=offline"]
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            ENTRY,
            "-m",
            "hydra/launcher=submitit_local",
            "seed=0,1",
            *fast,
            f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1",
        ],
        capture_output=True,
        text=True,
        timeout=580,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    texts = {}
    for job in ("0", "1"):
        d = sweep / job
        rows = [json.loads(l) for l in (d / "synthetic.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        assert json.loads((d / "generate.json").read_text())["config"]["seed"] == int(job)
        texts[job] = [x["text"] for x in rows]
    from test_tracking import wandb_contents

    run_ids = set()
    for job in ("0", "1"):
        (wb,) = (sweep / job).glob("wandb/offline-run-*/run-*.wandb")
        run, _, summary, config = wandb_contents(wb)
        assert run.run_group == "sweep" and run.job_type == "generate" and config["seed"] == int(job)
        assert (
            run.display_name == f"generate-seed{job}-job{job}"
            and (sweep / job / ".wandb_id.generate").read_text() == run.run_id
        )
        assert summary["examples"] == 4
        run_ids.add(run.run_id)
    assert len(run_ids) == 2
    assert texts["0"] != texts["1"]  # different seeds, different jobs
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # each job ran as its own submitit process
