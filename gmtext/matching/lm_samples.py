"""matcher=none: the no-matching control of every GRADMM row.

It draws the same LM starts as ADMMMatcher (the same generator stream, so for one seed its texts
are exactly the points GRADMM starts from) and returns them without any ADMM step. What a GRADMM
pool gains over this twin under the same selection is what the matching itself adds.
"""

from __future__ import annotations

import time

import torch

from ..config import LMSamplesConfig
from .admm import ADMMMatcher, MatchResult


class LMSampleMatcher(ADMMMatcher):
    def __init__(
        self,
        *,
        init: str = LMSamplesConfig.init,
        init_prompt: str = LMSamplesConfig.init_prompt,
        init_candidates: int = LMSamplesConfig.init_candidates,
        init_temperature: float = LMSamplesConfig.init_temperature,
        distance: str = LMSamplesConfig.distance,
        closed_form: bool = LMSamplesConfig.closed_form,
        objective: str = LMSamplesConfig.objective,
        contrastive: float = LMSamplesConfig.contrastive,
        seq_chunk: int = LMSamplesConfig.seq_chunk,
    ):
        super().__init__(
            init=init,
            init_prompt=init_prompt,
            init_candidates=init_candidates,
            init_temperature=init_temperature,
            distance=distance,
            closed_form=closed_form,
            objective=objective,
            contrastive=contrastive,
            seq_chunk=seq_chunk,
        )
        self.outer_steps = 0  # no ADMM step: the tracker's step axis has one point per batch

    def run(
        self, obj, projector, ctx, num_classes: int, batch_size: int, length: int, gen: torch.Generator, on_step=None
    ) -> MatchResult:
        t0 = time.perf_counter()
        tokens = self.initial_tokens(obj, ctx, num_classes, batch_size, length, gen)
        class_loss, seq_loss = obj.discrete(tokens, per_sequence=True)
        ppl = obj.perplexity(tokens)
        # the loss GRADMM's step records use (per sequence under objective=sequence), so the twin's
        # point sits on GRADMM's curves in gmtext-report's ADMM plot
        score = (seq_loss if self.objective == "sequence" else class_loss).mean().item()
        rec = {"outer_step": 0, "discrete_loss": score, "best_discrete_loss": score, "perplexity": ppl.mean().item()}
        if on_step:
            on_step(rec)
        return MatchResult(
            tokens,
            class_loss,
            seq_loss,
            ppl,
            [rec],
            {"init": time.perf_counter() - t0, "total": time.perf_counter() - t0},
        )
