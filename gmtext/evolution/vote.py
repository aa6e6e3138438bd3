"""Private Evolution's private step: nearest-neighbour votes, a Gaussian histogram release.

Every private record of class c votes for the synthetic sample of class c whose embedding is
nearest to its own (cosine on unit vectors). The released object of one iteration is the
concatenation H = (H_1, ..., H_C) of the per-class vote histograms, each cell plus noise.

Sensitivity. Adjacency add/remove: D' = D plus one record r of class c. No record's vote depends
on another record (the population and the embedder are fixed before the vote, and which records
vote is decided record by record), so every record of D votes in D' exactly as in D, and r adds
one vote to one cell of H_c: H(D') - H(D) = e_j, a unit vector, so ||H(D') - H(D)||_2 = 1 and the
L2 sensitivity is Δ = 1. Under replace-one (r swapped for r'), one cell loses a vote and one
gains one (possibly in another class's histogram): Δ = √2 (0 when both vote for the same cell).

Mechanism. Each of the T iterations releases H + N(0, σ² I) with σ = noise_multiplier · Δ,
noise from gmtext.privacy.noise (os.urandom); T such releases compose as a self-composed
Gaussian mechanism in the ledger. The population the next iteration votes on depends only on
earlier noisy histograms (post-processing), so the adaptive composition is the plain one.

Nothing else computed from the records leaves this module: the noiseless histogram is a local
of `VoteRelease.release` and is never returned (except by `release_with_details`, for tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..privacy import noise

ADJACENCY_SENSITIVITY = {"add_remove": 1.0, "replace_one": math.sqrt(2.0)}


def vote_sensitivity(adjacency: str) -> float:
    if adjacency not in ADJACENCY_SENSITIVITY:
        raise ValueError(f"privacy.adjacency={adjacency!r}: accepted: {', '.join(ADJACENCY_SENSITIVITY)}")
    return ADJACENCY_SENSITIVITY[adjacency]


def nearest(records: torch.Tensor, population: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the most similar population row for every record row (unit rows: cosine).
    Ties go to the lowest index (argmax), a rule that does not look at other records."""
    if len(population) == 0:
        raise ValueError("nearest: empty population")
    out = [(records[i : i + chunk] @ population.T).argmax(1) for i in range(0, len(records), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def vote_histograms(
    records_by_class: Sequence[torch.Tensor], population_by_class: Sequence[torch.Tensor]
) -> torch.Tensor:
    """[C, P] float64 vote counts: records of class c vote among class c's P samples only."""
    if len(records_by_class) != len(population_by_class):
        raise ValueError(f"{len(records_by_class)} record classes vs {len(population_by_class)} population classes")
    sizes = {len(p) for p in population_by_class}
    if len(sizes) != 1:
        raise ValueError(f"every class needs the same population size, got {sorted(sizes)}")
    size = sizes.pop()
    hist = torch.zeros(len(population_by_class), size, dtype=torch.float64)
    for c, (rec, pop) in enumerate(zip(records_by_class, population_by_class)):
        if len(rec):
            hist[c] = torch.bincount(nearest(rec, pop), minlength=size).double()
    return hist


@dataclass
class VoteRelease:
    """One noisy release of the vote histograms. sigma = 0: noiseless (privacy=none, ε = ∞)."""

    sigma: float
    threshold: float = 0.0

    def release(self, records_by_class, population_by_class) -> torch.Tensor:
        """[C, P] float32 noisy counts, cells under the threshold set to 0."""
        return self.release_with_details(records_by_class, population_by_class)[0]

    def release_with_details(self, records_by_class, population_by_class) -> tuple[torch.Tensor, torch.Tensor]:
        """(released counts, the noiseless histogram). The second is for tests only: it is exactly
        what the noise hides and must never be written, logged or returned by `release`."""
        hist = vote_histograms(records_by_class, population_by_class)
        if self.sigma > 0:
            (noisy,), _ = noise.add_noise([hist], self.sigma)  # one os.urandom draw per cell
        else:
            noisy = hist.float()
        return apply_threshold(noisy, self.threshold), hist


def apply_threshold(counts: torch.Tensor, threshold: float) -> torch.Tensor:
    """Aug-PE's H: a cell whose noisy count is below H counts as no vote (post-processing; it
    removes samples that only noise voted for)."""
    return torch.where(counts >= threshold, counts, torch.zeros_like(counts)) if threshold > 0 else counts
