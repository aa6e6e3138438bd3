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


def test_edit_share_and_same_target_gap():
    a = rows([0.1, 0.25, 0.3], [10, 20, 30], ["a b c d", "same", "x"])
    b = rows([0.2, 0.2, 0.3], [10, 20, 30], ["a b e d", "same", "y"])
    for r, ids in zip(a + b, [[1, 2, 3, 4], [9], [5], [1, 2, 7, 4], [9], [6, 6]]):
        r["token_ids"] = ids
    r = pc.compare(a, b)
    # slot 0: one substitution in 4 tokens; slot 2: one substitution and one deletion against B's 2
    assert r["edit_share_of_differing"]["mean"] == pytest.approx((1 / 4 + 2 / 2) / 2)
    assert r["same_text_match_loss_gap"] == pytest.approx({"mean": 0.05, "max_abs": 0.05})


def test_edit_distance():
    assert pc.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert pc.edit_distance([1, 2, 3], [2, 3]) == 1
    assert pc.edit_distance([], [4, 5]) == 2
    assert pc.edit_distance([1, 2], [2, 1]) == 2
