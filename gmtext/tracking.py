"""Experiment tracking: a tracker component (`logger=` group), always mirrored locally.

A tracker is a `_target_` component like the matcher: conf/logger/<name>.yaml names the
class and its settings, each stage builds it (`make_tracker`) before loading the model, so
a failure from then on reaches the tracker, and passes what only the stage knows (run dir,
stage, config). `Tracker` itself is `logger=none`: the local mirror only. A new tracker is
a subclass that extends `log` / `table` / `summary` / `log_artifact` / `use_artifact` /
`close`, plus a YAML file with its `_target_`.

Every logged record is also appended to `metrics.jsonl` in the run dir, so results are
readable without W&B and `gmtext-report` has one format to read. Stages `commit(outputs)`
the mirror before each unit of work (a generated batch, a stage's summary); a new Tracker
drops what a killed attempt logged for work whose outputs never appeared (and a torn last
line), so a resumed run's metrics.jsonl reads like an uninterrupted run's.

W&B (`WandbTracker`), the way its users expect it (docs/tracking.md):
- mode / project: `logger.mode` / `logger.project` when set, else W&B's own `WANDB_MODE` /
  `WANDB_PROJECT`, else offline / gmtext (explicit config > environment > default);
- one W&B run per Hydra job and stage (`reinit="create_new"`, finished in `close()`), with an
  id stored in the run dir (`.wandb_id.<stage>`) and `resume="allow"`: re-running or resuming
  the job continues its run instead of adding a second one;
- name `<stage>-<experiment>-seed<N>[-job<K>]`; group: `logger.group`, else the sweep dir
  under `-m` (all jobs of one sweep), else the experiment, else (a pipeline) its run dir;
  job_type = the stage;
- config: the settings the run's outputs depend on (a generate run carries no
  finetuner.*/train.* keys; in a pipeline a stage also keeps its upstream stages' settings),
  plus `experiment` and Hydra's runtime `choices` (which option of each group);
- history: `admm/*` against `admm/step` (one point per ADMM outer step over the batches),
  `train/*` and `dev/*` against `train/step`; the step counters, `batch`, `outer_step` and the
  lr bookkeeping are hidden step metrics, not charts;
- artifacts: release → synthetic → selected → metrics, each named `<type>-<dataset>`; a
  stage logs what it wrote and references what it read (by file:// reference: same files,
  same digest, so W&B links it to the version its producer logged; a dir made without W&B
  still gets a node in the lineage graph). Only public outputs are artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from pathlib import Path

from .artifacts import other_writers, write_text

COMMIT_FILE = ".metrics.jsonl.commit"  # length of metrics.jsonl at the last commit(), and that work's outputs
MODES = ("online", "offline", "disabled")
# Config groups a stage does not read: left out of its W&B config so runs compare on what
# mattered (the local artifacts keep the full resolved config).
NOT_USED_BY = {
    "generate": ("finetuner", "train", "finetune", "selector", "pool"),
    "release": (
        "finetuner",
        "train",
        "finetune",
        "selector",
        "pool",
        "matcher",
        "projector",
        "num_per_class",
        "batch_size",
    ),
    "select": ("finetuner", "train", "finetune", "matcher", "projector"),
    "finetune": (
        "matcher",
        "projector",
        "selector",
        "pool",
        "release",
        "privacy",
        "shard",
        "matched_params",
        "match_loss",
        "target_batch_size",
        "target_precision",
        "real_per_class",
        "batch_size",
    ),
}
PIPELINE_ORDER = ("release", "generate", "select", "finetune")
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
    choices = {
        str(k): (None if v is None else str(v)) for k, v in (hc.runtime.choices.items() if hc is not None else ())
    }
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


def unused_keys(job_type: str, config: dict | None) -> set[str]:
    """Config groups the run's outputs do not depend on. In a pipeline a stage's outputs also
    depend on every upstream stage (its fine-tuning result on the matcher's settings), so only
    what neither it nor a stage before it reads is left out: a pipeline's finetune run carries
    the whole config, and the sweep's runs table compares accuracy against matcher.rho."""
    if (config or {}).get("stage") == "pipeline" and job_type in PIPELINE_ORDER:
        upstream = PIPELINE_ORDER[: PIPELINE_ORDER.index(job_type) + 1]
        return set.intersection(*(set(NOT_USED_BY[s]) for s in upstream))
    return set(NOT_USED_BY.get(job_type, ()))


def stage_config(job_type: str, config: dict | None, ident: dict) -> dict:
    """The config W&B shows: JSON values only (enum choices as their value), without the
    groups the run's outputs do not depend on, with the experiment and Hydra's choices added."""
    cfg = json.loads(json.dumps(config or {}, default=str))
    drop = unused_keys(job_type, config)
    for k in drop:
        cfg.pop(k, None)
    cfg["experiment"] = ident["experiment"]
    if ident["choices"]:
        cfg["choices"] = {k: v for k, v in ident["choices"].items() if k not in drop}
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


def artifact_name(kind: str, dataset: str) -> str:
    """`<type>-<dataset>`, restricted to what W&B accepts (letters, digits, `-`, `_`, `.`). It
    depends only on what producer and consumer both know, so a stage that reads a dir names it
    as the stage that wrote it did, and W&B files both under one artifact."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}-{dataset}").strip("-.")
    return name[:128] or kind


def make_tracker(logger_cfg, run_dir, job_type: str, config: dict | None, private: bool = False) -> "Tracker":
    """Build the configured tracker (`logger._target_`) for one stage of one run dir.
    `private`: the stage may run a DP mechanism on private data (a DP release, DP-SGD), so the
    tracker must not watch it (no console capture, no system metrics over time)."""
    from hydra.utils import instantiate

    if logger_cfg is None:
        return Tracker(run_dir, job_type=job_type, config=config, private=private)
    factory = instantiate(logger_cfg, _partial_=True, _convert_="all")
    return factory(run_dir=run_dir, job_type=job_type, config=config, private=private)


class Tracker:
    """`logger=none`: the local mirror (metrics.jsonl) only; the base of every tracker.

    A subclass calls `super()` in each method it extends, so the mirror stays the same
    whatever tracker runs. `log_artifact` / `use_artifact` name a stage's public outputs and
    inputs: {name in the artifact: local path}; the mirror does not record them."""

    def __init__(self, run_dir, job_type: str = "generate", config: dict | None = None, private: bool = False):
        self.run_dir = Path(run_dir)
        self.job_type, self.config, self.private = job_type, config, private
        self.local = self.run_dir / "metrics.jsonl"
        self._recover()

    def log(self, metrics: dict, step: int | None = None, kind: str = "step") -> None:
        self._mirror({"kind": kind, **({"step": step} if step is not None else {}), **metrics})

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        """Final values: a kind=summary record in the mirror (a tracker's run summary, not a
        history step). Lists and dicts (per-class accuracy, the confusion matrix) go too."""
        self._mirror({"kind": "summary", **metrics})

    def log_artifact(self, name: str, type: str, files: dict, metadata: dict | None = None) -> None:
        """A public output of this stage (the release, the synthetic set, the metrics)."""

    def use_artifact(self, name: str, type: str, files: dict, metadata: dict | None = None) -> None:
        """An input this stage read (the release it matched, the set it trained on)."""

    def close(self, exit_code: int = 0) -> None:
        pass

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
        self._marked = True

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
        # the start mark is written with the first record, not here: a stage that fails on bad
        # input before logging anything leaves no file behind
        self._marked = False

    def _mirror(self, rec: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self._marked:  # what follows belongs to this (unfinished) work until commit()
            self.commit()
        with open(self.local, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=_num) + "\n")


class WandbTracker(Tracker):
    """`logger=wandb`: one W&B run per run dir and stage, beside the local mirror."""

    def __init__(
        self,
        run_dir,
        job_type: str = "generate",
        config: dict | None = None,
        private: bool = False,
        mode: str | None = None,
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags=(),
    ):
        if mode is not None and str(mode) not in MODES:
            raise ValueError(f"logger.mode={mode!r} unknown; accepted: {', '.join(MODES)}")
        super().__init__(run_dir, job_type, config, private)
        self.run = None
        self._pending: list | None = None  # W&B calls queued by a private stage (below)
        ident = run_identity(job_type, config)
        self.name = ident["name"]
        self.group = group if group is not None else (default_group() or ident["experiment"] or self._pipeline_group())
        # explicit config > W&B's own env vars > gmtext's defaults (offline: no account needed)
        self.mode = str(mode) if mode is not None else (os.environ.get("WANDB_MODE") or "offline")
        self.project = project if project is not None else (os.environ.get("WANDB_PROJECT") or "gmtext")
        if self.mode == "disabled":
            return
        self._start_args = (entity, job_type, tags, config, ident)
        # A stage that runs a DP mechanism: W&B starts when the stage closes and replays what was
        # logged. Each W&B row carries its wall-clock time and the run its duration, and how long
        # the mechanism took depends on the private records (how many, how long, how many were
        # Poisson-sampled): a run that starts after the mechanism records none of that.
        if private:
            self._pending = []
        else:
            self._start()

    def _start(self) -> None:
        import wandb

        entity, job_type, tags, config, ident = self._start_args
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # and no console capture or CPU/memory curve, which follow the mechanism's progress
        settings = wandb.Settings(console="off", x_disable_stats=True) if self.private else None
        self.run = wandb.init(
            project=self.project,
            entity=entity,
            group=self.group,
            job_type=job_type,
            tags=list(tags),
            name=self.name,
            id=stable_run_id(self.run_dir, job_type),
            resume="allow",
            config=stage_config(job_type, config, ident),
            dir=str(self.run_dir),
            mode=self.mode,
            reinit="create_new",
            settings=settings,
        )
        for key in HIDDEN:
            self.run.define_metric(key, hidden=True)
        for glob, step in STEP_METRICS:
            self.run.define_metric(glob, step_metric=step)

    def _defer(self, method: str, *args) -> bool:
        """Queue a W&B call of a private stage for close(); False when W&B is live (or off)."""
        if self._pending is None:
            return False
        self._pending.append((method, args))
        return True

    def _pipeline_group(self) -> str | None:
        """A pipeline job outside a sweep and without an experiment: its run dir, so the runs of
        its stages fold into one group."""
        if (self.config or {}).get("stage") != "pipeline":
            return None
        try:
            return str(self.run_dir.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return self.run_dir.name

    def log(self, metrics: dict, step: int | None = None, kind: str = "step") -> None:
        super().log(metrics, step, kind)
        if kind != "failed" and self._defer("_w_log", metrics, step):
            return
        self._w_log(metrics, step, kind)

    def _w_log(self, metrics: dict, step: int | None, kind: str = "step") -> None:
        if self.run is not None and kind != "failed":  # a failed batch is in the summary (failed_batches)
            self.run.log(*_wandb_row(metrics, step))

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if not self._defer("_w_table", key, columns, rows):
            self._w_table(key, columns, rows)

    def _w_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict) -> None:
        super().summary(metrics)
        if not self._defer("_w_summary", metrics):
            self._w_summary(metrics)

    def _w_summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def log_artifact(self, name: str, type: str, files: dict, metadata: dict | None = None) -> None:
        if not self._defer("_w_log_artifact", name, type, files, metadata):
            self._w_log_artifact(name, type, files, metadata)

    def _w_log_artifact(self, name: str, type: str, files: dict, metadata: dict | None = None) -> None:
        if self.run is None:
            return
        art = self._artifact(name, type, metadata)
        for arcname, path in files.items():
            art.add_file(str(path), name=arcname)
        self.run.log_artifact(art)

    def use_artifact(self, name: str, type: str, files: dict, metadata: dict | None = None) -> None:
        if not self._defer("_w_use_artifact", name, type, files, metadata):
            self._w_use_artifact(name, type, files, metadata)

    def _w_use_artifact(self, name: str, type: str, files: dict, metadata: dict | None = None) -> None:
        """By file:// reference: nothing is uploaded, and the entries' digests (md5 of the
        files) equal those of the uploaded version, so the manifest digest does too and W&B
        resolves the input to the version the producing run logged."""
        if self.run is None:
            return
        art = self._artifact(name, type, metadata)
        for arcname, path in files.items():
            art.add_reference(Path(path).resolve().as_uri(), name=arcname)
        if self.mode == "offline":
            # run.use_artifact refuses offline; this is what it does online with a new artifact:
            # log it marked to be used after commit (wandb sync then records the use)
            self.run._log_artifact(art, is_user_created=True, use_after_commit=True)
        else:
            self.run.use_artifact(art)

    @staticmethod
    def _artifact(name: str, type: str, metadata: dict | None):
        import wandb

        meta = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in (metadata or {}).items()}
        return wandb.Artifact(name, type=type, metadata=meta)

    def close(self, exit_code: int = 0) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._start()
            for method, args in pending:
                getattr(self, method)(*args)
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


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
