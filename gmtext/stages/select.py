"""Select: the final synthetic set from a larger generated pool.

Uses only what generation wrote (match_loss, perplexity, text), all of it derived from the
release, so selection is post-processing and spends no privacy budget.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from omegaconf import DictConfig, OmegaConf

from ..artifacts import check_resume, record_config, run_lock, write_json, write_jsonl
from ..config import BestMatchSelectorConfig, LabelMarginSelectorConfig, build
from ..data.synthetic import read_synthetic_rows, resolve_synthetic_path, synthetic_privacy
from ..gradients import MATCH_LOSSES
from ..readability import readability
from ..matching.rescore import label_fit, label_margin
from ..privacy.ledger import compose_records, ledger_of
from ..privacy.release import META_FILE, Release, release_fingerprint
from ..runtime import PROBE_DIR, build_task, load_generator_model, matched_params, release_artifact, synthetic_artifact
from ..sketch import specs_for_names
from ..tracking import make_tracker


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


class BestMatchSelector:
    """Per class: lowest `match_loss + perplexity_weight·log(perplexity)`, duplicates dropped,
    classes balanced to the same count (the smallest class's, capped at per_class)."""

    required = ("text", "label", "match_loss", "perplexity")  # pool fields the score reads
    uses_probe = False  # True: the pool is scored against a probe release first (label_margin)
    probe_release: str | None = None  # that release; None: the pool's own <pool run dir>/probe

    def __init__(
        self,
        per_class: int = BestMatchSelectorConfig.per_class,
        perplexity_weight: float = BestMatchSelectorConfig.perplexity_weight,
        dedupe: bool = BestMatchSelectorConfig.dedupe,
        balance: bool = BestMatchSelectorConfig.balance,
    ):
        if per_class < 0:
            raise ValueError(f"selector.per_class={per_class} must be >= 0 (0 = keep all)")
        self.per_class, self.perplexity_weight, self.dedupe, self.balance = (
            per_class,
            perplexity_weight,
            dedupe,
            balance,
        )

    def score(self, row: dict) -> float:
        return row["match_loss"] + self.perplexity_weight * math.log(max(row["perplexity"], 1.0))

    def __call__(self, rows: list[dict]) -> list[dict]:
        by_class: dict[int, list[dict]] = {}
        for r in sorted(rows, key=self.score):
            by_class.setdefault(r["label"], []).append(r)
        if self.dedupe:
            for c, rs in by_class.items():
                seen, keep = set(), []
                for r in rs:
                    k = _norm(r["text"])
                    if k and k not in seen:
                        seen.add(k)
                        keep.append(r)
                by_class[c] = keep
        n = min(len(v) for v in by_class.values()) if self.balance else max(len(v) for v in by_class.values())
        if self.per_class:
            n = min(n, self.per_class)
        return [r for c in sorted(by_class) for r in by_class[c][:n]]


class LabelMarginSelector(BestMatchSelector):
    """Per class: largest label-fit margin against a probe release (gmtext/matching/rescore.py):
    keeps the texts whose gradient fits their own label's target better than any other
    label's, most clearly first. The probe release may match other parameters than the
    generator did (the matched set that makes matching cheap is not the one whose gradients
    tell the classes apart); its ε adds to the pool's."""

    required = ("text", "label")  # scores any pool of labelled text (e.g. train=prompted's prompted.jsonl)
    uses_probe = True

    def __init__(
        self,
        release: str | None = LabelMarginSelectorConfig.release,
        per_class: int = LabelMarginSelectorConfig.per_class,
        dedupe: bool = LabelMarginSelectorConfig.dedupe,
        balance: bool = LabelMarginSelectorConfig.balance,
        chunk: int = LabelMarginSelectorConfig.chunk,
    ):
        if chunk < 1:
            raise ValueError(f"selector.chunk={chunk} must be >= 1")
        super().__init__(per_class=per_class, dedupe=dedupe, balance=balance)
        self.release, self.chunk = release, chunk
        self.probe_release = release or None  # None: the pool's own probe release (run_select finds it)

    def score(self, row: dict) -> float:
        return -row["label_margin"]


class NoSelector:
    """Keep the whole pool as generated."""

    required = BestMatchSelector.required
    uses_probe = False
    probe_release = None

    def __call__(self, rows: list[dict]) -> list[dict]:
        return list(rows)


def add_label_margins(cfg: DictConfig, rows: list[dict], release_dir: str, chunk: int) -> dict:
    """Adds `label_margin` to every row (scored with the probe release's parameters and loss);
    returns the probe release's {epsilon, delta}."""
    rel = Release.load(release_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    # sketch G names attach their branch again (same public k and seed); other names select themselves
    matched = matched_params(cfg, lm.model, specs_for_names(rel.param_names))
    # the release records its loss only through its fingerprint: score with the one it was made with
    fps = {m: release_fingerprint(lm.fingerprint, cfg.dataset.name, task, matched.names, m) for m in MATCH_LOSSES}
    match_loss = next((m for m, fp in fps.items() if fp == rel.fingerprint), cfg.match_loss)
    rel.check(fps.get(match_loss, ""), matched.names)  # an unknown match_loss fits no release
    fit = label_fit(
        lm.model,
        task,
        matched,
        rel.targets,
        [r["text"] for r in rows],
        match_loss,
        cfg.dataset.max_text_tokens,
        chunk,
        progress=bool(cfg.progress),
    )
    for r, m in zip(rows, label_margin(fit, [r["label"] for r in rows]).tolist()):
        r["label_margin"] = m
    return {
        "release": str(release_dir),
        "epsilon": rel.epsilon,
        "delta": float(rel.privacy.get("delta", 0.0)),
        "param_names": len(rel.param_names),
        "ledger": ledger_of(rel.privacy),
    }


def load_synthetic(path, label_names, required=BestMatchSelector.required) -> list[dict]:
    return read_synthetic_rows(path, label_names, required)


def _mean(rows: list[dict], key: str) -> float:
    """Mean of a score over the rows that have it (NaN when none do: a pool of plain text)."""
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else math.nan


def _pool_file(pool, run_dir: Path) -> Path:
    """The pool file, never this stage's own output: a run dir resolves to its selected.jsonl
    first, so selecting into the generate run dir itself (gmtext-pipeline; gmtext-select
    without pool=) read its previous selection on a rerun, and reported that as the pool."""
    p = resolve_synthetic_path(pool)
    own = run_dir / "selected.jsonl"
    if own.exists() and p.resolve() == own.resolve() and (run_dir / "synthetic.jsonl").exists():
        return run_dir / "synthetic.jsonl"
    return p


def _pool_probe(source: Path) -> str:
    """The probe release made with the pool's own release (probe.matched_params), the default
    scoring targets of selector=margin: same records, same budget, same run dir."""
    probe = source.parent / PROBE_DIR
    if not (probe / META_FILE).exists():
        raise ValueError(
            f"selector=margin: no selector.release given and the pool's run dir has no probe release ({probe}); "
            "generate with probe.matched_params=[...] (the default: [middle_blocks]), give "
            "selector.release=DIR, or use selector=best"
        )
    return str(probe)


def run_select(cfg: DictConfig, run_dir) -> dict:
    run_dir = Path(run_dir)
    selector = build(cfg.selector)
    config = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(run_dir, "select"):
        source = _pool_file(cfg.pool or run_dir, run_dir)
        # selection is recomputed from the pool (cheap, deterministic), but into a run dir whose
        # selected.jsonl came from other settings it would silently replace what a later stage
        # (a pipeline's fine-tuning) was made from: refuse instead
        check_resume(run_dir, "select", config)
        with make_tracker(cfg.logger, run_dir, "select", config) as tracker:  # before reading and scoring the pool
            if source.exists():
                tracker.use_artifact(*synthetic_artifact(cfg, source))
            rows = load_synthetic(source, list(cfg.dataset.label_names), selector.required)
            pool_privacy = synthetic_privacy(source) or {}
            probe_privacy = None
            if selector.uses_probe:
                probe_dir = selector.probe_release or _pool_probe(source)
                if (art := release_artifact(cfg, probe_dir, "probe")) is not None:
                    tracker.use_artifact(art[0], "probe", art[1], art[2])
                probe_privacy = add_label_margins(cfg, rows, probe_dir, selector.chunk)
            chosen = selector(rows)
            record_config(run_dir, "select", config)
            write_jsonl(run_dir / "selected.jsonl", chosen)
            counts = {}
            for r in chosen:
                counts[r["label"]] = counts.get(r["label"], 0) + 1
            summary = {
                "pool": len(rows),
                "selected": len(chosen),
                "per_class": counts,
                "mean_match_loss": _mean(chosen, "match_loss"),
                "mean_perplexity": _mean(chosen, "perplexity"),
                **readability(chosen),  # perplexity quantiles and the known-word rate
                "source": str(source),
            }
            parts = [pool_privacy] if pool_privacy else []
            if probe_privacy is not None:
                summary["mean_label_margin"] = _mean(chosen, "label_margin")
                summary["probe_release"] = {k: v for k, v in probe_privacy.items() if k != "ledger"}
                parts.append(probe_privacy)
            privacy = compose_records(parts) if pool_privacy else None
            if not pool_privacy and probe_privacy is not None:
                # a pool of unknown origin (a hand-made file) stays of unknown cost, but the probe's
                # use of the private data still travels with the selection
                privacy = {
                    "epsilon": None,
                    "delta": None,
                    "ledger": compose_records([probe_privacy]),
                    "note": "the pool has no privacy record, so its own cost and the total are unknown; "
                    "the ledger holds the probe release's",
                }
            if privacy and privacy["epsilon"] is not None:
                summary.update(epsilon=privacy["epsilon"], delta=privacy["delta"])
            write_json(run_dir / "select.json", {**summary, "privacy": privacy})
            tracker.summary(
                {
                    **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
                    "per_class": {cfg.dataset.label_names[k]: n for k, n in sorted(counts.items())},
                }
            )
            tracker.commit()
            tracker.log_artifact(*synthetic_artifact(cfg, run_dir / "selected.jsonl"))
    return summary
