"""Generate: release (or load one) → GRADMM per batch → synthetic.jsonl.

Work is split into batches (B sequences for every class, optimised together). Each
finished batch is written atomically to batches/batch_XXXXX.jsonl with its own seed, so
a killed run resumes after the last finished batch and ends with the same file as an
uninterrupted run. It resumes only under the config those batches were made with
(generate.config.json, written before the release and the first batch): another config
would keep old batches or mix seeds, so it is refused (artifacts.check_resume).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..config import build
from ..artifacts import (
    RESUME_FREE_KEYS,
    check_resume,
    config_record,
    read_json,
    read_jsonl,
    record_config,
    run_lock,
    write_json,
    write_jsonl,
)
from ..matching.objective import MatchingObjective
from ..matching.projectors import ProjectionContext
from ..matching.vocab import allowed_token_ids
from ..models import check_fits_context, quiet_kv_cache_rename
from ..evolution.pe import IterationResult, Population, PrivateEvolution, noisy_share, top_per_class
from ..evolution.privacy import pe_budget, pe_privacy, pe_vote
from ..privacy.accountant import epsilon_for
from ..privacy.release import Release
from ..runtime import (
    build_task,
    inclusion_rule,
    load_generator_model,
    load_or_make_release,
    makes_dp_release,
    matched_params,
    protected_split_id,
    release_artifact,
    select_real_examples,
    start,
    synthetic_artifact,
)
from ..tracking import make_tracker

SYNTHETIC_FILE = "synthetic.jsonl"


def batch_seed(seed: int, batch: int) -> int:
    # Independent of shard layout and of which batches already exist: resume-safe.
    return (seed * 1_000_003 + batch * 7919) % (2**63 - 1)


def run_generate(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Generate the synthetic set into run_dir; returns summary metrics."""
    run_dir = Path(run_dir)
    if cfg.shard.count < 1 or not 0 <= cfg.shard.index < cfg.shard.count:
        raise ValueError(f"shard.index={cfg.shard.index} / shard.count={cfg.shard.count}: need 0 <= index < count")
    if cfg.num_per_class < 1 or cfg.batch_size < 1:
        raise ValueError(f"num_per_class={cfg.num_per_class} and batch_size={cfg.batch_size} must be >= 1")
    generator = build(cfg.generator, drop=("name",)) if cfg.get("generator") is not None else None
    if generator is not None and not generator.uses_release:  # generator=pe: no gradient release (docs/pe.md)
        return run_private_evolution(cfg, Path(run_dir), generator)
    projector = build(cfg.projector)
    matcher = build(cfg.matcher)
    config = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(run_dir, "generate"):
        stored = check_generate_resume(run_dir, cfg, config)  # before the model: a refusal costs nothing
        if stored is not None and cfg.num_per_class > int(
            stored["num_per_class"]
        ):  # the record names the largest pool its batches hold
            write_json(config_record(run_dir, "generate"), {**stored, "num_per_class": int(cfg.num_per_class)})
        release_dir = Path(cfg.release) if cfg.release else run_dir / "release"
        # before the model and the release: a failure in either ends the tracker's run as failed
        with make_tracker(
            cfg.logger, run_dir, "generate", config, private=makes_dp_release(cfg, release_dir)
        ) as tracker:
            t0 = time.perf_counter()
            start(cfg)
            lm = load_generator_model(cfg)
            model, tok = lm.model, lm.tokenizer
            task = build_task(cfg, tok)
            length = cfg.dataset.length
            context_ids = task.lm_context_ids(cfg.dataset.lm_context)
            class_ids = None  # public class prompts the starts are written after (matcher.init=class_prompt)
            if getattr(matcher, "init", None) == "class_prompt":
                class_ids = task.class_prompt_ids(
                    matcher.init_prompt, cfg.dataset.lm_context, cfg.dataset.label_descriptions
                )
            longest = max(map(len, [context_ids, *(class_ids or [])]))
            check_fits_context(model, "dataset.length", length, longest + len(task.suffix_ids))
            emb = model.get_input_embeddings().weight
            ctx = ProjectionContext(model, emb, allowed_token_ids(tok, emb.shape[0]), context_ids, class_ids)
            if hasattr(projector, "check"):
                projector.check(ctx)  # before the release: a bad setting must not cost a pass over real data
            matched = matched_params(cfg, model)
            release, made = _obtain_release_recorded(cfg, run_dir, lm, task, matched, config)
            art = release_artifact(cfg, release_dir)
            if art is not None:  # made here: this run's output; else an input (linked to its producer's version)
                (tracker.log_artifact if made else tracker.use_artifact)(art[0], "release", art[1], art[2])
            if release.privacy.get("mechanism") != "none":
                t0 = time.perf_counter()  # a DP release's run time depends on the private records: not in the wall time
            obj = MatchingObjective(
                model,
                matched,
                release.targets,
                task.label_token_ids,
                task.prefix_ids,
                task.suffix_ids,
                distance=matcher.distance,
                closed_form=matcher.closed_form,
                context_ids=ctx.prefix_ids,
                match_loss=cfg.match_loss,
                contrastive=matcher.contrastive,
                seq_chunk=matcher.seq_chunk,
            )
            summary = _generate_batches(
                cfg, run_dir, _Matching(task, tok, obj, projector, matcher, ctx, length), tracker
            )
            summary["epsilon"] = release.epsilon  # inf for a non-private release
            summary["delta"] = float(release.privacy.get("delta", 0.0))
            summary["wall_seconds"] = time.perf_counter() - t0
            tracker.commit(run_dir / "generate.json")
            tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            write_json(run_dir / "generate.json", {"config": config, "summary": summary, "privacy": release.privacy})
            tracker.commit()
            tracker.log_artifact(*synthetic_artifact(cfg, run_dir / SYNTHETIC_FILE))
    return summary


def check_generate_resume(run_dir: Path, cfg: DictConfig, config: dict) -> dict | None:
    """Refuse (ConfigChanged) a run dir whose batches were made with another config; returns
    the stored config (None: nothing generated there yet). gmtext-pipeline calls it before its
    release stage too, so a changed setting stops the pipeline before any stage runs."""
    stored = _stored_config(run_dir)
    if stored is not None:
        free = RESUME_FREE_KEYS | ({"num_per_class"} if pool_grows_cleanly(stored, cfg) else set())
        check_resume(run_dir, "generate", config, stored=stored, free=free)
    return stored


def _stored_config(run_dir: Path) -> dict | None:
    """The config the run dir's batches were made with: the record written before the first
    one, else (a run dir from before records existed) the finished run's generate.json."""
    if config_record(run_dir, "generate").exists():
        return read_json(config_record(run_dir, "generate"))
    if (run_dir / "generate.json").exists():
        return read_json(run_dir / "generate.json").get("config")
    return None


def pool_grows_cleanly(stored: dict, cfg: DictConfig) -> bool:
    """True when only a larger (or smaller) num_per_class separates this run from the stored
    one and every batch both runs share has the same size in each: batch b's seed depends on
    (seed, b) alone, so resuming then ends with exactly what an uninterrupted run with the
    new num_per_class writes (growing a pool from 100 to 150 per class reuses batches 0-9).
    A partial last batch (num_per_class not a multiple of batch_size) would not be. `stored`
    names the largest pool generated in the run dir (a grown pool updates its record), so
    batches left by a larger earlier run count too."""
    old, new, bs = int(stored.get("num_per_class", -1)), int(cfg.num_per_class), int(cfg.batch_size)
    return stored.get("batch_size") == bs and old > 0 and min(old, new) % bs == 0


def _obtain_release_recorded(cfg, run_dir: Path, lm, task, matched, config: dict) -> tuple[Release, bool]:
    """(the release, whether this call made it), with the config recorded before anything is written into run_dir (the
    release in run_dir/release depends on seed, real_per_class, privacy, ...: a later run with
    other settings must not resume on it). A record this call created goes again when the
    release fails, since then nothing was written that a resume could reuse."""
    fresh = record_config(run_dir, "generate", config)
    try:
        # the configured release, the run dir's own (resumed), or one made from real data
        rel, reused = load_or_make_release(cfg, run_dir / "release", lm, task, matched, existing=cfg.release)
        return rel, not reused
    except BaseException:
        if fresh:
            config_record(run_dir, "generate").unlink(missing_ok=True)
        raise


def _batch_file(bdir: Path, b: int, failed: bool = False) -> Path:
    return bdir / (f"batch_{b:05d}.failed.json" if failed else f"batch_{b:05d}.jsonl")


@dataclass
class _Matching:
    """What every batch of one run shares, built once per run from the model and the release."""

    task: Any
    tok: Any
    obj: MatchingObjective
    projector: Any
    matcher: Any
    ctx: ProjectionContext
    length: int


def _generate_batches(cfg, run_dir: Path, m: _Matching, tracker) -> dict:
    """This shard's batches not yet on disk, each written atomically, then the pool of every
    finished batch as synthetic.jsonl; returns the summary of that pool."""
    nb = math.ceil(cfg.num_per_class / cfg.batch_size)
    mine = [b for b in range(nb) if b % cfg.shard.count == cfg.shard.index]
    bdir = run_dir / "batches"
    timings, retries = [], 0
    # A batch marked failed is final too (same seed, same failure): delete its .failed.json to retry it.
    todo = [b for b in mine if not _batch_file(bdir, b).exists() and not _batch_file(bdir, b, failed=True).exists()]
    bar = tqdm(todo, desc="generate", unit="batch", disable=not cfg.progress)
    for b in bar:
        tracker.commit(_batch_file(bdir, b), _batch_file(bdir, b, failed=True))  # this batch's records go with its file
        out = _match_batch(cfg, m, b, tracker, bar)
        if isinstance(out, str):
            _record_failed(bdir, b, out, tracker)
            continue
        rows, res = out
        write_jsonl(_batch_file(bdir, b), rows)
        timings.append(res.timings)
        retries += sum(h.get("x_step_retries", 0) for h in res.history)
    failed = [b for b in mine if _batch_file(bdir, b, failed=True).exists()]
    rows = [r for b in mine if b not in failed for r in read_jsonl(_batch_file(bdir, b))]
    if not rows:
        raise ValueError(
            f"every batch failed ({len(failed)}, see {bdir}/*.failed.json): non-finite matching loss or gradient; "
            "lower matcher.lr or check the release"
        )
    write_jsonl(run_dir / SYNTHETIC_FILE, rows)
    tracker.table(
        "synthetic",
        ["text", "label_name", "match_loss", "perplexity", "batch"],  # one table: the whole set
        [[r["text"], r["label_name"], r["match_loss"], r["perplexity"], r["batch"]] for r in rows],
    )
    return {
        "examples": len(rows),
        "batches": len(mine),
        "batches_generated_now": len(todo),
        "failed_batches": failed,
        "x_step_retries": retries,
        "mean_match_loss": sum(r["match_loss"] for r in rows) / len(rows),
        # rows from before token_match_loss existed (a resumed old run dir) count with their match_loss
        "mean_token_match_loss": sum(r.get("token_match_loss", r["match_loss"]) for r in rows) / len(rows),
        "mean_class_batch_loss": sum(r["class_batch_loss"] for r in rows) / len(rows),
        "mean_perplexity": sum(r["perplexity"] for r in rows) / len(rows),
        "timings": {k: sum(t.get(k, 0.0) for t in timings) for k in ("init", "project", "x_step", "evaluate", "total")},
    }


def _match_batch(cfg, m: _Matching, b: int, tracker, bar):
    """Batch b (its own seed, so the result does not depend on which batches ran before):
    (rows, MatchResult), or the reason it failed when the matching went non-finite."""
    bsz = min(cfg.batch_size, cfg.num_per_class - b * cfg.batch_size)
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, b))
    torch.manual_seed(batch_seed(cfg.seed, b))
    step0 = b * (m.matcher.outer_steps + 1)

    def on_step(rec):
        tracker.log({"batch": b, **rec}, step=step0 + rec["outer_step"])
        bar.set_postfix(step=rec["outer_step"], loss=f"{rec['best_discrete_loss']:.4f}")

    try:
        with quiet_kv_cache_rename():  # transformers' past_key_values notice would cut through the bar
            res = m.matcher.run(m.obj, m.projector, m.ctx, m.task.num_classes, bsz, m.length, gen, on_step)
    except FloatingPointError as e:  # non-finite even after the matcher's smaller-step retries
        return str(e)
    rows = []
    for k in range(m.task.num_classes):
        for i in range(bsz):
            ids = res.tokens[k, i].tolist()
            rows.append(
                {
                    "text": m.tok.decode(ids, skip_special_tokens=True).strip(),
                    "label": k,
                    "label_name": m.task.label_names[k],
                    "match_loss": None,
                    "token_match_loss": float(res.seq_loss[k, i]),
                    "perplexity": float(res.perplexity[k, i]),
                    "batch": b,
                    "class_batch_loss": float(res.class_loss[k]),
                    "token_ids": ids,
                }
            )
    # match_loss is the distance of the text as written (decoded and tokenised again, as
    # fine-tuning and selection read it), not of the optimised ids it was decoded from
    text_loss = m.obj.text_losses([m.task.encode_text(r["text"]) for r in rows], [r["label"] for r in rows])
    for r, v in zip(rows, text_loss.tolist()):
        r["match_loss"] = v
    if not all(math.isfinite(r["match_loss"]) for r in rows):
        return "non-finite matching loss of the projected text; check the release (targets.pt)"
    return rows, res


def _record_failed(bdir: Path, b: int, reason: str, tracker) -> None:
    """A batch whose optimisation went non-finite writes no text: a marker, in the outputs."""
    tracker.log({"batch": b, "failed": reason}, kind="failed")
    write_json(_batch_file(bdir, b, failed=True), {"batch": b, "reason": reason})


# --------------------------------------------------------------------------- generator=pe
PE_DIR = "pe"  # <run dir>/pe/iteration_XXX.jsonl: each finished iteration's population and noisy counts


def run_private_evolution(cfg: DictConfig, run_dir: Path, pe: PrivateEvolution) -> dict:
    """generator=pe (docs/pe.md): T noisy nearest-neighbour votes of the private records over an
    LM-written population, no release stage. Each finished iteration is checkpointed (population
    and noisy counts: published values only) under the config record, so a killed run resumes
    after its last finished iteration and another config is refused (check_resume)."""
    if cfg.shard.count != 1:
        raise ValueError(
            f"shard.count={cfg.shard.count}: generator=pe runs as one job (every vote reads every record); accepted: 1"
        )
    if cfg.num_per_class < 1:
        raise ValueError(f"num_per_class={cfg.num_per_class}: accepted: an int >= 1")
    pe.check(cfg.num_per_class)
    budget = pe_budget(cfg)
    if cfg.get("embedder") is None:
        raise ValueError("generator=pe needs an embedder: embedder=minilm | lm")
    embedder = build(cfg.embedder)
    config = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(run_dir, "generate"):
        check_resume(run_dir, "generate", config)  # before the model: a refusal costs nothing
        with make_tracker(cfg.logger, run_dir, "generate", config, private=budget is not None) as tracker:
            t0 = time.perf_counter()
            start(cfg)
            lm = load_generator_model(cfg)
            task = build_task(cfg, lm.tokenizer)
            prompts = pe.class_prompts(task, cfg.dataset.lm_context, cfg.dataset.label_descriptions)
            check_fits_context(lm.model, "dataset.length", cfg.dataset.length, max(map(len, prompts)))
            vote, mult = pe_vote(pe, budget)
            record_config(run_dir, "generate", config)
            resumed = _pe_checkpoint(run_dir, pe.iterations)
            final = _pe_iterations(
                cfg, run_dir, pe, lm, task, embedder.bind(lm), prompts, vote, mult, budget, resumed, tracker
            )
            rows = _pe_rows(final, pe, cfg.num_per_class, task, lm.tokenizer)
            tracker.commit(run_dir / SYNTHETIC_FILE, run_dir / "generate.json")
            write_jsonl(run_dir / SYNTHETIC_FILE, rows)
            privacy = pe_privacy(pe, budget, mult, protected_split_id(cfg), inclusion_rule(cfg, pe), _rows_id(rows))
            summary = {
                "examples": len(rows),
                "generator": "pe",
                "iterations": pe.iterations,
                "population": pe.population,
                "iterations_run_now": pe.iterations - (resumed.iteration if resumed else 0),
                "mean_match_loss": sum(r["match_loss"] for r in rows) / len(rows),
                "mean_perplexity": sum(r["perplexity"] for r in rows) / len(rows),
                "epsilon": privacy["epsilon"],
                "delta": privacy["delta"],
            }
            if budget is None:  # the run time of a private mechanism depends on the records: not published
                summary["wall_seconds"] = time.perf_counter() - t0
            tracker.table(
                "synthetic",
                ["text", "label_name", "noisy_votes", "perplexity"],
                [[r["text"], r["label_name"], r["noisy_votes"], r["perplexity"]] for r in rows],
            )
            tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            write_json(run_dir / "generate.json", {"config": config, "summary": summary, "privacy": privacy})
            tracker.commit()
            tracker.log_artifact(*synthetic_artifact(cfg, run_dir / SYNTHETIC_FILE))
    return summary


def _pe_iterations(
    cfg, run_dir, pe, lm, task, embedder, prompts, vote, mult, budget, resumed, tracker
) -> IterationResult:
    """Embed the private records (kept in memory only) and run the iterations left after `resumed`."""
    if resumed is not None and resumed.iteration >= pe.iterations:
        return resumed
    texts, _ = select_real_examples(cfg.dataset, task.num_classes, cfg.real_per_class, cfg.seed)
    bar = tqdm(
        total=pe.iterations,
        initial=resumed.iteration if resumed else 0,
        desc="pe",
        unit="iter",
        disable=not cfg.progress,
    )
    emb = [embedder.embed(t) for t in texts]  # no bar over the records: its rate would time private work
    del texts

    def on_iteration(res: IterationResult) -> None:
        _write_pe_checkpoint(run_dir, res, tracker)
        rec = {
            "iteration": res.iteration,
            "loss": noisy_share(res.noisy, cfg.num_per_class),
            "perplexity": float(res.population.perplexity.mean()),
        }
        if budget is not None:
            rec["epsilon"] = epsilon_for(mult, budget["delta"], res.iteration, budget["accountant"])
        tracker.log(rec, step=res.iteration)
        bar.update(1)

    allowed = allowed_token_ids(lm.tokenizer, lm.model.get_input_embeddings().weight.shape[0])
    with quiet_kv_cache_rename():  # transformers' past_key_values notice would cut through the bar
        final = pe.run(
            lm,
            task,
            embedder,
            emb,
            prompts=prompts,
            length=cfg.dataset.length,
            allowed_ids=allowed,
            vote=vote,
            seed=cfg.seed,
            start=resumed,
            on_iteration=on_iteration,
        )
    bar.close()
    return final


def _pe_file(run_dir: Path, t: int) -> Path:
    return run_dir / PE_DIR / f"iteration_{t:03d}.jsonl"


def _write_pe_checkpoint(run_dir: Path, res: IterationResult, tracker) -> None:
    """One finished iteration, atomically: the population voted on and its noisy counts."""
    c, p, _ = res.population.tokens.shape
    tracker.commit(_pe_file(run_dir, res.iteration))
    write_jsonl(
        _pe_file(run_dir, res.iteration),
        [
            {
                "label": k,
                "index": i,
                "token_ids": res.population.tokens[k, i].tolist(),
                "perplexity": float(res.population.perplexity[k, i]),
                "noisy_votes": float(res.noisy[k, i]),
            }
            for k in range(c)
            for i in range(p)
        ],
    )


def _pe_checkpoint(run_dir: Path, iterations: int) -> IterationResult | None:
    """The last finished iteration of a killed run (iterations 1..t all present), or None."""
    t = 0
    while t < iterations and _pe_file(run_dir, t + 1).exists():
        t += 1
    if t == 0:
        return None
    rows = read_jsonl(_pe_file(run_dir, t))
    c, p = max(r["label"] for r in rows) + 1, max(r["index"] for r in rows) + 1
    tokens = torch.tensor([r["token_ids"] for r in rows]).view(c, p, -1)
    ppl = torch.tensor([r["perplexity"] for r in rows]).view(c, p)
    noisy = torch.tensor([r["noisy_votes"] for r in rows], dtype=torch.float32).view(c, p)
    return IterationResult(t, Population(tokens, ppl), noisy)


def _pe_rows(final: IterationResult, pe: PrivateEvolution, n: int, task, tok) -> list[dict]:
    """GRADMM's record format: the n most-voted samples of each class at the last iteration.
    match_loss (lower = better, what selector=best ranks by) is minus the noisy vote count."""
    texts = final.population.texts(tok)
    rows = []
    for k, idx in enumerate(top_per_class(final.noisy, n).tolist()):
        for i in idx:
            votes = float(final.noisy[k, i])
            rows.append(
                {
                    "text": texts[k][i],
                    "label": k,
                    "label_name": task.label_names[k],
                    "match_loss": -votes,
                    "noisy_votes": votes,
                    "perplexity": float(final.population.perplexity[k, i]),
                    "batch": 0,
                    "iteration": final.iteration,
                    "token_ids": final.population.tokens[k, i].tolist(),
                }
            )
    return rows


def _rows_id(rows: list[dict]) -> str:
    """Hash of the published rows: names this synthetic set in ledgers (public values only)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['label']}\x00{r['text']}\x00{r['noisy_votes']!r}\n".encode())
    return h.hexdigest()[:16]
