"""Noise calibration and accounting for non-subsampled Gaussian releases."""

from __future__ import annotations

import json
import math

import pytest

from gmtext.privacy.ledger import Ledger, LedgerEntry
from gmtext.privacy.accountant import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    classical_sigma,
    composed_epsilon,
    epsilon_for,
    sum_sensitivity,
    validate_budget,
)

ROUND_TRIP_CASES = [(1.0, 1e-5, 1), (0.05, 1e-4, 1), (4.0, 1e-5, 1), (0.5, 1e-5, 10), (2.0, 1e-6, 50)]


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("eps,delta,k", ROUND_TRIP_CASES)
def test_calibration_round_trip(accountant: str, eps: float, delta: float, k: int) -> None:
    m = calibrate_noise_multiplier(eps, delta, k, accountant)
    spent = epsilon_for(m, delta, k, accountant)
    assert spent <= eps
    assert spent >= 0.98 * eps
    # a bit less noise must overshoot: the multiplier is (near) the smallest one
    assert epsilon_for(m * 0.98, delta, k, accountant) > eps


def test_classical_formula_value() -> None:
    assert classical_sigma(1.0, 1e-5) == pytest.approx(4.845, abs=1e-3)
    assert classical_sigma(0.05, 1e-4) == pytest.approx(86.87, abs=0.01)


def test_expected_figures() -> None:
    assert 3.7 <= calibrate_noise_multiplier(1.0, 1e-5, 1, "prv") <= 3.9
    assert 3.7 <= calibrate_noise_multiplier(1.0, 1e-5, 1, "analytic") <= 3.9
    # exact value for eps=0.05, delta=1e-4 is ~44.8 (PRV ~45.0), well below classical ~86.9
    assert 44.0 <= calibrate_noise_multiplier(0.05, 1e-4, 1, "analytic") <= 46.0
    assert 44.0 <= calibrate_noise_multiplier(0.05, 1e-4, 1, "prv") <= 46.0


@pytest.mark.parametrize("eps", [0.05, 0.5, 1.0, 4.0])
def test_accountants_beat_classical(eps: float) -> None:
    delta = 1e-5
    classical = classical_sigma(eps, delta)
    exact = calibrate_noise_multiplier(eps, delta, 1, "analytic")
    prv = calibrate_noise_multiplier(eps, delta, 1, "prv")
    rdp = calibrate_noise_multiplier(eps, delta, 1, "rdp")
    assert prv < classical and exact < classical
    assert exact <= prv <= 1.02 * exact  # PRV is a tight upper bound on the exact curve
    assert prv <= rdp  # RDP is valid but looser
    if eps >= 1.0:
        assert rdp < classical


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_more_releases_need_more_noise(accountant: str) -> None:
    ms = [calibrate_noise_multiplier(1.0, 1e-5, k, accountant) for k in (1, 4, 16)]
    assert ms[0] < ms[1] < ms[2]


@pytest.mark.parametrize("k", [2, 10, 100])
def test_analytic_composition_is_single_gaussian(k: int) -> None:
    sigma = 7.3
    composed = epsilon_for(sigma, 1e-5, k, "analytic")
    single = epsilon_for(sigma / math.sqrt(k), 1e-5, 1, "analytic")
    assert composed == pytest.approx(single, rel=1e-9)


@pytest.mark.parametrize("m,k", [(3.8, 1), (1.0, 10), (20.0, 100)])
def test_prv_upper_bounds_exact_tightly(m: float, k: int) -> None:
    exact = epsilon_for(m, 1e-5, k, "analytic")
    prv = epsilon_for(m, 1e-5, k, "prv")
    rdp = epsilon_for(m, 1e-5, k, "rdp")
    assert exact <= prv <= exact * 1.011
    assert rdp >= exact


def test_prv_matches_microsoft_prv_accountant() -> None:
    prv_accountant = pytest.importorskip("prv_accountant")
    acc = prv_accountant.PRVAccountant(
        prvs=[prv_accountant.GaussianMechanism(5.0)], eps_error=1e-3, delta_error=1e-8, max_self_compositions=[20]
    )
    _, estimate, _ = acc.compute_epsilon(1e-5, [20])
    assert epsilon_for(5.0, 1e-5, 20, "prv") == pytest.approx(estimate, rel=0.01)


def test_heterogeneous_composition() -> None:
    pairs = [(2.0, 3), (5.0, 10), (3.0, 1)]
    exact = composed_epsilon(pairs, 1e-5, "analytic")
    mu = math.sqrt(3 / 4 + 10 / 25 + 1 / 9)
    assert exact == pytest.approx(epsilon_for(1 / mu, 1e-5, 1, "analytic"), rel=1e-9)
    prv = composed_epsilon(pairs, 1e-5, "prv")
    assert exact <= prv <= 1.011 * exact
    assert composed_epsilon(pairs, 1e-5, "rdp") >= exact
    # equal multipliers listed separately compose like one entry with the summed count
    assert composed_epsilon([(4.0, 2), (4.0, 3)], 1e-5, "prv") == pytest.approx(
        epsilon_for(4.0, 1e-5, 5, "prv"), rel=1e-12
    )


def _ledger(mults, delta=1e-5) -> Ledger:
    return Ledger(
        delta,
        [
            LedgerEntry(
                f"release{i}",
                "gaussian",
                "rt/train@x",
                noise_multiplier=m,
                sensitivity=2.0,
                sigma=2.0 * m,
                adjacency="replace_one",
            )
            for i, m in enumerate(mults)
        ],
    )


@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0])
def test_ledger_pld_matches_the_exact_gaussian_composition(eps: float) -> None:
    """The ledger composes with dp_accounting's PLD accountant; for full-batch Gaussians the
    analytic (Balle-Wang over GDP) value is exact, so the two must agree closely."""
    m = calibrate_noise_multiplier(eps, 1e-5, 1, "analytic")
    assert _ledger([m]).epsilon() == pytest.approx(composed_epsilon([(m, 1)], 1e-5, "analytic"), rel=1e-4)
    assert _ledger([m]).epsilon() <= eps * (1 + 1e-6)
    assert _ledger([m, 2 * m]).epsilon() == pytest.approx(
        composed_epsilon([(m, 1), (2 * m, 1)], 1e-5, "analytic"), rel=1e-4
    )


def test_ledger_round_trip_json() -> None:
    ledger = _ledger([3.0, 5.0])
    data = json.loads(json.dumps(ledger.to_dict()))
    restored = Ledger.from_dict(data)
    assert restored == ledger
    assert restored.epsilon() == pytest.approx(ledger.epsilon(), rel=1e-12) == pytest.approx(data["epsilon"])
    assert Ledger.from_dict({**data, "entries": []}).epsilon() == 0.0


def test_ledger_entry_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="sigma"):
        LedgerEntry("x", "gaussian", "s", noise_multiplier=2.0, sensitivity=0.1, sigma=1.0)
    with pytest.raises(ValueError, match="kind='laplace'"):
        LedgerEntry("x", "laplace", "s", noise_multiplier=2.0)
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        LedgerEntry("x", "gaussian", "s", noise_multiplier=0)
    with pytest.raises(ValueError, match="sample_rate"):
        LedgerEntry("x", "gaussian", "s", noise_multiplier=1.0, sample_rate=0.5)


def test_sum_sensitivity() -> None:
    assert sum_sensitivity(1.0, "add_remove") == pytest.approx(1.0)
    assert sum_sensitivity(1.0, "replace_one") == pytest.approx(2.0)
    assert sum_sensitivity(0.5, "replace_one") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'swap'.*replace_one.*add_remove"):
        sum_sensitivity(1.0, "swap")
    with pytest.raises(ValueError, match="clip_norm=-1"):
        sum_sensitivity(-1.0, "add_remove")


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(epsilon=0.0, delta=1e-5), "epsilon=0.0"),
        (dict(epsilon=-1.0, delta=1e-5), "epsilon=-1.0"),
        (dict(epsilon=float("inf"), delta=1e-5), "epsilon=inf"),
        (dict(epsilon=1.0, delta=0.0), "delta=0.0"),
        (dict(epsilon=1.0, delta=1.0), "delta=1.0"),
        (dict(epsilon=1.0, delta=1e-5, accountant="moments"), "'moments'"),
        (dict(epsilon=1.0, delta=1e-5, num_compositions=0), "num_compositions=0"),
        (dict(epsilon=1e-9, delta=1e-5, accountant="analytic", max_noise_multiplier=1e3), "epsilon=1e-09"),
        (dict(epsilon=1e-9, delta=1e-5, accountant="rdp", max_noise_multiplier=1e3), "epsilon=1e-09"),
        (dict(epsilon=1e-9, delta=1e-5, accountant="prv", max_noise_multiplier=1e3), "epsilon=1e-09"),
    ],
)
def test_invalid_calibration_inputs(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        calibrate_noise_multiplier(**kwargs)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_epsilon_for_inputs() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        epsilon_for(1.0, 1e-5, 1, "nope")
    with pytest.raises(ValueError, match="noise_multiplier=0"):
        epsilon_for(0.0, 1e-5, 1, "prv")


def test_validate_budget() -> None:
    assert validate_budget(1.0, 1e-5, n=1000) == []
    warns = validate_budget(1.0, 1e-2, n=1000)
    assert len(warns) == 1 and "1/n" in warns[0]
    assert any("weak" in w for w in validate_budget(20.0, 1e-6))
    for eps, delta, frag in [
        (0.0, 1e-5, "epsilon=0.0"),
        (-1.0, 1e-5, "epsilon=-1.0"),
        (float("nan"), 1e-5, "epsilon=nan"),
        (1.0, 0.0, "delta=0.0"),
        (1.0, 1.0, "delta=1.0"),
        (1.0, -0.5, "delta=-0.5"),
    ]:
        with pytest.raises(ValueError, match=frag):
            validate_budget(eps, delta)


def _dpsgd_entry(m: float, q: float, steps: int = 1) -> LedgerEntry:
    kw = dict(noise_multiplier=m, count=steps, sample_rate=q, adjacency="add_remove")
    return LedgerEntry("dpsgd", "subsampled_gaussian", "rt/train@x", **kw)


def _substitution_delta(eps: float, m: float, q: float) -> float:
    """δ(ε) of one Poisson-subsampled Gaussian step under replace-one, integrated directly: the
    replaced record's clipped gradient g or g' (norm ≤ 1, noise std m) enters the sum when its
    slot is sampled, so the outputs are q·N(g) + (1−q)·N(0) against q·N(g') + (1−q)·N(0); the
    worst pair is g' = −g on a line."""
    from scipy import integrate, stats

    def gap(x):
        p = q * stats.norm.pdf(x, -1, m) + (1 - q) * stats.norm.pdf(x, 0, m)
        r = q * stats.norm.pdf(x, 1, m) + (1 - q) * stats.norm.pdf(x, 0, m)
        return max(0.0, p - math.exp(eps) * r)

    return integrate.quad(gap, -40 * m, 40 * m, points=[-1, 0, 1], limit=400, epsabs=1e-13)[0]


@pytest.mark.parametrize("m,q", [(1.0, 0.1), (2.0, 0.03), (0.8, 1.0)])
def test_add_remove_entry_read_under_replace_one_matches_the_substitution_pair(m, q) -> None:
    """An add/remove entry (DP-SGD) in a replace-one ledger: its ε is the one of the substitution
    pair, derived here by integration, not the add/remove ε relabelled."""
    led = Ledger(1e-5, [_dpsgd_entry(m, q)], "replace_one")
    eps = led.epsilon()
    assert _substitution_delta(eps, m, q) <= 1e-5 * 1.001  # the ledger's ε is an upper bound...
    assert _substitution_delta(0.97 * eps, m, q) > 1e-5  # ...and a tight one
    assert eps > Ledger(1e-5, [_dpsgd_entry(m, q)]).epsilon()  # more than the add/remove reading
    if q == 1.0:  # a full-batch add/remove Gaussian is, under replace-one, one with twice the sensitivity
        assert eps == pytest.approx(_ledger([m / 2]).epsilon(), rel=1e-6)


def test_replace_one_dpsgd_is_within_group_privacy_of_its_add_remove_epsilon() -> None:
    """Replacing = removing + adding: (ε, δ) under add/remove gives (2ε, (1 + e^ε)δ) under
    replace-one. The ledger's replace-one reading of 93 DP-SGD steps lies between the two."""
    entry = _dpsgd_entry(1.5234375, 1 / 31, 93)  # the rotten tomatoes LoRA run at "ε = 1" (add/remove)
    ar = Ledger(1e-5, [entry]).epsilon()
    ro = Ledger(1e-5, [entry], "replace_one").epsilon()
    assert ar == pytest.approx(0.982, abs=0.002) and Ledger(1e-5, [entry]).relation == "add_remove"
    assert ar < ro
    assert Ledger((1 + math.exp(ar)) * 1e-5, [entry], "replace_one").epsilon() <= 2 * ar
    assert ro == pytest.approx(1.632, abs=0.005)
    d = Ledger(1e-5, [entry]).to_dict()
    assert d["adjacency"] == "add_remove" and d["epsilon_replace_one"] == pytest.approx(ro, rel=1e-9)


def test_a_mixed_ledger_is_stated_under_replace_one() -> None:
    """A GRADMM release (replace-one) merged with DP-SGD steps (add/remove): one relation, the
    DP-SGD entry converted, never the release's multiplier read as add/remove."""
    release, dpsgd = _ledger([8.0]), Ledger(1e-5, [_dpsgd_entry(1.5, 1 / 31, 93)])
    both = release.merged(dpsgd)
    assert both.relation == "replace_one" and both.to_dict()["adjacency"] == "replace_one"
    assert "epsilon_replace_one" not in both.to_dict()
    alone = Ledger(2e-5, list(dpsgd.entries), "replace_one").epsilon()
    assert both.epsilon() > alone > dpsgd.epsilon()
    with pytest.raises(ValueError, match="no add_remove epsilon"):
        release.epsilon("add_remove")
    restored = Ledger.from_dict(json.loads(json.dumps(Ledger(1e-5, list(dpsgd.entries), "replace_one").to_dict())))
    assert restored.adjacency == "replace_one" and restored.epsilon() == pytest.approx(
        Ledger(1e-5, list(dpsgd.entries), "replace_one").epsilon(), rel=1e-12
    )


def test_ledger_adjacency_values_are_checked() -> None:
    with pytest.raises(ValueError, match="adjacency='swap'"):
        Ledger(1e-5, [], "swap")
    with pytest.raises(ValueError, match="adjacency='swap'"):
        LedgerEntry("x", "gaussian", "s", noise_multiplier=1.0, adjacency="swap")
    with pytest.raises(ValueError, match="subsampled entry states its multiplier under add_remove"):
        LedgerEntry("x", "subsampled_gaussian", "s", noise_multiplier=1.0, sample_rate=0.1, adjacency="replace_one")


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_subsampled_calibration_under_replace_one(eps) -> None:
    """DP-SGD at a replace-one budget: the multiplier the ledger itself reads at ≤ ε, within
    0.1 % of the smallest such, and above the add/remove one for the same (q, steps)."""
    from gmtext.privacy.ledger import subsampled_noise_multiplier

    q, steps = 1 / 31, 20
    m = subsampled_noise_multiplier(eps, 1e-5, q, steps, "replace_one")
    assert Ledger(1e-5, [_dpsgd_entry(m, q, steps)], "replace_one").epsilon() <= eps
    assert Ledger(1e-5, [_dpsgd_entry(m / 1.002, q, steps)], "replace_one").epsilon() > eps
    assert m > subsampled_noise_multiplier(eps, 1e-5, q, steps, "add_remove")
