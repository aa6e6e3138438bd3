"""Noise calibration and accounting for non-subsampled Gaussian releases.

GRADMM releases, per class and per matching step, the mean of per-example
gradients clipped to ``clip_norm`` plus Gaussian noise.  Nothing is subsampled
(every example of the class is in every release), so each release is a plain
Gaussian mechanism and a run is a composition of ``k`` of them.

Why not just use the textbook ``sigma = sqrt(2 ln(1.25/delta)) / epsilon``?
It is only proven for ``epsilon < 1`` and it is loose: a tight accountant
needs 10-50 % less noise for the same (epsilon, delta), which directly buys
utility.  So the noise is calibrated with a real accountant and the classical
formula is kept only for comparison (measured in ``docs/privacy_sigma_table.md``).

Accountants (``ACCOUNTANTS``):

``"prv"``
    Numerical composition of privacy-loss random variables (Gopi et al. 2021)
    using opacus' own machinery (``opacus.accountants.analysis.prv``: domain
    sizing, discretisation, FFT/heterogeneous composition, epsilon upper
    bound).  Opacus only ships a *Poisson-subsampled* Gaussian PRV, whose
    formulas take ``log(1 - q)`` and emit divide-by-zero warnings at
    ``q = 1``; we therefore feed it an exact non-subsampled Gaussian PRV
    (``_GaussianPRV``, loss ~ N(mu^2/2, mu^2)).  This keeps the dependency to
    opacus (already required) and is exactly what ``prv_accountant``'s
    ``GaussianMechanism`` does.  The reported value is the accountant's
    *upper* bound, with ``eps_error`` scaled to the answer (0.5 % of it).

``"rdp"``
    Renyi DP (opacus ``compute_rdp`` / ``get_privacy_spent`` with
    ``q = 1``), curves summed over mechanisms, converted with the Balle et al.
    2020 bound over a wide grid of orders.  Valid but looser.

``"analytic"``
    Analytic Gaussian mechanism (Balle & Wang 2018).  Composing Gaussian
    mechanisms with noise multipliers ``m_i`` is *exactly* one Gaussian
    mechanism with ``mu = sqrt(sum_i 1 / m_i^2)`` (Gaussian DP, Dong et al.),
    so this is the exact (epsilon, delta) curve: the tight reference the other
    two must upper-bound.

All functions are pure; there is no module state besides constants.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import log_ndtr, ndtr

from .ledger import ADJACENCIES  # defined in the ledger, the lower layer

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "analytic")

#: Upper end of the noise-multiplier search.  Anything above it means the
#: release is essentially pure noise; a budget that needs more is reported as
#: unreachable instead of silently returning a useless multiplier.
DEFAULT_MAX_NOISE_MULTIPLIER: float = 1e6

# PRV accuracy: eps_error = clip(_PRV_REL_EPS_ERROR * eps, min, max).
# Relative so that small budgets (eps = 0.05) are still certified to ~0.5 %,
# floored so that the discretisation mesh (and run time) stays bounded.
_PRV_REL_EPS_ERROR = 0.005
_PRV_MIN_EPS_ERROR = 5e-5
_PRV_MAX_EPS_ERROR = 0.01
_PRV_REL_DELTA_ERROR = 1e-3  # delta_error = delta / 1000, as opacus does

# RDP orders 1 + 10^-3 ... 1 + 10^8: wide enough that the optimum is interior
# even for multipliers in the thousands (the optimum grows like m*sqrt(2 ln 1/delta)).
_RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in 1.0 + np.logspace(-3, 8, 1500))


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    return accountant


def _check_adjacency(adjacency: str) -> str:
    if adjacency not in ADJACENCIES:
        raise ValueError(f"unknown adjacency {adjacency!r}; expected one of {ADJACENCIES}")
    return adjacency


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got delta={delta!r}")
    return float(delta)


def _check_epsilon(epsilon: float) -> float:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0.0):
        raise ValueError(f"epsilon must be a finite number > 0, got epsilon={epsilon!r}")
    return float(epsilon)


def _check_multiplier(noise_multiplier: float) -> float:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got noise_multiplier={noise_multiplier!r}")
    return float(noise_multiplier)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    return int(value)


def check_budget_args(
    prefix: str, epsilon, delta, accountant: str | None = None, accountants: Sequence[str] = ACCOUNTANTS
) -> None:
    """One-line errors for a budget as the user typed it under `prefix` (privacy, train), naming
    the bad value and what is accepted. The one check every private mechanism (the gradient
    release, PE's votes, DP-SGD) runs in its constructor, before any private data is read."""
    if isinstance(epsilon, bool) or not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"{prefix}.epsilon={epsilon!r}: accepted: a finite number > 0")
    if isinstance(delta, bool) or not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"{prefix}.delta={delta!r}: accepted: a number in (0, 1), well below 1/N")
    if accountant is not None and accountant not in accountants:
        raise ValueError(f"{prefix}.accountant={accountant!r}: accepted: {', '.join(accountants)}")


def validate_budget(epsilon: float, delta: float, n: int | None = None) -> list[str]:
    """Reject impossible budgets, and return warnings for legal-but-weak ones.

    Why: a bad budget should fail before any model is loaded, while
    questionable ones (``delta >= 1/n`` lets a mechanism publish one record
    in the clear) must be visible in the run log without blocking research.
    """
    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    warns: list[str] = []
    if n is not None:
        n = _check_count("n", n)
        if delta >= 1.0 / n:
            warns.append(
                f"delta={delta:g} >= 1/n={1.0 / n:g}: such a delta allows leaking a whole record; use delta << 1/n"
            )
    if epsilon > 10.0:
        warns.append(f"epsilon={epsilon:g} > 10 gives a very weak formal guarantee")
    return warns


# --------------------------------------------------------------------------- #
# sensitivity and the classical formula
# --------------------------------------------------------------------------- #
def sum_sensitivity(clip_norm: float, adjacency: str) -> float:
    """L2 sensitivity of the joint vector (S_1, ..., S_K) of per-class sums of clipped
    per-example gradients, when which records enter is decided record by record.

    * ``add_remove``: one record appears or disappears. It enters at most one class's sum,
      and only that sum moves, by its clipped gradient: norm <= C.
    * ``replace_one``: record r becomes r'. Same class: that sum moves by g' - g, norm <= 2C.
      Different classes: one sum loses g, another gains g', norm sqrt(|g|^2 + |g'|^2) <= sqrt(2) C.
      A record that leaves or joins the release (the per-record rule decides each on its
      own) is the add/remove case. The maximum, 2C, is charged.

    Dividing the released sums by a *public* constant D scales the sensitivity and the noise
    alike, so the guarantee is that of the sums. Why no count divides: a data-dependent count
    (or a fixed-size sample drawn from the pool) would let one record move every other term.
    """
    _check_adjacency(adjacency)
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got clip_norm={clip_norm!r}")
    return (2.0 if adjacency == "replace_one" else 1.0) * float(clip_norm)


def classical_sigma(epsilon: float, delta: float) -> float:
    """Textbook noise multiplier ``sqrt(2 ln(1.25/delta)) / epsilon`` (Dwork & Roth, Thm A.1).

    Why keep it: only as a baseline to show what the accountant saves.  It is
    proven for ``epsilon < 1`` only; for larger epsilon it is returned anyway
    and must not be used to release anything.
    """
    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


# --------------------------------------------------------------------------- #
# accountants (all take a list of (noise_multiplier, count) pairs)
# --------------------------------------------------------------------------- #
def _group(pairs: Iterable[tuple[float, int]]) -> list[tuple[float, int]]:
    """Merge equal multipliers so identical releases are self-composed by FFT."""
    merged: dict[float, int] = {}
    for m, k in pairs:
        m = _check_multiplier(m)
        k = _check_count("count", k)
        merged[m] = merged.get(m, 0) + k
    return sorted(merged.items())


def _gdp_mu(pairs: Sequence[tuple[float, int]]) -> float:
    """mu of the composition: sum of k/m^2 under the square root (exact for Gaussians)."""
    return math.sqrt(sum(k / (m * m) for m, k in pairs))


def _analytic_log_delta(eps: float, mu: float) -> float:
    """log delta(eps) of a mu-Gaussian mechanism (Balle & Wang 2018, Thm 8), in log space."""
    a = float(log_ndtr(mu / 2.0 - eps / mu))
    b = eps + float(log_ndtr(-mu / 2.0 - eps / mu))
    diff = b - a
    if diff >= 0.0:  # only from rounding when delta underflows
        return -math.inf
    return a + math.log(-math.expm1(diff))


def _analytic_epsilon(pairs: Sequence[tuple[float, int]], delta: float) -> float:
    mu = _gdp_mu(pairs)
    if 2.0 * float(ndtr(mu / 2.0)) - 1.0 <= delta:  # delta(0) already small enough
        return 0.0
    log_delta = math.log(delta)
    f = lambda e: _analytic_log_delta(e, mu) - log_delta  # noqa: E731  (decreasing in e)
    hi = max(1.0, mu * mu)
    while f(hi) > 0.0:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-14, rtol=1e-12, maxiter=500))


def _rdp_epsilon(pairs: Sequence[tuple[float, int]], delta: float) -> float:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(_RDP_ORDERS)
    rdp = sum(np.asarray(compute_rdp(q=1.0, noise_multiplier=m, steps=k, orders=orders), dtype=float) for m, k in pairs)
    with warnings.catch_warnings():
        # "optimal order is the largest alpha" would only mean a looser (still valid) bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return max(0.0, float(eps))


class _GaussianPRV:
    """Privacy-loss random variable of a non-subsampled Gaussian mechanism.

    The loss ``log(p(x)/q(x))`` with ``x ~ N(0, m^2)`` vs ``N(1, m^2)`` is
    ``N(mu^2/2, mu^2)`` with ``mu = 1/m``.  Exposes the duck-typed interface
    opacus' PRV helpers read (``noise_multiplier``, ``sample_rate``, ``pdf``,
    ``cdf``, ``rdp``); ``sample_rate = 1`` makes their RDP-based domain sizing
    use the exact Gaussian RDP ``alpha / (2 m^2)``.
    """

    sample_rate = 1.0

    def __init__(self, noise_multiplier: float) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.mu = 1.0 / self.noise_multiplier

    def pdf(self, t: Any) -> Any:
        z = np.asarray(t, dtype=float) / self.mu - self.mu / 2.0
        return np.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * self.mu)

    def cdf(self, t: Any) -> Any:
        return ndtr(np.asarray(t, dtype=float) / self.mu - self.mu / 2.0)

    def rdp(self, alpha: float) -> float:
        return alpha * self.mu * self.mu / 2.0


def _prv_epsilon(pairs: Sequence[tuple[float, int]], delta: float) -> float:
    from opacus.accountants.analysis.prv import (
        Domain,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        compute_safe_domain_size,
        discretize,
    )

    exact = _analytic_epsilon(pairs, delta)
    eps_error = min(_PRV_MAX_EPS_ERROR, max(_PRV_MIN_EPS_ERROR, _PRV_REL_EPS_ERROR * exact))
    delta_error = _PRV_REL_DELTA_ERROR * delta
    prvs = [_GaussianPRV(m) for m, _ in pairs]
    counts = [k for _, k in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # opacus' RDP domain sizing at its largest alpha
        length = compute_safe_domain_size(
            prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
        )
    # mesh from Gopi et al. Thm 5.5, as in opacus.accountants.PRVAccountant._get_domain
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12.0 / delta_error) / 2.0)
    domain = Domain.create_aligned(-length, length, mesh)
    dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain) for p in prvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    # the PRV upper bound is never below the exact value up to float noise; enforce it
    return max(float(eps_upper), exact)


_EPSILON_FUNCS = {"prv": _prv_epsilon, "rdp": _rdp_epsilon, "analytic": _analytic_epsilon}


def composed_epsilon(pairs: Iterable[tuple[float, int]], delta: float, accountant: str) -> float:
    """epsilon of composing ``count`` Gaussian releases per ``(noise_multiplier, count)`` pair.

    Why a pair list: the ledger may hold releases with different multipliers
    (heterogeneous composition), and equal ones are merged for speed.
    """
    _check_accountant(accountant)
    delta = _check_delta(delta)
    grouped = _group(pairs)
    if not grouped:
        return 0.0
    return _EPSILON_FUNCS[accountant](grouped, delta)


def epsilon_for(noise_multiplier: float, delta: float, num_compositions: int, accountant: str) -> float:
    """epsilon spent by ``num_compositions`` releases with std ``noise_multiplier * sensitivity``.

    Why: this is the forward direction of calibration, and what the run
    reports after the fact (no subsampling: every release sees all examples).
    """
    _check_multiplier(noise_multiplier)
    _check_count("num_compositions", num_compositions)
    return composed_epsilon([(noise_multiplier, num_compositions)], delta, accountant)


def calibrate_noise_multiplier(
    epsilon: float,
    delta: float,
    num_compositions: int = 1,
    accountant: str = "prv",
    tol: float = 1e-3,
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier (to relative ``tol``) whose ``epsilon_for`` is ``<= epsilon``.

    Why bisection on the accountant instead of a closed form: the PRV and RDP
    bounds have none, and the value returned is always one that was actually
    checked against the target (the upper end of the final bracket).  The exact
    analytic multiplier is a lower bound for every accountant, so it seeds the
    bracket.  ``max_noise_multiplier`` bounds the search; a budget that would
    need more noise raises ``ValueError``.
    """
    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    num_compositions = _check_count("num_compositions", num_compositions)
    _check_accountant(accountant)
    if not (isinstance(tol, (int, float)) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got tol={tol!r}")
    max_noise_multiplier = _check_multiplier(max_noise_multiplier)

    def eps_of(m: float) -> float:
        return epsilon_for(m, delta, num_compositions, accountant)

    # Lower end: the exact (analytic) multiplier minus a margin -- no valid
    # accountant can certify less noise.  For "analytic" itself start tiny.
    if accountant == "analytic":
        lo, growth = min(1e-3, max_noise_multiplier), 2.0
    else:
        lo = 0.99 * calibrate_noise_multiplier(
            epsilon, delta, num_compositions, "analytic", tol=tol / 10, max_noise_multiplier=max_noise_multiplier
        )
        growth = 1.02  # PRV/RDP are within a few % of exact: keep the bracket (and the PRV mesh) small
    if eps_of(lo) <= epsilon:
        return lo
    # Upper end: grow with an accelerating factor; evaluating at max_noise_multiplier
    # only when needed avoids the (slow, fine-mesh) PRV of near-zero epsilon.
    hi = lo
    while True:
        hi = min(hi * growth, max_noise_multiplier)
        if eps_of(hi) <= epsilon:
            break
        if hi >= max_noise_multiplier:
            raise ValueError(
                f"epsilon={epsilon:g} is unreachable (delta={delta:g}, {num_compositions} releases, "
                f"accountant={accountant!r}) with noise_multiplier <= {max_noise_multiplier:g}"
            )
        lo, growth = hi, growth * growth
    # geometric bisection: noise multipliers span orders of magnitude
    while hi / lo - 1.0 > tol:
        mid = math.sqrt(lo * hi)
        if eps_of(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi
