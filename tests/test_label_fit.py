"""experiments/label_fit.py: the judge's label fit and own-label probability, on a pool file."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "label_fit", Path(__file__).resolve().parents[1] / "experiments" / "label_fit.py"
)
lf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lf)


class WordEmbedder:
    """Stands in for MiniLM: counts the words 'bad' and 'good', so the judge is easy to predict."""

    def bind(self, lm=None):
        return self

    def embed(self, texts):
        return torch.tensor([[t.split().count("bad"), t.split().count("good")] for t in texts], dtype=torch.float32)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_judges_the_named_file_and_reports_own_label_probability(tmp_path, monkeypatch):
    monkeypatch.setattr(lf, "MiniLMEmbedder", WordEmbedder)
    judge = [{"text": "bad " * (1 + i % 3), "label": 0} for i in range(10)]
    judge += [{"text": "good " * (1 + i % 3), "label": 1} for i in range(10)]
    write(tmp_path / "judge.jsonl", judge)
    run = tmp_path / "run"
    run.mkdir()
    # three texts read as their label, one reads as the other label
    write(
        run / "synthetic.jsonl",
        [
            {"text": "bad bad", "label": 0},
            {"text": "good", "label": 1},
            {"text": "good good", "label": 1},
            {"text": "good good", "label": 0},
        ],
    )
    out = tmp_path / "out.json"
    assert (
        lf.main(
            [str(run), "--judge-data", str(tmp_path / "judge.jsonl"), "--file", "synthetic.jsonl", "--out", str(out)]
        )
        == 0
    )
    r = json.loads(out.read_text())["runs"][str(run)]
    assert r["label_fit"] == pytest.approx(0.75)
    assert r["per_class"] == {"0": pytest.approx(0.5), "1": pytest.approx(1.0)}
    assert 0.5 < r["own_prob"] < 0.75  # three confident hits, one confident miss


def test_a_run_without_the_file_is_refused(tmp_path, capsys):
    (tmp_path / "judge.jsonl").write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    (tmp_path / "run").mkdir()
    assert lf.main([str(tmp_path / "run"), "--judge-data", str(tmp_path / "judge.jsonl")]) == 2
    assert "no selected.jsonl" in capsys.readouterr().err
