"""Experiment tracking: W&B (online/offline/disabled) or none, always mirrored locally.

Every logged record is also appended to `metrics.jsonl` in the run dir, so results are
readable without W&B and `gmtext-report` has one format to read.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class Tracker:
    def __init__(self, run_dir, name: str = "none", mode: str = "offline", project: str = "gmtext", entity: str | None = None, group: str | None = None, tags=(), job_type: str = "generate", config: dict | None = None):
        if name not in ("wandb", "none"):
            raise ValueError(f"logger.name={name!r} unknown; accepted: wandb, none")
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode={mode!r} unknown; accepted: online, offline, disabled")
        self.run_dir = Path(run_dir)
        self.local = self.run_dir / "metrics.jsonl"
        self.run = None
        if name == "wandb" and mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=project, entity=entity, group=group, job_type=job_type, tags=list(tags),
                config=config, dir=str(self.run_dir), mode=mode, reinit="create_new",
            )

    def log(self, metrics: dict, step: int | None = None, kind: str = "step") -> None:
        rec = {"kind": kind, **({"step": step} if step is not None else {}), **metrics}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.local, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=_num) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics: dict) -> None:
        self.log(metrics, kind="summary")
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _num(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)
