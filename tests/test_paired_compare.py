"""experiments/paired_compare.py: the slot-paired comparison the generation docs quote."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "paired_compare", Path(__file__).resolve().parents[1] / "experiments" / "paired_compare.py"
)
pc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)


def rows(losses, ppls, texts):
    return [
        {"batch": 0, "label": i % 2, "match_loss": m, "perplexity": p, "text": t}
        for i, (m, p, t) in enumerate(zip(losses, ppls, texts))
    ]


def test_paired_differences_and_counts():
    a = rows([0.1, 0.2, 0.3, 0.4], [10, 20, 30, 40], ["a", "b", "c", "d"])
    b = rows([0.2, 0.2, 0.3, 0.5], [20, 20, 30, 10], ["x", "b", "c", "y"])
    r = pc.compare(a, b)
    assert r["slots_differing"] == 2
    assert r["match_loss"]["mean_diff"] == pytest.approx(-0.05)
    assert r["match_loss"]["a_lower"] == 2
    assert r["log_perplexity"]["mean_diff"] == pytest.approx((math.log(0.5) + math.log(4)) / 4)
    lo, hi = r["match_loss"]["ci95"]
    assert -0.1 <= lo <= r["match_loss"]["mean_diff"] <= hi <= 0.0


def test_unpaired_pools_are_refused():
    a = rows([0.1, 0.2], [10, 20], ["a", "b"])
    with pytest.raises(SystemExit, match="same \\(batch, label\\) slots"):
        pc.compare(a, a[::-1])
