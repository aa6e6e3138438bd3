"""The kept set's perplexity quantiles (gmtext/readability.py), reported next to every accuracy."""

import json

import numpy as np
import pytest

from gmtext.readability import kept_perplexity, perplexity_quantiles


def test_quantiles_are_numpys_and_skip_rows_without_a_perplexity():
    rows = [{"perplexity": p} for p in (5.0, 100.0, 7.0, 1000.0, 12.0)] + [{"text": "no score"}, {"perplexity": None}]
    q = perplexity_quantiles(rows)
    assert q == {"median_perplexity": 12.0, "p90_perplexity": pytest.approx(np.percentile([5, 7, 12, 100, 1000], 90))}
    assert q["p90_perplexity"] == pytest.approx(640.0)  # 100 + 0.6 * (1000 - 100): the tail the mean would hide
    assert perplexity_quantiles([{"text": "plain"}]) == {}


def test_kept_perplexity_reads_a_run_dirs_selected_set(tmp_path):
    assert kept_perplexity(tmp_path) == {}  # no selected.jsonl: nothing to report
    (tmp_path / "selected.jsonl").write_text("".join(json.dumps({"text": "t", "perplexity": p}) + "\n" for p in (3, 9)))
    assert kept_perplexity(tmp_path) == {"median_perplexity": 6.0, "p90_perplexity": pytest.approx(8.4)}
