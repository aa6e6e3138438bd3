"""The generate stage end to end on the tiny model and the builtin demo set."""

import json

import pytest
import torch

from gmtext.artifacts import ConfigChanged, read_jsonl
from gmtext.stages.generate import run_generate

FAST = [
    "debug=tiny",
    "matcher.outer_steps=2",
    "matcher.inner_steps=2",
    "matcher.init_candidates=2",
    "projector.topk=20",
    "num_per_class=4",
    "batch_size=2",
    "real_per_class=6",
    "dataset.length=6",
    "progress=false",
]
FIELDS = {
    "text",
    "label",
    "label_name",
    "match_loss",
    "token_match_loss",
    "perplexity",
    "batch",
    "class_batch_loss",
    "token_ids",
}


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
    assert s["mean_match_loss"] == pytest.approx(sum(r["match_loss"] for r in rows) / 8)


def _objective(cfg, run_dir, contrastive=None):
    """The generator's objective for a finished run, rebuilt from its config and release
    (`contrastive`: another β than the run's)."""
    from gmtext.config import build
    from gmtext.gradients import MatchedParams
    from gmtext.matching.objective import MatchingObjective
    from gmtext.runtime import build_task, load_generator_model
    from gmtext.privacy.release import Release

    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    m = build(cfg.matcher)
    obj = MatchingObjective(
        lm.model,
        MatchedParams(lm.model, list(cfg.matched_params)),
        Release.load(run_dir / "release").targets,
        task.label_token_ids,
        task.prefix_ids,
        task.suffix_ids,
        distance=m.distance,
        closed_form=m.closed_form,
        context_ids=task.lm_context_ids(cfg.dataset.lm_context),
        match_loss=cfg.match_loss,
        contrastive=m.contrastive if contrastive is None else contrastive,
        seq_chunk=m.seq_chunk,
    )
    return lm, task, obj


def _row_loss(obj, ids, label, num_classes):
    """One sequence's own distance through the batch path ([C, 1, L], the ids in every class slot)."""
    t = torch.tensor(ids).view(1, 1, -1).expand(num_classes, 1, -1)
    return obj.discrete(t, per_sequence=True)[1][label, 0].item()


@pytest.mark.parametrize("contrastive,seq_chunk", [(0.0, 0), (1.0, 1)])
def test_match_loss_is_the_loss_of_the_written_text(compose, tmp_path, contrastive, seq_chunk):
    """match_loss is the distance of the text as written (decoded, tokenised again), which is
    what selection ranks and fine-tuning trains on; token_match_loss keeps the optimised ids'
    distance. On the tiny model many texts do not re-tokenise to their ids, and there the two differ.
    Under matcher.contrastive = β, token_match_loss is what the matcher judged the ids by (own
    distance − β × the closest rival's), and match_loss stays the own-target distance."""
    cfg = compose(FAST + [f"matcher.contrastive={contrastive}", f"matcher.seq_chunk={seq_chunk}"])
    run_generate(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "synthetic.jsonl")
    lm, task, obj = _objective(cfg, tmp_path)
    _, _, own = _objective(cfg, tmp_path, contrastive=0.0)
    changed = 0
    for r in rows:
        assert len(r["token_ids"]) == cfg.dataset.length
        assert lm.tokenizer.decode(r["token_ids"], skip_special_tokens=True).strip() == r["text"]
        assert r["token_match_loss"] == pytest.approx(_row_loss(obj, r["token_ids"], r["label"], 2), abs=1e-5)
        again = task.encode_text(r["text"])
        assert r["match_loss"] == pytest.approx(_row_loss(own, again, r["label"], 2), abs=1e-5)
        if contrastive:
            assert r["token_match_loss"] < _row_loss(own, r["token_ids"], r["label"], 2)  # the rival term counted
        elif again != r["token_ids"] and abs(r["match_loss"] - r["token_match_loss"]) > 1e-4:
            changed += 1
        elif again == r["token_ids"]:
            assert r["match_loss"] == pytest.approx(r["token_match_loss"], abs=1e-5)
    assert changed >= 1 or contrastive  # else this test could not tell the two losses apart


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
    # resuming the half-finished dir with another seed would append batches of seed 1 to seed 0's
    files = _snapshot(part)
    with pytest.raises(
        ConfigChanged, match=r"holds generate output made with another config \(finetuner.seed 0 → 1, seed 0 → 1\)"
    ):
        run_generate(compose(FAST + ["seed=1"]), part)
    assert _snapshot(part) == files
    s = run_generate(compose(FAST), part)
    assert s["batches_generated_now"] == 1
    assert (part / "synthetic.jsonl").read_text() == (full / "synthetic.jsonl").read_text()


def _snapshot(d):
    """Every file under d with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_rerun_with_another_config_is_refused_and_writes_nothing(compose, tmp_path):
    """A finished seed-0 dir rerun with other settings used to exit 0,
    regenerate nothing and record the new seed in generate.json beside seed 0's texts."""
    run_generate(compose(FAST), tmp_path)
    files = _snapshot(tmp_path)
    with pytest.raises(ConfigChanged) as e:
        run_generate(compose(FAST + ["seed=1", "real_per_class=12", "matcher.outer_steps=1"]), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path} holds generate output made with another config (")
    assert "matcher.outer_steps 2 → 1, real_per_class 6 → 12, seed 0 → 1)" in msg
    assert _snapshot(tmp_path) == files  # not even generate.json or the tracker's log
    # keys that shape nothing may differ: the finished run is resumed, nothing regenerated
    s = run_generate(compose(FAST + ["progress=true", "logger=none"]), tmp_path)
    assert s["batches_generated_now"] == 0 and s["examples"] == 8
    assert (tmp_path / "synthetic.jsonl").read_bytes() == files["synthetic.jsonl"]


def test_pool_may_grow_when_its_batches_stay_whole(compose, tmp_path):
    """num_per_class alone may change when every batch the two runs share has the same size:
    the grown pool is byte-identical to one generated at that size from the start."""
    from omegaconf import OmegaConf

    from gmtext.stages.generate import pool_grows_cleanly

    small = FAST + ["matcher.outer_steps=1", "real_per_class=2"]
    run_generate(compose(small + ["num_per_class=2"]), tmp_path / "grow")  # one batch of 2 per class
    s = run_generate(compose(small + ["num_per_class=4"]), tmp_path / "grow")
    assert s["batches_generated_now"] == 1 and s["examples"] == 8
    run_generate(compose(small + ["num_per_class=4"]), tmp_path / "fresh")
    assert (tmp_path / "grow" / "synthetic.jsonl").read_bytes() == (tmp_path / "fresh" / "synthetic.jsonl").read_bytes()
    cfg = lambda n, b=2: OmegaConf.create({"num_per_class": n, "batch_size": b})
    assert pool_grows_cleanly({"num_per_class": 4, "batch_size": 2}, cfg(5))  # batches 0-1 whole in both
    assert not pool_grows_cleanly({"num_per_class": 5, "batch_size": 2}, cfg(6))  # batch 2: 1 row, then 2
    assert not pool_grows_cleanly({"num_per_class": 4, "batch_size": 2}, cfg(4, 4))  # other batches
    with pytest.raises(
        ConfigChanged, match=r"\(batch_size 2 → 4, num_per_class 4 → 8\)"
    ):  # the record names the grown pool
        run_generate(compose(small + ["num_per_class=8", "batch_size=4"]), tmp_path / "grow")


def test_release_reuse_and_fingerprint(compose, tmp_path):
    a = tmp_path / "a"
    run_generate(compose(FAST), a)
    b = tmp_path / "b"
    s = run_generate(compose(FAST + [f"release={a / 'release'}", "seed=1"]), b)
    assert s["examples"] == 8 and not (b / "release").exists()
    with pytest.raises(ValueError, match="fingerprint"):
        run_generate(
            compose(FAST + [f"release={a / 'release'}", "dataset.verbalizers=[' awful',' good']"]), tmp_path / "c"
        )


def test_embedding_only_and_nearest(compose, tmp_path):
    # debug=tiny tunes the default lm_topk projector (sim_weight), a key projector=nearest does not have
    base = ["model=tiny_llama", "logger=none", "selector=best", "matched_params=[lm_head]", "match_loss=full_vocab"] + [
        o for o in FAST if not o.startswith(("projector.", "matcher.", "debug="))
    ]
    s = run_generate(
        compose(
            base
            + [
                "matcher=embedding_only",
                "matcher.outer_steps=1",
                "matcher.inner_steps=2",
                "matcher.objective=batch",
                "projector=nearest",
            ]
        ),
        tmp_path,
    )
    assert s["examples"] == 8
    # per batch: one x-run with no ADMM penalty and no intermediate projection, then the final
    # projection, whose best loss is what the batch's rows record as their class loss
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    rows = read_jsonl(tmp_path / "synthetic.jsonl")
    for b in (0, 1):
        mine = [r for r in recs if r["batch"] == b]
        assert [r["outer_step"] for r in mine] == [0, 1]
        assert mine[0]["admm_penalty"] == 0.0 and "perplexity" not in mine[0]
        class_loss = {r["label"]: r["class_batch_loss"] for r in rows if r["batch"] == b}
        assert mine[1]["best_discrete_loss"] == pytest.approx(sum(class_loss.values()) / 2)
        assert mine[1]["best_discrete_loss"] <= mine[1]["discrete_loss"] + 1e-7


def test_cli_bad_value_one_line_error(tmp_path):
    from test_hardening import cli, no_outputs, one_line_error

    r = cli("generate", "debug=tiny", "projector.topk=0", f"hydra.run.dir={tmp_path}")
    assert (
        one_line_error(r, "generate") == "gmtext-generate: error: projector.topk=0 must be a positive integer"
    )  # the whole stderr
    no_outputs(tmp_path)


def test_verbalizer_match_loss_end_to_end(compose, tmp_path):
    s = run_generate(compose(FAST + ["match_loss=verbalizer"]), tmp_path / "v")
    assert s["examples"] == 8 and all(0 <= r["match_loss"] <= 2 for r in read_jsonl(tmp_path / "v" / "synthetic.jsonl"))
    with pytest.raises(ValueError, match="fingerprint"):  # a verbalizer-loss release cannot serve a full-vocab run
        run_generate(compose(FAST + [f"release={tmp_path / 'v' / 'release'}"]), tmp_path / "f")
    from hydra.errors import ConfigCompositionException

    with pytest.raises(
        ConfigCompositionException, match="match_loss=bogus"
    ):  # a closed choice: refused at compose time
        compose(FAST + ["match_loss=bogus"])


def test_no_kv_cache_rename_notice_in_the_progress_bar(compose, tmp_path, capfd, recwarn):
    """transformers' `past_key_values` deprecation (a FutureWarning and a logger line) is
    silenced where generation triggers it, so it does not cut through the progress bar."""
    run_generate(compose([o for o in FAST if o != "progress=false"] + ["progress=true"]), tmp_path / "p")
    err = capfd.readouterr().err
    assert "generate" in err  # the bar was drawn
    assert "past_key_values" not in err
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_class_prompt_starts_run_through_the_stage(compose, tmp_path):
    """matcher.init=class_prompt end to end: the prompts come from the dataset's public label
    descriptions; a prompt too long for the model's context is refused before the release."""
    fast = [o for o in FAST if not o.startswith(("matcher.outer_steps", "matcher.inner_steps"))]
    fast += ["matcher=none", "matcher.init=class_prompt"]
    s = run_generate(compose(fast), tmp_path / "ok")
    assert s["examples"] == 8 and len(read_jsonl(tmp_path / "ok" / "synthetic.jsonl")) == 8
    long = "word " * 3000
    with pytest.raises(ValueError, match="dataset.length=6: must be >= 1 and fit the model context"):
        run_generate(
            compose(fast + [f"matcher.init_prompt='{long}{{description}}'"]),
            tmp_path / "long",
        )
    assert not (tmp_path / "long" / "release").exists()
