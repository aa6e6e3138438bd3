"""Experiment tracking: W&B (online/offline/disabled) or none, always mirrored locally.

Every logged record is also appended to `metrics.jsonl` in the run dir, so results are
readable without W&B and `gmtext-report` has one format to read. Stages `commit(outputs)`
the mirror before each unit of work (a generated batch, a stage's summary); a new Tracker
drops what a killed attempt logged for work whose outputs never appeared (and a torn last
line), so a resumed run's metrics.jsonl reads like an uninterrupted run's.

W&B, the way its users expect it (docs/tracking.md):
- mode / project: `logger.mode` / `logger.project` when set, else W&B's own `WANDB_MODE` /
  `WANDB_PROJECT`, else offline / gmtext (explicit config > environment > default);
- one W&B run per Hydra job and stage (`reinit="create_new"`, finished in `close()`), with an
  id stored in the run dir (`.wandb_id.<stage>`) and `resume="allow"`: re-running or resuming
  the job continues its run instead of adding a second one;
- name `<stage>-<experiment>-seed<N>[-job<K>]`; group: `logger.group`, else the sweep dir
  under `-m` (all jobs of one sweep), else the experiment; job_type = the stage;
- config: the stage's own settings (a generate run carries no finetuner.*/train.* keys),
  plus `experiment` and Hydra's runtime `choices` (which option of each group);
- history: `admm/*` against `admm/step` (one point per ADMM outer step over the batches),
  `train/*` and `dev/*` against `train/step`; the step counters, `batch`, `outer_step` and the
  lr bookkeeping are hidden step metrics, not charts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from pathlib import Path

from .artifacts import other_writers, write_text

COMMIT_FILE = ".metrics.jsonl.commit"  # length of metrics.jsonl at the last commit(), and that work's outputs
MODES = ("online", "offline", "disabled")
# Config groups a stage does not read: left out of its W&B config so runs compare on what
# mattered (the local artifacts keep the full resolved config).
NOT_USED_BY = {
    "generate": ("finetuner", "train", "finetune", "selector", "pool"),
    "release": ("finetuner", "train", "finetune", "selector", "pool", "matcher", "projector", "num_per_class", "batch_size"),
    "select": ("finetuner", "train", "finetune", "matcher", "projector"),
    "finetune": ("matcher", "projector", "selector", "pool", "release", "privacy", "shard", "matched_params", "match_loss",
                 "target_batch_size", "real_per_class", "batch_size"),
}
# (glob, step metric): the x-axis of each family of history keys
STEP_METRICS = (("admm/*", "admm/step"), ("train/*", "train/step"), ("dev/*", "train/step"))
HIDDEN = ("admm/step", "admm/batch", "admm/outer_step", "train/step", "train/lr_run", "train/lr_value")


def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # no Hydra context (library use, tests)
        return None


def default_group() -> str | None:
    """Under -m, the sweep dir (relative to the working dir when inside it, else its name):
    every job of one sweep lands in one W&B group. None otherwise."""
    hc = _hydra()
    try:
        from hydra.types import RunMode

        if hc is not None and hc.mode == RunMode.MULTIRUN and hc.sweep.dir:
            d = Path(str(hc.sweep.dir))
            try:
                return str(d.resolve().relative_to(Path.cwd().resolve()))
            except ValueError:
                return d.name
    except Exception:
        return None
    return None


def run_identity(job_type: str, config: dict | None) -> dict:
    """{"name", "experiment", "choices", "job_num"} of this job, from the config and Hydra's
    runtime (the experiment is a defaults choice, not a config key)."""
    hc = _hydra()
    choices = {str(k): (None if v is None else str(v)) for k, v in (hc.runtime.choices.items() if hc is not None else ())}
    experiment = choices.get("experiment")
    job_num = None
    try:
        from hydra.types import RunMode

        if hc is not None and hc.mode == RunMode.MULTIRUN:
            job_num = int(hc.job.num)
    except Exception:
        job_num = None
    seed = (config or {}).get("seed")
    parts = [job_type] + ([experiment] if experiment else []) + ([f"seed{seed}"] if seed is not None else [])
    parts += [f"job{job_num}"] if job_num is not None else []
    return {"name": "-".join(parts), "experiment": experiment, "choices": choices, "job_num": job_num}


def stage_config(job_type: str, config: dict | None, ident: dict) -> dict:
    """The config W&B shows: JSON values only (enum choices as their value), without the
    groups the stage does not use, with the experiment and Hydra's choices added."""
    cfg = json.loads(json.dumps(config or {}, default=str))
    for k in NOT_USED_BY.get(job_type, ()):
        cfg.pop(k, None)
    cfg["experiment"] = ident["experiment"]
    if ident["choices"]:
        cfg["choices"] = {k: v for k, v in ident["choices"].items() if k not in NOT_USED_BY.get(job_type, ())}
    return cfg


def stable_run_id(run_dir: Path, job_type: str) -> str:
    """The W&B run id of this run dir and stage: made once (a hash of the run dir plus a random
    part, so a deleted and recreated dir does not resume an old run) and stored in the run dir,
    so a re-run or a resumed (requeued) job logs to the same run."""
    f = run_dir / f".wandb_id.{job_type}"
    if f.exists():
        rid = f.read_text().strip()
        if rid:
            return rid
    h = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    rid = f"{job_type}-{h}-{secrets.token_hex(3)}"
    write_text(f, rid)
    return rid


class Tracker:
    def __init__(self, run_dir, name: str = "none", mode: str | None = None, project: str | None = None, entity: str | None = None,
                 group: str | None = None, tags=(), job_type: str = "generate", config: dict | None = None):
        if name not in ("wandb", "none"):
            raise ValueError(f"logger.name={name!r} unknown; accepted: wandb, none")
        if mode is not None and mode not in MODES:
            raise ValueError(f"logger.mode={mode!r} unknown; accepted: {', '.join(MODES)}")
        self.run_dir = Path(run_dir)
        self.local = self.run_dir / "metrics.jsonl"
        self._recover()
        self.run = None
        ident = run_identity(job_type, config)
        self.name = ident["name"]
        self.group = group if group is not None else (default_group() or ident["experiment"])
        # explicit config > W&B's own env vars > gmtext's defaults (offline: no account needed)
        self.mode = str(mode) if mode is not None else (os.environ.get("WANDB_MODE") or "offline")
        self.project = project if project is not None else (os.environ.get("WANDB_PROJECT") or "gmtext")
        if name == "wandb" and self.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.project, entity=entity, group=self.group, job_type=job_type, tags=list(tags), name=self.name,
                id=stable_run_id(self.run_dir, job_type), resume="allow", config=stage_config(job_type, config, ident),
                dir=str(self.run_dir), mode=self.mode, reinit="create_new",
            )
            for key in HIDDEN:
                self.run.define_metric(key, hidden=True)
            for glob, step in STEP_METRICS:
                self.run.define_metric(glob, step_metric=step)

    def log(self, metrics: dict, step: int | None = None, kind: str = "step") -> None:
        self._mirror({"kind": kind, **({"step": step} if step is not None else {}), **metrics})
        if self.run is not None and kind != "failed":  # a failed batch is in the summary (failed_batches)
            self.run.log(*_wandb_row(metrics, step))

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict) -> None:
        """Final values: the local mirror gets a kind=summary record, W&B the run summary
        (not a history step). Lists and dicts (per-class accuracy, the confusion matrix) go too."""
        self._mirror({"kind": "summary", **metrics})
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(0 if exc_type is None else 1)

    def commit(self, *outputs) -> None:
        """Mark everything mirrored so far as finished work. What is logged after it belongs to
        work whose result is one of `outputs` (paths): a later Tracker keeps it if one of them
        exists by then, and drops it otherwise (the work was killed and will be redone)."""
        size = self.local.stat().st_size if self.local.exists() else 0
        names = [str(Path(o).relative_to(self.run_dir)) for o in outputs]
        write_text(self.run_dir / COMMIT_FILE, json.dumps({"size": size, "outputs": names}))

    def _recover(self) -> None:
        mark = self.run_dir / COMMIT_FILE
        if self.local.exists() and not other_writers(self.run_dir):
            data = self.local.read_bytes()
            keep = len(data)
            if mark.exists():
                m = json.loads(mark.read_text())
                if not any((self.run_dir / o).exists() for o in m["outputs"]):
                    keep = min(m["size"], keep)
            keep = data.rfind(b"\n", 0, keep) + 1  # whole records only
            if keep < len(data):
                with open(self.local, "r+b") as f:
                    f.truncate(keep)
        self.commit()

    def _mirror(self, rec: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.local, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=_num) + "\n")


def _wandb_row(metrics: dict, step):
    """(row, kwargs) for run.log. ADMM records (they carry outer_step) become admm/* with the
    global ADMM step as admm/step; namespaced training records get train/step; a plain record
    (library use) keeps its keys and W&B's own step."""
    nums = {k: v for k, v in metrics.items() if _is_num(v)}
    if "outer_step" in metrics:
        row = {(k if "/" in k else f"admm/{k}"): v for k, v in nums.items()}
        row["admm/step"] = step if step is not None else metrics["outer_step"]
        return (row,)
    if step is not None and any("/" in k for k in nums):
        row = {(k if "/" in k else f"train/{k}"): v for k, v in nums.items()}
        row["train/step"] = step
        return (row,)
    return (nums, step)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)
