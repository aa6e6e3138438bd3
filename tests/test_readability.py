"""Readability of the kept set (gmtext/readability.py), reported next to every accuracy: the
perplexity quantiles and the known-word rate."""

import json

import numpy as np
import pytest

from gmtext.readability import kept_readability, known_word_rate, main, perplexity_quantiles


def test_quantiles_are_numpys_and_skip_rows_without_a_perplexity():
    rows = [{"perplexity": p} for p in (5.0, 100.0, 7.0, 1000.0, 12.0)] + [{"text": "no score"}, {"perplexity": None}]
    q = perplexity_quantiles(rows)
    assert q == {"median_perplexity": 12.0, "p90_perplexity": pytest.approx(np.percentile([5, 7, 12, 100, 1000], 90))}
    assert q["p90_perplexity"] == pytest.approx(640.0)  # 100 + 0.6 * (1000 - 100): the tail the mean would hide
    assert perplexity_quantiles([{"text": "plain"}]) == {}


def test_kept_readability_reads_a_run_dirs_selected_set(tmp_path):
    assert kept_readability(tmp_path) == {}  # no selected.jsonl: nothing to report
    rows = [{"text": "A fine film", "perplexity": 3}, {"text": "craimble Evoz film\u2028too", "perplexity": 9}]
    # U+2028 inside a text is one JSON line (str.splitlines would cut the row in two)
    (tmp_path / "selected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    got = kept_readability(tmp_path)
    assert got == {"median_perplexity": 6.0, "p90_perplexity": pytest.approx(8.4), "known_word_rate": 5 / 7}


def test_known_word_rate_counts_words_not_tokens():
    # pooled over words: 1 unknown ("brokeaking") of 6
    assert known_word_rate(["She's brokeaking news!", "a good movie, 10/10"]) == pytest.approx(5 / 6)
    # detached clitics of tokenized corpora are joined back, possessives of known words are known
    assert known_word_rate(["we 'll see , it does n't work", "the director's cut"]) == 1.0
    assert known_word_rate(["Levander craimble"]) == 0.0
    assert known_word_rate(["", "!!! 123"]) is None  # no word: no rate, not a rate of 0


def test_cli_prints_each_files_rate_and_refuses_a_missing_file(tmp_path, capsys):
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"text": "good film"}) + "\n" + json.dumps({"text": "Evoz"}) + "\n")
    assert main([str(f)]) == 0
    assert "texts 2\tknown-word rate 0.667" in capsys.readouterr().out
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
