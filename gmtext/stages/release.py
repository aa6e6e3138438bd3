"""The release: the only stage that reads private real examples.

It turns real data into per-class target gradients with the configured privacy mechanism
(gmtext/privacy/release.py: noisy and accounted under privacy=dp) and writes them with a
privacy ledger to <run dir>/release. Everything downstream receives a `Release`.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from ..artifacts import RESUME_FREE_KEYS, check_resume, record_config, run_lock, write_json
from ..privacy.release import META_FILE
from ..runtime import (
    PROBE_DIR,
    build_task,
    load_generator_model,
    load_or_make_release,
    makes_dp_release,
    matched_params,
    privacy_mechanism,
    release_artifact,
    start,
)
from ..tracking import make_tracker

# Settings run_release does not read: a run dir's release is reused across them (a pipeline
# resumed with a larger num_per_class grows its pool from the same release).
NOT_READ_BY_RELEASE = frozenset(
    {
        "matcher",
        "projector",
        "num_per_class",
        "batch_size",
        "selector",
        "pool",
        "finetuner",
        "train",
        "finetune",
        "shard",
        "release",
    }
)


def run_release(cfg, run_dir) -> dict:
    """gmtext-release: real data → run_dir/release (targets.pt, privacy.json, release.json).

    An existing complete release in run_dir is reused, never redone: a second noisy release
    of the same data would spend the privacy budget again."""
    run_dir = Path(run_dir)
    out = run_dir / "release"
    privacy_mechanism(cfg)  # a bad privacy setting fails before the lock and the model
    config = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(run_dir, "release"):
        # the release in run_dir is reused: only under the settings it was made with
        check_resume(run_dir, "release", config, free=RESUME_FREE_KEYS | NOT_READ_BY_RELEASE)
        # before the model: a failed load or release ends the tracker's run as failed
        with make_tracker(cfg.logger, run_dir, "release", config, private=makes_dp_release(cfg, out)) as tracker:
            t0 = time.perf_counter()
            start(cfg)
            lm = load_generator_model(cfg)
            task = build_task(cfg, lm.tokenizer)
            matched = matched_params(cfg, lm.model)
            t_load = time.perf_counter() - t0
            rel, reused = load_or_make_release(cfg, out, lm, task, matched)
            record_config(run_dir, "release", config)
            summary = {
                "release_dir": str(out),
                "reused": reused,
                "epsilon": rel.epsilon,
                "delta": rel.privacy.get("delta"),
                "mechanism": rel.privacy.get("mechanism"),
                "sigma": rel.privacy.get("sigma"),
                "divisors": rel.divisors,
                "num_params": sum(t.numel() for t in rel.targets[0]),
                "model_load_seconds": t_load,
            }
            if (run_dir / PROBE_DIR / META_FILE).exists():
                summary["probe_dir"] = str(run_dir / PROBE_DIR)
            if (
                rel.privacy.get("mechanism") == "none"
            ):  # a DP release's run time depends on the private records: not published
                summary["wall_seconds"] = time.perf_counter() - t0
            write_json(run_dir / "release_summary.json", summary)
            tracker.summary({k: v for k, v in summary.items() if k not in ("release_dir", "probe_dir")})
            tracker.commit()
            for d, kind in ((out, "release"), (run_dir / PROBE_DIR, "probe")):  # the probe: made with it, same budget
                if (art := release_artifact(cfg, d, kind)) is not None:
                    tracker.log_artifact(art[0], kind, art[1], art[2])
    return summary
