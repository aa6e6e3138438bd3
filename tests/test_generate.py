"""The generate stage end to end on the tiny model and the builtin demo set."""
import json
import subprocess
import sys

import pytest

from gmtext.artifacts import read_jsonl
from gmtext.stages.generate import run_generate

FAST = ["model=tiny_llama", "logger=none", "matcher.outer_steps=2", "matcher.inner_steps=2", "matcher.init_candidates=2",
        "projector.topk=20", "num_per_class=4", "batch_size=2", "real_per_class=6", "dataset.length=6", "progress=false"]
FIELDS = {"text", "label", "label_name", "match_loss", "perplexity", "batch", "class_batch_loss"}


def test_generate_writes_outputs(compose, tmp_path):
    s = run_generate(compose(FAST), tmp_path)
    rows = read_jsonl(tmp_path / "synthetic.jsonl")
    assert len(rows) == 8 == s["examples"]
    assert all(set(r) == FIELDS for r in rows)
    assert [r["label"] for r in rows] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {r["label_name"] for r in rows} == {"negative", "positive"}
    assert all(r["text"] and r["perplexity"] > 1 and 0 <= r["match_loss"] <= 2 for r in rows)
    meta = json.loads((tmp_path / "generate.json").read_text())
    assert meta["summary"]["examples"] == 8 and meta["config"]["matcher"]["outer_steps"] == 2
    assert (tmp_path / "release" / "release.json").exists() and (tmp_path / "metrics.jsonl").exists()
    steps = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("discrete_loss" in r for r in steps) and any(r["kind"] == "summary" for r in steps)


def test_resume_after_interruption_matches_uninterrupted(compose, tmp_path, monkeypatch):
    full = tmp_path / "full"
    run_generate(compose(FAST), full)

    from gmtext.matching import admm

    real_run, calls = admm.ADMMMatcher.run, []

    def dying_run(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while optimising the second batch
        return real_run(self, *a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(admm.ADMMMatcher, "run", dying_run)
    with pytest.raises(KeyboardInterrupt):
        run_generate(compose(FAST), part)
    assert sorted(p.name for p in (part / "batches").iterdir()) == ["batch_00000.jsonl"]
    assert not (part / "synthetic.jsonl").exists()
    monkeypatch.setattr(admm.ADMMMatcher, "run", real_run)
    s = run_generate(compose(FAST), part)
    assert s["batches_generated_now"] == 1
    assert (part / "synthetic.jsonl").read_text() == (full / "synthetic.jsonl").read_text()


def test_release_reuse_and_fingerprint(compose, tmp_path):
    a = tmp_path / "a"
    run_generate(compose(FAST), a)
    b = tmp_path / "b"
    s = run_generate(compose(FAST + [f"release={a / 'release'}", "seed=1"]), b)
    assert s["examples"] == 8 and not (b / "release").exists()
    with pytest.raises(ValueError, match="fingerprint"):
        run_generate(compose(FAST + [f"release={a / 'release'}", "dataset.verbalizers=[' awful',' good']"]), tmp_path / "c")


def test_embedding_only_and_nearest(compose, tmp_path):
    base = [o for o in FAST if not o.startswith(("projector.", "matcher."))]
    s = run_generate(compose(base + ["matcher=embedding_only", "matcher.outer_steps=1", "matcher.inner_steps=2", "projector=nearest"]), tmp_path)
    assert s["examples"] == 8


def test_cli_bad_value_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from gmtext.cli import generate_main; generate_main()", "model=tiny_llama", "logger=none",
                        "projector.topk=0", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "gmtext-generate: error: projector.topk=0 must be a positive integer"
    assert not (tmp_path / "synthetic.jsonl").exists()


def test_verbalizer_match_loss_end_to_end(compose, tmp_path):
    s = run_generate(compose(FAST + ["match_loss=verbalizer"]), tmp_path / "v")
    assert s["examples"] == 8 and all(0 <= r["match_loss"] <= 2 for r in read_jsonl(tmp_path / "v" / "synthetic.jsonl"))
    with pytest.raises(ValueError, match="fingerprint"):  # a verbalizer-loss release cannot serve a full-vocab run
        run_generate(compose(FAST + [f"release={tmp_path / 'v' / 'release'}"]), tmp_path / "f")
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="match_loss=bogus"):  # a closed choice: refused at compose time
        compose(FAST + ["match_loss=bogus"])


def test_no_kv_cache_rename_notice_in_the_progress_bar(compose, tmp_path, capfd, recwarn):
    """transformers' `past_key_values` deprecation (a FutureWarning and a logger line) is
    silenced where generation triggers it, so it does not cut through the progress bar."""
    run_generate(compose([o for o in FAST if o != "progress=false"] + ["progress=true"]), tmp_path / "p")
    err = capfd.readouterr().err
    assert "generate" in err  # the bar was drawn
    assert "past_key_values" not in err
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
