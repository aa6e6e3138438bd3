"""gmtext-pipeline on the tiny model: one run dir, every stage's artifact, resumable."""

import json

import pytest

from gmtext.artifacts import ConfigChanged
from gmtext.workflows.pipeline import run_pipeline

TINY = [
    "debug=fast",
    "matcher.outer_steps=1",
    "matcher.inner_steps=2",
    "projector.topk=10",
    "real_per_class=4",
    "selector.per_class=3",
]


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_pipeline_end_to_end_and_resume(compose, tmp_path, monkeypatch):
    m = run_pipeline(compose(TINY, config_name="pipeline"), tmp_path)
    for f in (
        "release/release.json",
        "synthetic.jsonl",
        "selected.jsonl",
        "generate.json",
        "select.json",
        "metrics.json",
    ):
        assert (tmp_path / f).exists(), f
    assert m["selection"] == json.loads((tmp_path / "metrics.json").read_text())["selection"]
    assert m["selection"]["pool"] == 8 and m["selection"]["selected"] == 6
    assert m["generation"]["epsilon"] == float("inf")
    # the accuracy is the confusion matrix's: correct predictions over the n_eval examples
    conf = m["confusion"]
    assert sum(map(sum, conf)) == m["n_eval"] == 8
    assert m["accuracy"] == pytest.approx(sum(conf[k][k] for k in range(2)) / m["n_eval"])
    assert m["per_class_accuracy"] == {
        n: pytest.approx(conf[k][k] / sum(conf[k])) for k, n in enumerate(["negative", "positive"]) if sum(conf[k])
    }
    files = _snapshot(tmp_path)

    # resume: nothing recomputed — the matcher and the trainer must not run again
    from gmtext.matching import admm
    from gmtext.stages import finetune

    def must_not_run(*a, **k):
        raise AssertionError("recomputed on resume")

    monkeypatch.setattr(admm.ADMMMatcher, "run", must_not_run)
    monkeypatch.setattr(finetune, "_train_and_evaluate", must_not_run)
    again = run_pipeline(compose(TINY, config_name="pipeline"), tmp_path)
    assert again == m
    assert json.loads((tmp_path / "generate.json").read_text())["summary"]["batches_generated_now"] == 0
    for f in ("synthetic.jsonl", "selected.jsonl", "release/targets.pt"):
        assert (tmp_path / f).read_bytes() == files[f], f

    # another config into the same run dir is refused before any stage writes
    files = _snapshot(tmp_path)
    with pytest.raises(
        ConfigChanged, match=r"holds generate output made with another config \(.*selector.per_class 3 → 2"
    ):
        run_pipeline(compose(TINY + ["selector.per_class=2"], config_name="pipeline"), tmp_path)
    assert _snapshot(tmp_path) == files


def test_pipeline_refuses_other_train_sources(compose, tmp_path):
    with pytest.raises(ValueError, match="train='real'"):
        run_pipeline(compose(TINY + ["train=real"], config_name="pipeline"), tmp_path)
