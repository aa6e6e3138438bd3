"""Generate: release (or load one) → GRADMM per batch → synthetic.jsonl.

Work is split into batches (B sequences for every class, optimised together). Each
finished batch is written atomically to batches/batch_XXXXX.jsonl with its own seed, so
a killed run resumes after the last finished batch and ends with the same file as an
uninterrupted run.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..config import build
from ..artifacts import read_jsonl, run_lock, write_json, write_jsonl
from ..data import Task
from ..gradients import MatchedParams
from ..matching.objective import MatchingObjective
from ..matching.projectors import ProjectionContext
from ..matching.vocab import allowed_token_ids
from ..models import check_fits_context, load_model
from ..sketch import expand_specs
from ..tracking import Tracker
from .release import Release, load_or_make_release

SYNTHETIC_FILE = "synthetic.jsonl"


def batch_seed(seed: int, batch: int) -> int:
    # Independent of shard layout and of which batches already exist: resume-safe.
    return (seed * 1_000_003 + batch * 7919) % (2**63 - 1)


def build_task(cfg: DictConfig, tokenizer) -> Task:
    ds = cfg.dataset
    return Task(tokenizer, ds.template, list(ds.label_names), list(ds.verbalizers), start_token=cfg.model.start_token)


def load_generator_model(cfg: DictConfig):
    m = cfg.model
    return load_model(m.name, device=m.device, dtype=m.dtype, attn_implementation=m.attn_implementation, tiny_hidden=m.tiny_hidden, tiny_layers=m.tiny_layers)


def obtain_release(cfg: DictConfig, run_dir: Path, lm, task: Task, matched: MatchedParams) -> Release:
    """Load the configured release, resume the run dir's own, or make one from real data."""
    return load_or_make_release(cfg, run_dir / "release", lm, task, matched, existing=cfg.release)[0]


def run_generate(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Generate the synthetic set into run_dir; returns summary metrics."""
    run_dir = Path(run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.shard.count < 1 or not 0 <= cfg.shard.index < cfg.shard.count:
        raise ValueError(f"shard.index={cfg.shard.index} / shard.count={cfg.shard.count}: need 0 <= index < count")
    if cfg.num_per_class < 1 or cfg.batch_size < 1:
        raise ValueError(f"num_per_class={cfg.num_per_class} and batch_size={cfg.batch_size} must be >= 1")
    projector = build(cfg.projector)
    matcher = build(cfg.matcher)
    with run_lock(run_dir, "generate"):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        lm = load_generator_model(cfg)
        model, tok = lm.model, lm.tokenizer
        task = build_task(cfg, tok)
        length = cfg.dataset.length
        context_ids = task.lm_context_ids(cfg.dataset.lm_context)
        check_fits_context(model, "dataset.length", length, len(context_ids) + len(task.suffix_ids))
        emb = model.get_input_embeddings().weight
        ctx = ProjectionContext(model, emb, allowed_token_ids(tok, emb.shape[0]), context_ids)
        if hasattr(projector, "check"):
            projector.check(ctx)  # before the release: a bad setting must not cost a pass over real data
        matched = MatchedParams(model, expand_specs(cfg.matched_params, cfg.get("sketch")))
        release = obtain_release(cfg, run_dir, lm, task, matched)
        obj = MatchingObjective(model, matched, release.targets, task.label_token_ids, task.prefix_ids, task.suffix_ids, distance=matcher.distance, closed_form=matcher.closed_form, context_ids=ctx.prefix_ids, match_loss=cfg.match_loss)
        tracker = Tracker(run_dir, job_type="generate", config=OmegaConf.to_container(cfg, resolve=True), **cfg.logger)
        with tracker:  # finishes the W&B run (marked failed on an exception)
            summary = _generate_batches(cfg, run_dir, task, tok, obj, projector, matcher, ctx, tracker, length, release)
            summary["epsilon"] = release.epsilon  # inf for a non-private release
            summary["delta"] = float(release.privacy.get("delta", 0.0))
            summary["wall_seconds"] = time.perf_counter() - t0
            tracker.commit(run_dir / "generate.json")
            tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        write_json(run_dir / "generate.json", {"config": OmegaConf.to_container(cfg, resolve=True), "summary": summary, "privacy": release.privacy})
        tracker.commit()
    return summary


def _batch_file(bdir: Path, b: int, failed: bool = False) -> Path:
    return bdir / (f"batch_{b:05d}.failed.json" if failed else f"batch_{b:05d}.jsonl")


def _generate_batches(cfg, run_dir, task, tok, obj, projector, matcher, ctx, tracker, length, release) -> dict:
    c = task.num_classes
    nb = math.ceil(cfg.num_per_class / cfg.batch_size)
    mine = [b for b in range(nb) if b % cfg.shard.count == cfg.shard.index]
    bdir = run_dir / "batches"
    timings, retries = [], 0
    # A batch marked failed is final too (same seed, same failure): delete its .failed.json to retry it.
    todo = [b for b in mine if not _batch_file(bdir, b).exists() and not _batch_file(bdir, b, failed=True).exists()]
    bar = tqdm(todo, desc="generate", unit="batch", disable=not cfg.progress)
    for b in bar:
        bsz = min(cfg.batch_size, cfg.num_per_class - b * cfg.batch_size)
        gen = torch.Generator().manual_seed(batch_seed(cfg.seed, b))
        torch.manual_seed(batch_seed(cfg.seed, b))
        step0 = b * (matcher.outer_steps + 1)
        tracker.commit(_batch_file(bdir, b), _batch_file(bdir, b, failed=True))  # this batch's records go with its file

        def on_step(rec, b=b, step0=step0):
            tracker.log({"batch": b, **rec}, step=step0 + rec["outer_step"])
            bar.set_postfix(step=rec["outer_step"], loss=f"{rec['best_discrete_loss']:.4f}")

        try:
            res = matcher.run(obj, projector, ctx, c, bsz, length, gen, on_step)
        except FloatingPointError as e:  # non-finite even after the matcher's smaller-step retries
            _record_failed(bdir, b, str(e), tracker)
            continue
        rows = []
        for k in range(c):
            for i in range(bsz):
                text = tok.decode(res.tokens[k, i].tolist(), skip_special_tokens=True).strip()
                rows.append({
                    "text": text, "label": k, "label_name": task.label_names[k],
                    "match_loss": float(res.seq_loss[k, i]), "perplexity": float(res.perplexity[k, i]),
                    "batch": b, "class_batch_loss": float(res.class_loss[k]),
                })
        if not all(math.isfinite(r["match_loss"]) for r in rows):
            _record_failed(bdir, b, "non-finite matching loss of the projected text; check the release (targets.pt)", tracker)
            continue
        write_jsonl(_batch_file(bdir, b), rows)
        tracker.table(f"synthetic/batch_{b}", ["text", "label_name", "match_loss", "perplexity"], [[r["text"], r["label_name"], r["match_loss"], r["perplexity"]] for r in rows])
        timings.append(res.timings)
        retries += sum(h.get("x_step_retries", 0) for h in res.history)
    failed = [b for b in mine if _batch_file(bdir, b, failed=True).exists()]
    rows = [r for b in mine if b not in failed for r in read_jsonl(_batch_file(bdir, b))]
    if not rows:
        raise ValueError(f"every batch failed ({len(failed)}, see {bdir}/*.failed.json): non-finite matching loss or gradient; "
                         "lower matcher.lr or check the release")
    write_jsonl(run_dir / SYNTHETIC_FILE, rows)
    summary = {
        "examples": len(rows),
        "batches": len(mine),
        "batches_generated_now": len(todo),
        "failed_batches": failed,
        "x_step_retries": retries,
        "mean_match_loss": sum(r["match_loss"] for r in rows) / len(rows),
        "mean_class_batch_loss": sum(r["class_batch_loss"] for r in rows) / len(rows),
        "mean_perplexity": sum(r["perplexity"] for r in rows) / len(rows),
        "timings": {k: sum(t.get(k, 0.0) for t in timings) for k in ("init", "project", "x_step", "evaluate", "total")},
    }
    return summary


def _record_failed(bdir: Path, b: int, reason: str, tracker) -> None:
    """A batch whose optimisation went non-finite writes no text: a marker, in the outputs."""
    tracker.log({"batch": b, "failed": reason}, kind="failed")
    write_json(_batch_file(bdir, b, failed=True), {"batch": b, "reason": reason})
