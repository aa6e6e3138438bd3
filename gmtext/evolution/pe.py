"""generator=pe: Private Evolution (Aug-PE, Xie et al., ICML 2024), docs/pe.md.

    t = 0: population_c  ← `population` LM samples after class c's public prompt
    t = 1..T:
        votes_c          ← every private record of class c votes for its nearest sample of class c
        noisy            ← votes + N(0, σ²) per cell (vote.VoteRelease; σ calibrated for T releases)
        t < T: parents   ← drawn ∝ noisy counts (threshold applied); population ← LM variations of them
    output               ← per class the num_per_class samples with the most noisy votes at t = T

The component holds the public settings and runs the loop; the stage (generate.py) reads the
private records, calibrates σ, writes files and the ledger. Randomness: the noise comes from
os.urandom (gmtext.privacy.noise); sampling, parent draws and keep lengths use a torch generator
seeded per iteration from the public seed (they act on published values only: post-processing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from ..config import PEConfig, VariationConfig
from .variation import allowed_mask, keep_lengths, sample_rows
from .vote import VoteRelease


def iteration_seed(seed: int, iteration: int) -> int:
    """The sampling seed of one iteration: a resumed run redraws exactly what it would have."""
    return (seed * 1_000_003 + iteration * 104_729 + 17) % (2**63 - 1)


def _number(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (lo_open and value == lo) or value > hi:
        bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
        raise ValueError(f"generator.{name}={value!r}: accepted: a finite number {bound}")
    return float(value)


def _count(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"generator.{name}={value!r}: accepted: an int >= {lo}")
    return value


@dataclass
class Population:
    """One class-major population: tokens [C, P, L], perplexity [C, P]."""

    tokens: torch.Tensor
    perplexity: torch.Tensor

    def texts(self, tokenizer) -> list[list[str]]:
        return [[tokenizer.decode(r.tolist(), skip_special_tokens=True).strip() for r in cls] for cls in self.tokens]


@dataclass
class IterationResult:
    iteration: int
    population: Population  # the population that was voted on
    noisy: torch.Tensor  # [C, P] released (noisy, thresholded) counts


class PrivateEvolution:
    name = "pe"
    uses_release = False  # no gradient release: gmtext-pipeline skips the release stage
    sample_rate = 1.0  # every record outside the dev bucket votes (runtime.inclusion_rule reads it)

    def __init__(
        self,
        iterations: int = PEConfig.iterations,
        population: int = PEConfig.population,
        threshold: float = PEConfig.threshold,
        prompt: str = PEConfig.prompt,
        variation: Mapping | VariationConfig | None = None,
    ):
        self.iterations = _count("iterations", iterations)
        self.population = _count("population", population)
        self.threshold = _number("threshold", threshold, 0.0)
        if not isinstance(prompt, str) or "{description}" not in prompt:
            raise ValueError(
                f"generator.prompt={prompt!r}: accepted: a string containing {{description}} "
                f"(and optionally {{context}})"
            )
        self.prompt = prompt
        v = (
            asdict(VariationConfig()) | dict(variation or {})
            if not isinstance(variation, VariationConfig)
            else asdict(variation)
        )
        unknown = set(v) - set(asdict(VariationConfig()))
        if unknown:
            raise ValueError(
                f"generator.variation: unknown key(s) {sorted(unknown)}; accepted: keep_min, keep_max, temperature"
            )
        self.keep_min = _number("variation.keep_min", v["keep_min"], 0.0, 1.0)
        self.keep_max = _number("variation.keep_max", v["keep_max"], self.keep_min, 1.0)
        self.temperature = _number("variation.temperature", v["temperature"], 0.0, lo_open=True)

    def check(self, num_per_class: int) -> None:
        if num_per_class > self.population:
            raise ValueError(
                f"num_per_class={num_per_class}: generator=pe keeps the most-voted of generator.population="
                f"{self.population} per class; accepted: num_per_class <= population"
            )

    # ------------------------------------------------------------------ public side
    def class_prompts(self, task, context: str, descriptions: Sequence[str]) -> list[list[int]]:
        """Token ids the LM writes after, per class: the prompt with the dataset's public task
        description and the class description (dataset.label_descriptions, else its label name),
        then the template's prefix, as GRADMM's LM samples condition on lm_context."""
        return task.class_prompt_ids(self.prompt, context, descriptions)

    def initial(self, model, prompts, length: int, mask, gen) -> Population:
        zero = torch.zeros(self.population, length, dtype=torch.long)
        return self._sample(model, prompts, zero, torch.zeros(self.population, dtype=torch.long), 1.0, mask, gen)

    def vary(self, model, prompts, pop: Population, counts: torch.Tensor, mask, gen) -> Population:
        """The next population: `population` parents per class drawn with probability ∝ noisy
        count (uniformly when no cell kept a positive count), each rewritten once."""
        c, p, length = pop.tokens.shape
        weights = counts.clamp_min(0).double()
        parents = torch.stack(
            [
                torch.multinomial(
                    w if w.sum() > 0 else torch.ones(p, dtype=torch.float64), p, replacement=True, generator=gen
                )
                for w in weights
            ]
        )
        forced = pop.tokens.gather(1, parents[:, :, None].expand(c, p, length))
        keep = keep_lengths(c * p, length, self.keep_min, self.keep_max, gen).view(c, p)
        return self._sample(model, prompts, forced, keep, self.temperature, mask, gen)

    def _sample(self, model, prompts, forced, keep, temperature, mask, gen) -> Population:
        toks, ppl = [], []
        for k, prompt in enumerate(prompts):
            fk = forced[k] if forced.dim() == 3 else forced
            kk = keep[k] if keep.dim() == 2 else keep
            t, q = sample_rows(model, prompt, fk, kk, temperature, mask, gen)
            toks.append(t)
            ppl.append(q)
        return Population(torch.stack(toks), torch.stack(ppl))

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        lm,
        task,
        embedder,
        record_embeddings: Sequence[torch.Tensor],
        *,
        prompts: list[list[int]],
        length: int,
        allowed_ids: torch.Tensor,
        vote: VoteRelease,
        seed: int,
        start: IterationResult | None = None,
        on_iteration: Callable[[IterationResult], None] | None = None,
    ) -> IterationResult:
        """Iterations (start.iteration + 1)..T; returns the last one (its population and noisy
        counts). `record_embeddings`: per class, the unit embeddings of the private records
        (computed by the caller, never stored). `start`: a finished iteration to resume after."""
        model, tok = lm.model, lm.tokenizer
        mask = allowed_mask(allowed_ids, model.get_output_embeddings().weight.shape[0], next(model.parameters()).device)
        if start is None:
            pop = self.initial(model, prompts, length, mask, torch.Generator().manual_seed(iteration_seed(seed, 0)))
            first = 1
        else:
            gen = torch.Generator().manual_seed(iteration_seed(seed, start.iteration))
            pop, first = self.vary(model, prompts, start.population, start.noisy, mask, gen), start.iteration + 1
        res = start
        for t in range(first, self.iterations + 1):
            pop_emb = [embedder.embed(texts) for texts in pop.texts(tok)]
            res = IterationResult(t, pop, vote.release(record_embeddings, pop_emb))
            if on_iteration:
                on_iteration(res)
            if t < self.iterations:
                pop = self.vary(
                    model, prompts, pop, res.noisy, mask, torch.Generator().manual_seed(iteration_seed(seed, t))
                )
        return res


def top_per_class(noisy: torch.Tensor, n: int) -> torch.Tensor:
    """[C, n] indices of the n most-voted samples per class (stable: ties keep population order)."""
    order = torch.sort(noisy, dim=1, descending=True, stable=True).indices
    return order[:, :n]


def noisy_share(noisy: torch.Tensor, n: int) -> float:
    """Share of the (positive) noisy votes held by the n most-voted samples of each class: the
    tracker's `loss` (published values only)."""
    pos = noisy.clamp_min(0)
    total = float(pos.sum())
    if total <= 0:
        return 0.0
    top = pos.gather(1, top_per_class(noisy, n))
    return float(top.sum()) / total
