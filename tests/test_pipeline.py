"""gmtext-pipeline on the tiny model: one run dir, every stage's artifact, resumable."""
import json

import pytest

from gmtext.stages.pipeline import run_pipeline

TINY = ["model=tiny_llama", "logger=none", "progress=false", "matcher.outer_steps=1", "matcher.inner_steps=2",
        "matcher.init_candidates=1", "projector.topk=10", "num_per_class=4", "batch_size=2", "real_per_class=4",
        "dataset.length=5", "selector.per_class=3", "finetuner.max_steps=2", "finetuner.batch_size=4",
        "finetune.eval_limit=8", "finetune.dev_size=0"]


def test_pipeline_end_to_end_and_resume(compose, tmp_path):
    m = run_pipeline(compose(TINY, config_name="pipeline"), tmp_path)
    for f in ("release/release.json", "synthetic.jsonl", "selected.jsonl", "generate.json", "select.json", "metrics.json"):
        assert (tmp_path / f).exists(), f
    assert 0 <= m["accuracy"] <= 1 and m["selection"] == json.loads((tmp_path / "metrics.json").read_text())["selection"]
    assert m["selection"]["pool"] == 8 and m["selection"]["selected"] == 6
    assert m["generation"]["epsilon"] == float("inf")
    before = (tmp_path / "synthetic.jsonl").read_text()
    again = run_pipeline(compose(TINY, config_name="pipeline"), tmp_path)  # resume: nothing recomputed
    assert again["accuracy"] == m["accuracy"] and (tmp_path / "synthetic.jsonl").read_text() == before


def test_pipeline_refuses_other_train_sources(compose, tmp_path):
    with pytest.raises(ValueError, match="train='real'"):
        run_pipeline(compose(TINY + ["train=real"], config_name="pipeline"), tmp_path)
