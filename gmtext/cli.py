"""Console entry points: thin @hydra.main wrappers around pure stage functions.

Known user errors (bad config values, missing data, locked run dirs, mismatched
releases) end with one line on stderr and exit code 2, not a traceback.
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import register_configs

register_configs()
CONF = "pkg://gmtext.conf"
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, PermissionError, OSError)


def _run(stage: str, fn, cfg: DictConfig):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        return fn(cfg, run_dir)
    except USER_ERRORS as e:
        if os.environ.get("GMTEXT_TRACEBACK"):
            raise
        print(f"gmtext-{stage}: error: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF, config_name="generate")
def generate_main(cfg: DictConfig) -> float:
    from .stages.generate import run_generate

    summary = _run("generate", run_generate, cfg)
    print(f"gmtext-generate: {summary['examples']} examples → {HydraConfig.get().runtime.output_dir}/synthetic.jsonl | "
          f"mean match loss {summary['mean_match_loss']:.4f} | mean perplexity {summary['mean_perplexity']:.1f} | "
          f"{summary['wall_seconds']:.0f} s")
    return summary["mean_match_loss"]


@hydra.main(version_base="1.3", config_path=CONF, config_name="release")
def release_main(cfg: DictConfig) -> float:
    from .stages.release import run_release

    s = _run("release", run_release, cfg)
    sigma = f" | sigma {s['sigma']:.3g}" if s.get("sigma") is not None else ""
    took = "reused" if s["reused"] else "{:.1f} s".format(s["release_seconds"])
    print(f"gmtext-release: {s['mechanism']} release (epsilon={s['epsilon']:.4g}{sigma}) → {s['release_dir']} | {took}")
    return s["epsilon"]


@hydra.main(version_base="1.3", config_path=CONF, config_name="audit")
def audit_main(cfg: DictConfig) -> float:
    from .privacy.audit import run_audit

    s = _run("audit", run_audit, cfg)
    print(f"gmtext-audit: longest common n-gram {s['longest_common_ngram']} | {s['share_with_real_ngram']:.1%} share a real "
          f"{s['ngram']}-gram | median nearest-real cosine {s['nearest_real_cosine']['median']:.3f} → {HydraConfig.get().runtime.output_dir}/audit.md")
    return s["share_with_real_ngram"]


@hydra.main(version_base="1.3", config_path=CONF, config_name="finetune")
def finetune_main(cfg: DictConfig) -> float:
    from .stages.finetune import run_finetune

    m = _run("finetune", run_finetune, cfg)
    eps = f" | epsilon {m['epsilon']:.3g}" if m.get("epsilon") is not None else ""
    dev = f" | dev acc {m['dev_accuracy']:.1%}" if m.get("dev_accuracy") is not None else ""
    print(f"gmtext-finetune: {m['train_source']} (n={m['n_train']}) | {m['splits']['accuracy']} accuracy {m['accuracy']:.1%} | "
          f"macro-F1 {m['macro_f1']:.3f}{dev}{eps} | {m['wall_seconds']:.0f} s → {HydraConfig.get().runtime.output_dir}/metrics.json")
    return m["accuracy"]


def report_main() -> None:
    """gmtext-report DIR... [-o OUT]: plain argparse (it takes paths, not a config)."""
    from .stages.report import main

    sys.exit(main())


def merge_main() -> None:
    """gmtext-merge OUT_DIR SHARD_DIR...: join generate shards (argparse, like report)."""
    from .stages.merge import main

    sys.exit(main())


@hydra.main(version_base="1.3", config_path=CONF, config_name="select")
def select_main(cfg: DictConfig) -> int:
    from .stages.select import run_select

    s = _run("select", run_select, cfg)
    print(f"gmtext-select: {s['selected']} of {s['pool']} examples → {HydraConfig.get().runtime.output_dir}/selected.jsonl "
          f"| per class {s['per_class']} | mean match loss {s['mean_match_loss']:.4f}")
    return s["selected"]


@hydra.main(version_base="1.3", config_path=CONF, config_name="pipeline")
def pipeline_main(cfg: DictConfig) -> float:
    from .stages.pipeline import run_pipeline

    m = _run("pipeline", run_pipeline, cfg)
    print(f"gmtext-pipeline: accuracy {m['accuracy']:.4f} on {m.get('splits', {}).get('accuracy', 'eval')} "
          f"| {m['selection']['selected']} synthetic examples | epsilon {m['generation'].get('epsilon')} → {HydraConfig.get().runtime.output_dir}/metrics.json")
    return m["accuracy"]

