"""Experiment tracking: W&B (online/offline/disabled) or none, always mirrored locally.

Every logged record is also appended to `metrics.jsonl` in the run dir, so results are
readable without W&B and `gmtext-report` has one format to read. Stages `commit(outputs)`
the mirror before each unit of work (a generated batch, a stage's summary); a new Tracker
drops what a killed attempt logged for work whose outputs never appeared (and a torn last
line), so a resumed run's metrics.jsonl reads like an uninterrupted run's.

One W&B run per Hydra job (`reinit="create_new"`, finished in `close()`), so the jobs of
a multirun executed in one process never share a run. Runs of one sweep share a W&B
`group` (default: the sweep dir's name under `-m`; `logger.group` overrides it) and
`job_type` is the stage. See docs/tracking.md.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .artifacts import other_writers, write_text

COMMIT_FILE = ".metrics.jsonl.commit"  # length of metrics.jsonl at the last commit(), and that work's outputs


def default_group() -> str | None:
    """The Hydra sweep dir's name when running under -m, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN and hc.sweep.dir:
            return Path(str(hc.sweep.dir)).name
    except Exception:  # no Hydra context (library use, tests): no group
        return None
    return None


class Tracker:
    def __init__(self, run_dir, name: str = "none", mode: str = "offline", project: str = "gmtext", entity: str | None = None, group: str | None = None, tags=(), job_type: str = "generate", config: dict | None = None):
        if name not in ("wandb", "none"):
            raise ValueError(f"logger.name={name!r} unknown; accepted: wandb, none")
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode={mode!r} unknown; accepted: online, offline, disabled")
        self.run_dir = Path(run_dir)
        self.local = self.run_dir / "metrics.jsonl"
        self._recover()
        self.run = None
        self.group = group if group is not None else default_group()
        if name == "wandb" and mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=project, entity=entity, group=self.group, job_type=job_type, tags=list(tags),
                config=config, dir=str(self.run_dir), mode=mode, reinit="create_new",
            )

    def log(self, metrics: dict, step: int | None = None, kind: str = "step") -> None:
        self._mirror({"kind": kind, **({"step": step} if step is not None else {}), **metrics})
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if _is_num(v)}, step=step)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict) -> None:
        """Final values: the local mirror gets a kind=summary record, W&B the run summary
        (not a history step)."""
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


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)
