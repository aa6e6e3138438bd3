"""Select: the final synthetic set from a larger generated pool.

Uses only what generation wrote (match_loss, perplexity, text), all of it derived from the
release, so selection is post-processing and spends no privacy budget.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from omegaconf import DictConfig

from ..artifacts import run_lock, write_json, write_jsonl
from ..config import build
from ..data.synthetic import read_synthetic_rows, resolve_synthetic_path, synthetic_privacy

REQUIRED = ("text", "label", "match_loss", "perplexity")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


class BestMatchSelector:
    """Per class: lowest `match_loss + perplexity_weight·log(perplexity)`, duplicates dropped,
    classes balanced to the same count (the smallest class's, capped at per_class)."""

    def __init__(self, per_class: int = 0, perplexity_weight: float = 0.0, dedupe: bool = True, balance: bool = True):
        if per_class < 0:
            raise ValueError(f"selector.per_class={per_class} must be >= 0 (0 = keep all)")
        self.per_class, self.perplexity_weight, self.dedupe, self.balance = per_class, perplexity_weight, dedupe, balance

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


class NoSelector:
    """Keep the whole pool as generated."""

    def __call__(self, rows: list[dict]) -> list[dict]:
        return list(rows)


def load_synthetic(path, label_names) -> list[dict]:
    return read_synthetic_rows(path, label_names, REQUIRED)


def run_select(cfg: DictConfig, run_dir) -> dict:
    run_dir = Path(run_dir)
    selector = build(cfg.selector)
    source = cfg.pool or run_dir
    with run_lock(run_dir, "select"):
        rows = load_synthetic(source, list(cfg.dataset.label_names))
        chosen = selector(rows)
        write_jsonl(run_dir / "selected.jsonl", chosen)
        counts = {}
        for r in chosen:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        summary = {"pool": len(rows), "selected": len(chosen), "per_class": counts,
                   "mean_match_loss": sum(r["match_loss"] for r in chosen) / max(1, len(chosen)),
                   "mean_perplexity": sum(r["perplexity"] for r in chosen) / max(1, len(chosen)),
                   "source": str(resolve_synthetic_path(source))}
        summary.update(synthetic_privacy(source) or {})  # the pool's ε travels with the selected set
        write_json(run_dir / "select.json", summary)
    return summary
