"""Pipeline: release → generate → select → fine-tune + evaluate, in one run dir.

Each stage is its own tracked run (W&B: one run per stage, named after the job, linked by
the artifacts each stage logs and uses; docs/tracking.md), as when they run one by one.

With `probe.matched_params` the release stage also makes the probe release (same records,
one budget) into <run dir>/probe, and `selector=margin` scores the pool against it.
A generator that needs no release (generator=pe: its private step is inside generation) skips
the release stage.

Each stage is the same function its own entry point runs, and each resumes: generation
skips finished batches, selection is a pure function of the pool, fine-tuning returns the
stored metrics.json when it already exists for the same config. Each stage also refuses a
run dir whose output came from another config (generate's check, the strictest, runs
before the release stage), so a rerun with other settings stops with one line instead of
mixing the two.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..artifacts import read_json, write_json
from ..config import build
from ..runtime import PROBE_DIR, training_source
from ..stages.finetune import run_finetune
from ..stages.generate import check_generate_resume, run_generate
from ..stages.release import run_release
from ..stages.select import run_select
from ..readability import KEYS as READABILITY_KEYS


def run_pipeline(cfg: DictConfig, run_dir) -> dict:
    run_dir = Path(run_dir)
    source = training_source(cfg).name
    if source != "synthetic":
        raise ValueError(
            f"gmtext-pipeline fine-tunes on its own synthetic set; train={source!r} belongs to gmtext-finetune"
        )
    uses_release = (
        getattr(build(cfg.generator, drop=("name",)), "uses_release", True)
        if cfg.get("generator") is not None
        else True
    )
    if "release" in cfg.selector.keys() and not cfg.selector.release:  # selector=margin scoring its own probe
        if not uses_release:
            raise ValueError(
                f"generator={cfg.generator.get('name')} makes no release, so there is no probe for selector=margin to "
                "score against; accepted: selector=best | none (or selector.release=<probe release dir>)"
            )
        if not cfg.probe.matched_params:
            raise ValueError(
                "selector=margin in gmtext-pipeline needs probe.matched_params=[...] (a probe release made with "
                "the generator's, from the same budget) or selector.release=<probe release dir>"
            )
        cfg = cfg.copy()
        OmegaConf.update(cfg, "selector.release", str(run_dir / PROBE_DIR))
    check_generate_resume(run_dir, cfg, OmegaConf.to_container(cfg, resolve=True))  # before any stage writes
    if not cfg.release and uses_release:  # its own stage (and tracked run); generate then reads run_dir/release
        run_release(cfg, run_dir)
    gen = run_generate(cfg, run_dir)
    sel_cfg = cfg.copy()
    OmegaConf.update(sel_cfg, "pool", str(run_dir), force_add=False)
    sel = run_select(sel_cfg, run_dir)
    ft_cfg = cfg.copy()
    OmegaConf.update(ft_cfg, "train.path", str(run_dir / "selected.jsonl"))
    run_finetune(ft_cfg, run_dir)
    metrics = read_json(run_dir / "metrics.json")
    metrics["generation"] = {
        k: gen[k] for k in ("examples", "mean_match_loss", "mean_perplexity", "epsilon", "delta") if k in gen
    }
    metrics["selection"] = {
        k: sel[k] for k in ("pool", "selected", "mean_match_loss", "mean_perplexity", *READABILITY_KEYS) if k in sel
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics
