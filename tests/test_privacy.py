"""DP release: per-example gradients, clipping, Gaussian noise, ledger, config and the privacy boundary."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gmtext.gradients import MatchedParams
from gmtext.privacy import mechanism as M
from gmtext.privacy.ledger import Ledger
from gmtext.privacy import release as R
from gmtext.privacy.release import GaussianRelease, NoPrivacy, ReleaseInputs
from gmtext.runtime import select_real_examples
from gmtext.stages.release import run_release

TEXTS = ["A dull film.", "so so so so so so", "x", "The acting is wooden, the plot is worse and it is long."]
BLOCKS = ["final_norm", "last_blocks:1"]


def dp(**kw):
    base = dict(
        epsilon=1.0,
        delta=1e-5,
        clip_norm=1.0,
        accountant="analytic",
        adjacency="replace_one",
        sample_rate=1.0,
        divisor=None,
    )
    return GaussianRelease(**{**base, **kw})


def dp_release(mech, lm, task, mp, texts, num_rows, **kw):
    """(release, details) of a DP mechanism with this file's fingerprint and length."""
    inp = ReleaseInputs("fp", 64, num_rows, **{k: v for k, v in kw.items() if k in ("split", "match_loss")})
    return mech.release_with_details(
        lm.model, task, mp, texts, inp, **{k: v for k, v in kw.items() if k not in ("split", "match_loss")}
    )


def plain_release(lm, task, mp, texts, clip_norm=None, match_loss="full_vocab"):
    return NoPrivacy(clip_norm).release(lm.model, task, mp, texts, ReleaseInputs("fp", 64, 0, match_loss=match_loss))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("clip", [0.3, 1e6])  # clipping active / inactive
def test_closed_form_head_matches_loop(tiny, clip):
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    assert mp.head_only
    lab = task.label_token_ids[1]
    fast = M.clipped_sum(lm.model, task, mp, TEXTS, lab, clip, chunk=3, method="closed_form")
    loop = M.clipped_sum(lm.model, task, mp, TEXTS, lab, clip, method="loop")
    assert torch.allclose(fast.norms, loop.norms, rtol=1e-5)
    for a, b in zip(fast.sums, loop.sums):
        assert rel_err(a, b) < 1e-5


def test_vmap_matches_loop_blocks(tiny):
    lm, task = tiny
    mp = MatchedParams(lm.model, BLOCKS)
    lab = task.label_token_ids[0]
    v = M.per_example_grads_vmap(lm.model, task, mp, TEXTS, lab)
    l = M.per_example_grads_loop(lm.model, task, mp, TEXTS, lab)
    assert [tuple(g.shape) for g in v] == [(len(TEXTS), *p.shape) for p in mp.params]
    for a, b in zip(v, l):
        for i in range(len(TEXTS)):
            assert rel_err(a[i], b[i]) < 1e-5
    fast = M.clipped_sum(lm.model, task, mp, TEXTS, lab, 0.5, chunk=3, method="vmap")
    slow = M.clipped_sum(lm.model, task, mp, TEXTS, lab, 0.5, method="loop")
    for a, b in zip(fast.sums, slow.sums):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("specs", [["lm_head"], BLOCKS])
def test_verbalizer_loss_per_example_paths_agree(tiny, specs):
    """match_loss=verbalizer under DP: closed form (head), vmap and loop give the same clipped sum,
    and with clipping inactive the clipped mean is the non-private verbalizer target."""
    from gmtext.gradients import class_target_gradients, label_and_vocab

    lm, task = tiny
    mp = MatchedParams(lm.model, specs)
    label, vocab = label_and_vocab(task, 1, "verbalizer", "cpu")
    fast = M.clipped_sum(lm.model, task, mp, TEXTS, label, 1e6, chunk=3, vocab=vocab)  # auto: closed form or vmap
    loop = M.clipped_sum(lm.model, task, mp, TEXTS, label, 1e6, method="loop", vocab=vocab)
    assert torch.allclose(fast.norms, loop.norms, rtol=1e-5)
    ref = class_target_gradients(lm.model, task, mp, [TEXTS[:1], TEXTS], match_loss="verbalizer")
    for a, b, r in zip(fast.sums, loop.sums, ref.grads[1]):
        assert rel_err(a, b) < 1e-5
        assert rel_err(a / len(TEXTS), r) < 1e-5
    full = M.clipped_sum(lm.model, task, mp, TEXTS, task.label_token_ids[1], 1e6, chunk=3)
    assert rel_err(fast.sums[0], full.sums[0]) > 0.01  # a different loss, not the full-vocabulary one
    if mp.head_only:  # only the verbalizer rows of the head get a gradient
        other = torch.ones(fast.sums[0].shape[0], dtype=torch.bool)
        other[vocab] = False
        assert float(fast.sums[0][other].abs().max()) == 0.0
        clipped = M.clipped_sum(lm.model, task, mp, TEXTS, label, 0.01, chunk=3, vocab=vocab)
        slow = M.clipped_sum(lm.model, task, mp, TEXTS, label, 0.01, method="loop", vocab=vocab)
        assert rel_err(clipped.sums[0], slow.sums[0]) < 1e-5


def test_dp_release_verbalizer_records_loss(tiny):
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    rel, det = dp_release(dp(), lm, task, mp, [TEXTS, TEXTS[::-1]], 8, match_loss="verbalizer")
    assert rel.privacy["match_loss"] == "verbalizer"
    vocab = torch.tensor(task.label_token_ids)
    for c in range(2):
        rows = det.clipped_sums[c][0].abs().sum(1).nonzero().flatten()
        assert set(rows.tolist()) <= set(vocab.tolist()) and len(rows) > 0
        # noise everywhere (the rows are public), on the sums; the target is divided by the public divisor
        assert float(rel.targets[c][0].std()) * det.divisor == pytest.approx(det.sigma, rel=0.05)


def test_a_non_finite_gradient_contributes_nothing(tiny, monkeypatch):
    """One record with a NaN or Inf gradient used to turn its class's whole sum into NaN (and
    the run's failure revealed it). It now contributes zero, on both clipping paths; the other
    records' clipped sum is untouched."""
    from gmtext.privacy import mechanism as M

    g = torch.tensor([[3.0, 4.0], [float("nan"), 1.0], [float("inf"), 0.0], [0.3, 0.4]])
    (s,), nrm = M._clip_materialised([g], 1.0)
    torch.testing.assert_close(s, torch.tensor([0.6 + 0.3, 0.8 + 0.4]))
    assert M.clip_factors(nrm, 1.0).tolist()[1:3] == [0.0, 0.0]
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    bad = TEXTS[2]
    clean = M.clipped_sum(lm.model, task, mp, [t for t in TEXTS if t != bad], 0, 0.5, 64, method="closed_form").sums
    real = M._head_chunk

    def poisoned(model, matched, task, texts, *a, **k):
        e, h = real(model, matched, task, texts, *a, **k)
        rows = torch.tensor([t == bad for t in texts])
        return e.masked_fill(rows[:, None], float("nan")), h.masked_fill(rows[:, None], float("inf"))

    monkeypatch.setattr(M, "_head_chunk", poisoned)
    dirty = M.clipped_sum(lm.model, task, mp, TEXTS, 0, 0.5, 64, method="closed_form").sums
    for a, b in zip(dirty, clean):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("specs", [["lm_head"], BLOCKS])
def test_clipping_bound(tiny, specs):
    lm, task = tiny
    mp = MatchedParams(lm.model, specs)
    lab = task.label_token_ids[0]
    clip = 0.25
    for t in TEXTS:  # one example: the clipped gradient has norm min(||g||, C), never more
        cs = M.clipped_sum(lm.model, task, mp, [t], lab, clip)
        norm = math.sqrt(sum(float((s * s).sum()) for s in cs.sums))
        assert cs.norms[0] > clip  # clipping is active on this random model
        assert norm <= clip * (1 + 1e-5) and norm == pytest.approx(clip, rel=1e-4)
    cs = M.clipped_sum(lm.model, task, mp, TEXTS, lab, clip)
    assert math.sqrt(sum(float((s * s).sum()) for s in cs.sums)) <= len(TEXTS) * clip * (1 + 1e-5)


@pytest.fixture(scope="module")
def two_releases(tiny):
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    texts = [TEXTS, TEXTS[::-1]]
    torch.manual_seed(0)
    a = dp_release(dp(), lm, task, mp, texts, 8, split="demo/train@x")
    torch.manual_seed(0)  # same experiment seed: the noise must still differ
    b = dp_release(dp(), lm, task, mp, texts, 8, split="demo/train@x")
    return a, b, mp


def test_one_gaussian_over_all_classes(two_releases):
    """Sensitivity 2C on the joint vector of sums (replace-one), one draw, σ = multiplier × 2C
    with the multiplier of a single (ε, δ) Gaussian, targets = (sum + noise) / public divisor."""
    from gmtext.privacy.accountant import calibrate_noise_multiplier, epsilon_for

    (rel, det), _, mp = two_releases
    assert det.sensitivity == pytest.approx(2.0) and det.divisor == pytest.approx(8 / 2)
    assert det.noise_multiplier == pytest.approx(calibrate_noise_multiplier(1.0, 1e-5, 1, "analytic"))
    assert epsilon_for(det.noise_multiplier, 1e-5, 1, "analytic") <= 1.0
    z = torch.cat([t.flatten() for c in range(2) for t in det.noise[c]])
    assert z.numel() > 2_000_000
    assert float(z.std()) == pytest.approx(det.sigma, rel=0.01) and abs(float(z.mean())) < 0.01 * det.sigma
    for c in range(2):
        for t, s, n in zip(rel.targets[c], det.clipped_sums[c], det.noise[c]):
            torch.testing.assert_close(t, ((s.double() + n).float() / det.divisor), rtol=1e-6, atol=1e-6)


def test_release_noise_comes_from_the_secure_source(tiny, monkeypatch):
    """Replacing the OS entropy source makes the noise reproducible, and nothing else does:
    the release draws from privacy/noise.py alone (the old torch generator kept 32 seed bits)."""
    import itertools

    from gmtext.privacy import noise

    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])

    def fixed_bytes():
        counter = itertools.count()
        return lambda n: bytes((next(counter) * 7919) % 256 for _ in range(n))

    dets = []
    for _ in range(2):
        monkeypatch.setattr(noise.os, "urandom", fixed_bytes())
        dets.append(dp_release(dp(), lm, task, mp, [TEXTS[:2], TEXTS[2:]], 4)[1])
    for a, b in zip(dets[0].noise[0], dets[1].noise[0]):
        assert torch.equal(a, b)


def test_same_seed_fresh_noise_same_clipped_sums(two_releases):
    (ra, da), (rb, db), _ = two_releases
    for c in range(2):
        for ma, mb in zip(da.clipped_sums[c], db.clipped_sums[c]):
            assert torch.allclose(ma, mb, rtol=1e-6, atol=1e-9)
        for za, zb in zip(da.noise[c], db.noise[c]):
            assert not torch.allclose(za, zb)
    assert not torch.allclose(ra.targets[0][0], rb.targets[0][0])


def test_privacy_json_ledger(two_releases, tmp_path):
    (rel, det), _, mp = two_releases
    rel.save(tmp_path)
    p = json.loads((tmp_path / "privacy.json").read_text())
    assert p["mechanism"] == "gaussian" and p["adjacency"] == "replace_one" and p["delta"] == 1e-5
    assert 0.99 <= p["epsilon"] <= 1.0 + 1e-6  # one Gaussian, calibrated exactly, re-accounted by the PLD accountant
    assert p["num_records"] == 8 and p["divisor"] == 4.0 and p["sensitivity"] == 2.0
    assert "os.urandom" in p["noise_source"]
    (entry,) = p["ledger"]["entries"]
    assert entry["kind"] == "gaussian" and entry["split"] == "demo/train@x" and entry["count"] == 1
    assert entry["sigma"] == pytest.approx(det.sigma) and entry["noise_multiplier"] == pytest.approx(
        det.noise_multiplier
    )
    assert Ledger.from_dict(p["ledger"]).epsilon() == pytest.approx(p["epsilon"], rel=1e-9)
    loaded = R.Release.load(tmp_path)
    assert loaded.epsilon == pytest.approx(p["epsilon"]) and loaded.divisors == [4.0, 4.0]


def test_add_remove_sensitivity_and_divisor(tiny):
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    with pytest.raises(ValueError, match="privacy.divisor"):  # the row count is private under add/remove
        dp_release(dp(adjacency="add_remove", clip_norm=2.0), lm, task, mp, [TEXTS, TEXTS], 8)
    rel, det = dp_release(dp(adjacency="add_remove", clip_norm=2.0, divisor=10.0), lm, task, mp, [TEXTS, TEXTS], 8)
    assert det.sensitivity == pytest.approx(2.0) and det.divisor == 10.0
    assert rel.privacy["adjacency"] == "add_remove" and "withheld" in rel.privacy["num_records"]


def test_a_multiplier_the_ledger_does_not_certify_stops_before_any_record_is_read(tiny, monkeypatch):
    """The calibration (analytic curve) and the reported ε (the ledger's PLD) are different
    accountants: the release checks they agree before it reads a record."""
    from gmtext.privacy import release as P

    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    mech = dp()
    assert mech.check_spend([mech.noise_multiplier]) is None  # the real calibration passes
    monkeypatch.setattr(P, "_calibrate", lambda e, d, a: 0.9 * P.calibrate_noise_multiplier(e, d, 1, a))
    read = []
    monkeypatch.setattr(P, "_clipped_sums", lambda *a, **k: read.append(1) or [])
    with pytest.raises(RuntimeError, match=r"^privacy: noise multipliers \[.*\] compose to epsilon=1\.[0-9]+ .* over "):
        dp_release(mech, lm, task, mp, [TEXTS, TEXTS], 8)
    with pytest.raises(RuntimeError, match="over privacy.epsilon=1"):
        mech.release_joint(lm.model, task, [(mp, "a"), (mp, "b")], [TEXTS, TEXTS], ReleaseInputs("fp", 64, 8), 0.5)
    assert read == []


def test_reused_release_must_have_the_same_adjacency():
    rel = R.Release(
        [[torch.zeros(2)]],
        ["w"],
        ["a"],
        [1.0],
        "fp",
        {"mechanism": "gaussian", "epsilon": 0.9, "delta": 1e-5, "adjacency": "add_remove"},
    )
    dp(adjacency="add_remove", divisor=10.0).check_reuse(rel)
    with pytest.raises(R.ReleaseMismatch, match="adjacency"):
        dp().check_reuse(rel)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(epsilon=0.0), "privacy.epsilon=0.0"),
        (dict(epsilon=-1.0), "privacy.epsilon=-1.0"),
        (dict(epsilon=math.inf), "privacy.epsilon=inf"),
        (dict(delta=0.0), "privacy.delta=0.0"),
        (dict(delta=1.0), "privacy.delta=1.0"),
        (dict(clip_norm=0.0), "privacy.clip_norm=0.0"),
        (dict(clip_norm=-2.0), "privacy.clip_norm=-2.0"),
        (dict(accountant="moments"), "privacy.accountant='moments'"),
        (dict(adjacency="swap"), "privacy.adjacency='swap'"),
        (dict(sample_rate=0.0), "privacy.sample_rate=0.0"),
        (dict(sample_rate=1.5), "privacy.sample_rate=1.5"),
        (dict(divisor=-1.0), "privacy.divisor=-1.0"),
    ],
)
def test_bad_settings_fail(kw, msg):
    with pytest.raises(ValueError) as e:
        dp(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_dp_refuses_a_fixed_number_per_class():
    with pytest.raises(ValueError, match="real_per_class=50") as e:
        dp().check_inclusion(50)
    assert "\n" not in str(e.value)


def test_large_delta_warns(tiny):
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    with pytest.warns(UserWarning, match="delta"):
        dp_release(dp(delta=0.2), lm, task, mp, [TEXTS, TEXTS], 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp_release(dp(), lm, task, mp, [TEXTS, TEXTS], 8)


def test_short_or_empty_class_is_zero_padded_not_an_error(tiny):
    """A class with fewer (or no) records contributes a smaller (or zero) sum: the release does
    not stop, so whether it completes says nothing about the class sizes."""
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    rel, det = dp_release(dp(), lm, task, mp, [TEXTS, []], 8)
    assert all(float(s.abs().max()) == 0.0 for s in det.clipped_sums[1])
    assert float(rel.targets[1][0].std()) > 0  # noise only


FAST = [
    "debug=tiny",
    "matcher.outer_steps=1",
    "matcher.inner_steps=1",
    "num_per_class=2",
    "batch_size=2",
    "privacy=dp",
    "progress=false",
    "projector.topk=1",
    "matcher.init=random",
]


def _real_used(cfg):
    texts, _ = select_real_examples(cfg.dataset, len(cfg.dataset.label_names), cfg.real_per_class, cfg.seed)
    return [t for ts in texts for t in ts]


def _scan(run_dir, sentences):
    for f in Path(run_dir).rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in sentences:
                assert s.encode() not in data, f"real sentence {s!r} found in {f}"


def test_dp_generate_run_writes_no_real_text(compose, tmp_path):
    from gmtext.stages.generate import run_generate

    cfg = compose(FAST)
    assert cfg.privacy.name == "dp" and cfg.privacy.epsilon == 1.0
    summary = run_generate(cfg, tmp_path)
    assert summary["examples"] == 4 and 0.95 <= summary["epsilon"] <= 1.0
    p = json.loads((tmp_path / "release" / "privacy.json").read_text())
    assert p["mechanism"] == "gaussian" and p["num_records"] == 40  # the demo train split, every row
    gen = json.loads((tmp_path / "generate.json").read_text())
    assert gen["privacy"]["epsilon"] == p["epsilon"] and gen["privacy"]["ledger"] == p["ledger"]
    used = _real_used(cfg)
    assert len(used) >= 30  # every record outside the dev bucket
    _scan(tmp_path, used)


def test_release_then_generate_without_real_data(compose, tmp_path, monkeypatch):
    import gmtext.data
    from gmtext.stages.generate import run_generate

    cfg = compose(FAST, config_name="release")
    assert cfg.stage == "release"
    s = run_release(cfg, tmp_path / "rel")
    assert s["mechanism"] == "gaussian" and not s["reused"] and s["divisors"] == [20.0, 20.0]
    assert not any("seconds" in k and k != "model_load_seconds" for k in s)  # no timing of the private pass
    assert (tmp_path / "rel" / "release" / "privacy.json").exists()

    def boom(*a, **k):
        raise AssertionError("real data read after the release")

    monkeypatch.setattr(gmtext.data, "load_split", boom)
    import gmtext.runtime

    monkeypatch.setattr(gmtext.runtime, "load_configured", boom)
    s2 = run_release(cfg, tmp_path / "rel")  # existing release reused: no second noisy release
    assert s2["reused"] and s2["epsilon"] == s["epsilon"]
    release = str(tmp_path / "rel" / "release")
    summary = run_generate(compose(FAST + [f"release={release}"]), tmp_path / "gen")
    assert summary["examples"] == 4 and summary["epsilon"] == pytest.approx(s["epsilon"])
    assert not (tmp_path / "gen" / "release").exists()
    with pytest.raises(R.ReleaseMismatch, match="epsilon"):  # stricter budget than the release spent
        run_generate(compose(FAST + [f"release={release}", "privacy.epsilon=0.5"]), tmp_path / "gen2")
    monkeypatch.undo()
    _scan(tmp_path, _real_used(cfg))


def test_release_cli_bad_epsilon_one_line_error(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import release_main; release_main()",
            "model=tiny_llama",
            "logger=none",
            "privacy=dp",
            "privacy.epsilon=0",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "GMTEXT_TRACEBACK": ""},
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1] == "gmtext-release: error: privacy.epsilon=0.0: accepted: a finite number > 0"
    )


@pytest.mark.parametrize("specs", [["lm_head"], BLOCKS])
def test_clipped_nonprivate_release(tiny, specs):
    """privacy=none with clip_norm: a huge C gives the plain means; a C below every norm gives
    C times the mean of per-example gradient directions (each example weighted equally)."""
    lm, task = tiny
    mp = MatchedParams(lm.model, specs)
    by_class = [TEXTS, TEXTS[::-1][:3]]
    plain = plain_release(lm, task, mp, by_class, match_loss="verbalizer")
    big = plain_release(lm, task, mp, by_class, 1e9, match_loss="verbalizer")
    tiny_c = 1e-7
    small = plain_release(lm, task, mp, by_class, tiny_c, match_loss="verbalizer")
    assert small.epsilon == math.inf and small.privacy["clip_norm"] == tiny_c and small.divisors == [4, 3]
    for c, texts in enumerate(by_class):
        for a, b in zip(big.targets[c], plain.targets[c]):
            assert rel_err(a, b) < 1e-5
        units = []  # each example's own gradient (a one-example release), normalised jointly over tensors
        for t in texts:
            g = plain_release(lm, task, mp, [[t], [t]], match_loss="verbalizer").targets[c]
            n = torch.sqrt(sum((x.float() ** 2).sum() for x in g))
            assert n > tiny_c
            units.append([x.float() / n for x in g])
        for k, got in enumerate(small.targets[c]):
            want = tiny_c * sum(u[k] for u in units) / len(texts)
            assert rel_err(got, want) < 1e-4
    assert (
        rel_err(torch.cat([t.flatten() for t in small.targets[1]]), torch.cat([t.flatten() for t in small.targets[0]]))
        > 1e-3
    )


def test_clipped_release_reuse_checks_clip_norm(tmp_path):
    rel = R.Release(
        [[torch.zeros(2)]], ["w"], ["a"], [1.0], "fp", {"mechanism": "none", "epsilon": math.inf, "clip_norm": 0.5}
    )
    NoPrivacy(0.5).check_reuse(rel)
    with pytest.raises(R.ReleaseMismatch, match="clip_norm"):
        NoPrivacy(None).check_reuse(rel)
    with pytest.raises(ValueError, match=r"privacy.clip_norm=-1\.0"):
        NoPrivacy(-1.0).check_reuse(rel)
