"""Memorisation audit: n-gram overlap, nearest-neighbour similarity, canaries, gmtext-audit."""
import json

import pytest

from gmtext.privacy import audit as A


def test_longest_common_ngram_and_share():
    real = ["the movie was a total waste of time and money for everyone", "great acting"]
    synth = ["honestly the movie was a total waste of time and money , sadly",  # 10-gram copy
             "great fun",  # 1-gram
             "zebra quartz"]  # nothing
    res = A.audit_texts(synth, real, n=8)
    assert res["longest_common_ngram"] == 10
    assert res["share_with_real_ngram"] == pytest.approx(1 / 3)
    lcn = A.longest_common_ngrams([A.words(s) for s in synth], [A.words(r) for r in real])
    assert lcn == [10, 1, 0]


def test_nearest_real_cosine():
    real = ["a dull lifeless film", "a warm funny film"]
    cos, idx = A.nearest_real_cosine([A.words("a warm funny film"), A.words("zebra quartz")], [A.words(r) for r in real])
    assert cos[0] == pytest.approx(1.0) and idx[0] == 1
    assert cos[1] == 0.0
    res = A.audit_texts(["a warm funny film", "zebra"], real)
    assert res["nearest_real_cosine"]["max"] == pytest.approx(1.0)
    assert all("real_index" in m and "real" not in m for m in res["most_similar"])  # no real text in the report


def test_canaries_unique_and_planted():
    c = A.make_canaries(5, 8, seed=0)
    assert len(set(c)) == 5 and c == A.make_canaries(5, 8, seed=0)
    assert all(len(A.words(x)) >= 13 for x in c)
    texts, labels = A.plant_canaries([["a", "b", "c"], ["d", "e", "f"]], c[:3])
    assert [len(t) for t in texts] == [3, 3] and labels == [0, 1, 0]
    assert texts[0][:2] == [c[0], c[2]] and texts[1][0] == c[1]
    with pytest.raises(ValueError):
        A.plant_canaries([["a"], ["b"]], c)


def test_canary_exposure_ranks(tiny):
    lm, task = tiny
    c = A.make_canaries(2, 6, seed=3)
    refs = A.make_canaries(20, 6, seed=4)
    res = A.canary_exposure(lm.model, lm.tokenizer, c, refs, task.prefix_ids[:1])
    for r in res:
        assert 1 <= r["rank"] <= 21 and 0 <= r["exposure_bits"] <= 4.4 + 1e-9
    # a reference scored against its own set ranks by its perplexity: deterministic
    assert A.canary_exposure(lm.model, lm.tokenizer, c, refs, task.prefix_ids[:1]) == res


FAST = ["model=tiny_llama", "logger=none", "matcher.outer_steps=1", "matcher.inner_steps=1", "num_per_class=2",
        "batch_size=2", "privacy=dp", "progress=false", "projector=nearest", "matcher.init=random"]


@pytest.mark.parametrize("match_loss", ["full_vocab", "verbalizer"])  # the canary release must carry the run's loss
def test_audit_entry_with_canaries(compose, tmp_path, match_loss):
    from gmtext.artifacts import write_jsonl

    write_jsonl(tmp_path / "gen" / "synthetic.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(
        ["A dull film , truly", "zebra quartz", "the acting is fine", "A warm, funny film that earns every one of its quiet tears."])])
    cfg = compose(FAST + [f"synthetic={tmp_path / 'gen'}", "canaries.enabled=true", "canaries.k=2",
                          "canaries.references=20", f"match_loss={match_loss}"], config_name="audit")
    assert cfg.stage == "audit" and cfg.ngram == 8
    s = A.run_audit(cfg, tmp_path / "audit")
    assert s["share_with_real_ngram"] == 0.25 and s["longest_common_ngram"] == 14  # the copied demo review (13 words + 1 punctuation token)
    out = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert out["overlap"]["num_synthetic"] == 4 and out["overlap"]["num_real"] == 40
    can = out["canaries"]
    assert can["k"] == 2 and can["privacy"] == "dp" and can["any_canary_ngram_in_output"] is False
    assert all(1 <= p["rank"] <= 21 for p in can["canaries"])
    rel = json.loads((tmp_path / "audit" / "canary" / "release" / "privacy.json").read_text())
    assert rel["mechanism"] == "gaussian" and rel["match_loss"] == match_loss
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "Memorisation audit" in md and "Canaries" in md
    for c in A.make_canaries(2, 8, cfg.seed):  # canaries never reach generation artifacts
        for f in (tmp_path / "audit" / "canary").rglob("*"):
            if f.is_file():
                assert c.encode() not in f.read_bytes()


def test_audit_missing_synthetic(compose, tmp_path):
    cfg = compose(["model=tiny_llama", "logger=none", f"synthetic={tmp_path / 'nope'}"], config_name="audit")
    with pytest.raises(FileNotFoundError, match="synthetic="):
        A.run_audit(cfg, tmp_path)
