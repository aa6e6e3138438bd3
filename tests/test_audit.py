"""Memorisation audit: n-gram overlap, nearest-neighbour similarity, canaries, gmtext-audit."""

import json

import pytest

from gmtext.privacy import audit as A
from gmtext.workflows import audit as stage_audit


def test_longest_common_ngram_and_share():
    real = ["the movie was a total waste of time and money for everyone", "great acting"]
    synth = [
        "honestly the movie was a total waste of time and money , sadly",  # 10-gram copy
        "great fun",  # 1-gram
        "zebra quartz",
    ]  # nothing
    res = A.audit_texts(synth, real, n=8)
    assert res["longest_common_ngram"] == 10
    assert res["share_with_real_ngram"] == pytest.approx(1 / 3)
    lcn = A.longest_common_ngrams([A.words(s) for s in synth], [A.words(r) for r in real])
    assert lcn == [10, 1, 0]


def test_nearest_real_cosine():
    real = ["a dull lifeless film", "a warm funny film"]
    cos, idx = A.nearest_real_cosine(
        [A.words("a warm funny film"), A.words("zebra quartz")], [A.words(r) for r in real]
    )
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


def _log_ppl(model, tok, text, start):
    """Mean next-token NLL of one text after `start`, its own forward (no batch, no padding)."""
    import torch

    ids = torch.tensor([list(start) + tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(start) - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, len(start) :]).item()


def test_canary_exposure_ranks(tiny):
    """The rank is 1 + the number of references the model finds likelier (lower log
    perplexity), each scored on its own; a canary the model has memorised ranks first with
    the maximum exposure log2(R + 1)."""
    import copy
    import math

    import torch

    lm, task = tiny
    start = task.prefix_ids[:1]
    c = A.make_canaries(2, 6, seed=3)
    refs = A.make_canaries(20, 6, seed=4)
    res = A.canary_exposure(lm.model, lm.tokenizer, c, refs, start)
    ref_lp = [_log_ppl(lm.model, lm.tokenizer, r, start) for r in refs]
    for can, r in zip(c, res):
        lp = _log_ppl(lm.model, lm.tokenizer, can, start)
        assert r["log_perplexity"] == pytest.approx(lp, abs=1e-4)
        assert min(abs(lp - x) for x in ref_lp) > 1e-4  # no near-tie that float noise could flip
        want = 1 + sum(x < lp for x in ref_lp)
        assert r["rank"] == want and r["exposure_bits"] == pytest.approx(math.log2(21) - math.log2(want))
    assert A.canary_exposure(lm.model, lm.tokenizer, c, refs, start) == res  # deterministic
    # memorise canary 0: a few steps of next-token training on it alone
    model = copy.deepcopy(lm.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor([list(start) + lm.tokenizer(c[0], add_special_tokens=False).input_ids])
    for _ in range(30):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    mem = A.canary_exposure(model, lm.tokenizer, c, refs, start)
    assert mem[0]["rank"] == 1 and mem[0]["exposure_bits"] == pytest.approx(math.log2(21))
    assert mem[0]["log_perplexity"] < min(_log_ppl(model, lm.tokenizer, r, start) for r in refs)


FAST = [
    "debug=tiny",
    "matcher.outer_steps=1",
    "matcher.inner_steps=1",
    "num_per_class=2",
    "batch_size=2",
    "privacy=dp",
    "progress=false",
    "projector=nearest",
    "matcher.init=random",
]


@pytest.mark.parametrize("match_loss", ["full_vocab", "verbalizer"])  # the canary release must carry the run's loss
def test_audit_entry_with_canaries(compose, tmp_path, match_loss):
    from gmtext.artifacts import write_jsonl
    from gmtext.runtime import build_task, load_generator_model

    write_jsonl(
        tmp_path / "gen" / "synthetic.jsonl",
        [
            {"text": t, "label": i % 2}
            for i, t in enumerate(
                [
                    "A dull film , truly",
                    "zebra quartz",
                    "the acting is fine",
                    "A warm, funny film that earns every one of its quiet tears.",
                ]
            )
        ],
    )
    cfg = compose(
        FAST
        + [
            f"synthetic={tmp_path / 'gen'}",
            "canaries.enabled=true",
            "canaries.k=2",
            "canaries.references=20",
            f"match_loss={match_loss}",
        ],
        config_name="audit",
    )
    assert cfg.stage == "audit" and cfg.ngram == 8
    s = stage_audit.run_audit(cfg, tmp_path / "audit")
    assert (
        s["share_with_real_ngram"] == 0.25 and s["longest_common_ngram"] == 14
    )  # the copied demo review (13 words + 1 punctuation token)
    out = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert out["overlap"]["num_synthetic"] == 4 and out["overlap"]["num_real"] == 40
    can = out["canaries"]
    assert can["k"] == 2 and can["privacy"] == "dp" and can["any_canary_ngram_in_output"] is False
    assert all(1 <= p["rank"] <= 21 for p in can["canaries"])
    # the stage's ranks are canary_exposure's under the generator model, which never saw the canaries
    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    want = A.canary_exposure(
        lm.model,
        lm.tokenizer,
        A.make_canaries(2, 8, cfg.seed),
        [r for r in A.make_canaries(22, 8, cfg.seed + 1) if r not in A.make_canaries(2, 8, cfg.seed)][:20],
        task.prefix_ids[:1],
    )
    assert [(p["canary"], p["rank"]) for p in can["canaries"]] == [(w["canary"], w["rank"]) for w in want]
    rel = json.loads((tmp_path / "audit" / "canary" / "release" / "privacy.json").read_text())
    assert rel["mechanism"] == "gaussian" and rel["match_loss"] == match_loss
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "Memorisation audit" in md and "Canaries" in md
    for c in A.make_canaries(2, 8, cfg.seed):  # canaries never reach generation artifacts
        for f in (tmp_path / "audit" / "canary").rglob("*"):
            if f.is_file():
                assert c.encode() not in f.read_bytes()


def test_audit_missing_synthetic(compose, tmp_path):
    cfg = compose(["debug=tiny", f"synthetic={tmp_path / 'nope'}"], config_name="audit")
    with pytest.raises(FileNotFoundError, match="synthetic="):
        stage_audit.run_audit(cfg, tmp_path)
