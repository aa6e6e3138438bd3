"""Readability of a text set, as every accuracy row reports it: the LM perplexity distribution
of the kept texts (the median and the 90th percentile: a mean hides a long tail of word salad).
numpy only, so `gmtext-report` reads it without loading torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def perplexity_quantiles(rows: Sequence[dict]) -> dict:
    """{"median_perplexity", "p90_perplexity"} over the rows that carry a perplexity; {} if none."""
    vals = [float(r["perplexity"]) for r in rows if r.get("perplexity") is not None]
    if not vals:
        return {}
    median, p90 = np.percentile(vals, [50, 90])
    return {"median_perplexity": float(median), "p90_perplexity": float(p90)}


def kept_perplexity(run_dir: str | Path) -> dict:
    """perplexity_quantiles of a run dir's selected.jsonl ({} when it has none)."""
    path = Path(run_dir) / "selected.jsonl"
    if not path.exists():
        return {}
    return perplexity_quantiles([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
