"""generator=pe's privacy side: the budget of the T votes, their noise multiplier and the ledger
record every later stage composes (docs/pe.md, "Privacy argument"). The vote mechanism itself
is vote.VoteRelease; the stage (stages/generate.py) reads the records and writes the files."""

from __future__ import annotations

import math

from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..privacy import noise
from ..privacy.accountant import calibrate_noise_multiplier, check_budget_args, validate_budget
from ..privacy.ledger import Ledger, LedgerEntry
from .pe import PrivateEvolution
from .vote import VoteRelease, vote_sensitivity

PE_MECHANISM = "pe_gaussian_votes"


def pe_budget(cfg: DictConfig) -> dict | None:
    """(epsilon, delta, accountant, adjacency) from privacy=<option> when it has a budget
    (privacy=dp), None for privacy=none (noiseless votes, ε = ∞). One-line errors otherwise."""
    p = cfg.privacy
    if p.get("epsilon") is None:
        return None
    eps, delta = p.epsilon, p.delta
    check_budget_args("privacy", eps, delta, str(p.get("accountant", "analytic")))
    if float(p.get("sample_rate", 1.0)) != 1.0:
        raise ValueError(
            f"privacy.sample_rate={p.get('sample_rate')!r}: generator=pe votes with every record (no subsampling "
            "accountant); accepted: 1.0"
        )
    if cfg.real_per_class is not None:
        raise ValueError(
            f"real_per_class={cfg.real_per_class}: a private PE vote reads every record (real_per_class=null); a fixed "
            "number per class would make which records vote depend on the other records"
        )
    vote_sensitivity(str(p.get("adjacency", "add_remove")))  # names the accepted values
    return {
        "epsilon": float(eps),
        "delta": float(delta),
        "accountant": str(p.get("accountant", "analytic")),
        "adjacency": str(p.get("adjacency", "add_remove")),
    }


def pe_vote(pe: PrivateEvolution, budget: dict | None) -> tuple[VoteRelease, float | None]:
    """The vote release and its noise multiplier: the smallest the accountant certifies for
    `iterations` compositions, raised (by 0.1 % steps) until the ledger's own accountant also
    reports ε <= the target, so the number in generate.json never exceeds what was asked for."""
    if budget is None:
        return VoteRelease(0.0, pe.threshold), None
    eps, delta = budget["epsilon"], budget["delta"]
    mult = calibrate_noise_multiplier(eps, delta, pe.iterations, budget["accountant"])
    while _votes_ledger(pe, budget, mult, "", "", None).epsilon() > eps:
        mult *= 1.001
    return VoteRelease(mult * vote_sensitivity(budget["adjacency"]), pe.threshold), mult


def _votes_ledger(
    pe, budget, mult, split: str, records: str, release_id: str | None, num_records: int | None = None
) -> Ledger:
    sens = vote_sensitivity(budget["adjacency"])
    entry = LedgerEntry(
        name="pe_votes",
        kind="gaussian",
        split=split,
        records=records,
        num_records=num_records,
        noise_source=noise.SOURCE,
        noise_multiplier=mult,
        sensitivity=sens,
        sigma=mult * sens,
        count=pe.iterations,
        adjacency=budget["adjacency"],
        release_id=release_id,
        note=f"{pe.iterations} noisy histograms of nearest-synthetic-sample votes, one vote per record",
    )
    return Ledger(budget["delta"], [entry])


def pe_privacy(
    pe: PrivateEvolution, budget: dict | None, mult: float | None, split: str, records: str, release_id: str
) -> dict:
    """generate.json["privacy"]: the record every later stage composes (ledger_of reads "ledger").
    `split` and `records`: the protected split's public id and the inclusion rule in words."""
    if budget is None:
        entry = LedgerEntry(
            name="pe_votes",
            kind="non_private",
            split=split,
            records=records,
            release_id=release_id,
            note="privacy=none: noiseless vote histograms",
        )
        led = Ledger(0.0, [entry]).to_dict()
        return {
            "mechanism": "none",
            "generator": "pe",
            "epsilon": math.inf,
            "delta": 0.0,
            "iterations": pe.iterations,
            "note": "non-private: PE votes released without noise",
            "ledger": led,
        }
    led = _votes_ledger(pe, budget, mult, split, records, release_id).to_dict()
    for w in validate_budget(budget["epsilon"], budget["delta"]):
        tqdm.write(f"privacy: {w}")
    sens = vote_sensitivity(budget["adjacency"])
    return {
        "mechanism": PE_MECHANISM,
        "generator": "pe",
        "epsilon": led["epsilon"],
        "epsilon_target": budget["epsilon"],
        "delta": budget["delta"],
        "unit": "one record (row) of the protected split",
        "adjacency": budget["adjacency"],
        "sensitivity": sens,
        "noise_multiplier": mult,
        "sigma": mult * sens,
        "iterations": pe.iterations,
        "threshold": pe.threshold,
        "calibration_accountant": budget["accountant"],
        "noise_source": noise.SOURCE,
        "num_records": "withheld (private; the votes' sum is not released exactly)",
        "ledger": led,
    }
