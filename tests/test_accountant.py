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
