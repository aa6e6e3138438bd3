"""Projections from continuous embeddings to vocabulary tokens (the ADMM z-step).

LM-guided top-k is what makes GRADMM text readable: each position may only take one of
the k tokens closest to its continuous embedding, and among those the LM picks the most
likely continuation of what was chosen so far. Decoding is batched over rows and uses a
KV cache, so a projection costs about one single-token forward per position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LMTopKConfig, NearestConfig


@dataclass
class ProjectionContext:
    model: torch.nn.Module
    embeddings: torch.Tensor  # [V, d] input embedding matrix
    allowed_ids: torch.Tensor  # [A] token ids the projection may emit
    prefix_ids: list[int]  # bos + template prefix: what the LM conditions on
    # per class, what matcher.init=class_prompt samples the starts after (public prompts); the
    # projection and every perplexity still condition on prefix_ids
    class_prefix_ids: list[list[int]] | None = None

    def __post_init__(self):
        self.allowed_ids = self.allowed_ids.to(self.embeddings.device)
        e = self.embeddings.detach()[self.allowed_ids].float()
        self.allowed_emb = e
        self.allowed_unit = F.normalize(e, dim=-1)

    @functools.cached_property
    def allowed_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output-head rows (and bias) of the allowed tokens, for scoring all of them at once:
        gathered once per context, not per projection (the head need not be tied to the
        input embeddings)."""
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return head.weight.detach()[self.allowed_ids].float(), None if bias is None else bias.detach()[
            self.allowed_ids
        ].float()


def candidate_ids(x: torch.Tensor, ctx: ProjectionContext, k: int, metric: str = "cos") -> torch.Tensor:
    """[N, L, k] vocabulary ids nearest to each position, nearest first."""
    xf = x.detach().float()
    if metric == "cos":
        sim = F.normalize(xf, dim=-1) @ ctx.allowed_unit.T
    elif metric == "l2":
        # -||x-e||^2 up to a per-row constant
        sim = 2 * xf @ ctx.allowed_emb.T - (ctx.allowed_emb**2).sum(-1)
    else:
        raise ValueError(f"projector.metric={metric!r} unknown; accepted: cos, l2")
    top = sim.topk(k, dim=-1).indices
    return ctx.allowed_ids[top]


def candidate_cosines(x: torch.Tensor, ctx: ProjectionContext, cand: torch.Tensor) -> torch.Tensor:
    """[N, L, k] cosine between each position's embedding and each of its candidates."""
    e = F.normalize(ctx.embeddings.detach()[cand].float(), dim=-1)
    return (e * F.normalize(x.detach().float(), dim=-1).unsqueeze(-2)).sum(-1)


def _scores(logits: torch.Tensor, c: torch.Tensor, cos: torch.Tensor | None, sim_weight: float) -> torch.Tensor:
    """LM log-probability of each candidate, plus sim_weight x its cosine to x (0: LM only)."""
    s = logits.float().log_softmax(-1).gather(-1, c)
    return s + sim_weight * cos if sim_weight else s


class NearestProjector:
    """Nearest allowed token per position, no LM: the readability ablation."""

    def __init__(self, metric: str = NearestConfig.metric):
        if metric not in ("cos", "l2"):
            raise ValueError(f"projector.metric={metric!r} unknown; accepted: cos, l2")
        self.metric = metric

    def __call__(self, x: torch.Tensor, ctx: ProjectionContext) -> torch.Tensor:
        return candidate_ids(x, ctx, 1, self.metric)[..., 0]


class LMTopKProjector:
    """LM-guided top-k projection, KV-cached and batched over rows."""

    def __init__(
        self,
        topk: int = LMTopKConfig.topk,
        metric: str = LMTopKConfig.metric,
        sim_weight: float = LMTopKConfig.sim_weight,
        lm_candidates: int = LMTopKConfig.lm_candidates,
        beam: int = LMTopKConfig.beam,
    ):
        """sim_weight > 0 trades LM likelihood against closeness to x: greedy LM choices
        among the k neighbours of every position can drift away from the sentence x
        encodes (each position's candidates were set for x's own prefix), which raises
        perplexity; a closeness bonus keeps the tokens x actually points at unless the LM
        strongly prefers another candidate.

        lm_candidates = m > 0 also offers the LM's m most likely allowed tokens (given the
        prefix chosen so far) at every position. Once an earlier pick has differed from
        what x encodes, x's own neighbours may hold no sensible continuation; the LM's
        favourites always do. With sim_weight > 0 they win only where the neighbours are
        much less likely, so the text stays close to x elsewhere.

        beam = B > 1 searches jointly over positions: it keeps the B prefixes with the best
        summed score (LM log-probability + sim_weight x cosine, normalised over the whole
        vocabulary so prefixes compare) instead of committing to one token per position, so a
        slightly worse token may be taken where it opens a much better continuation. B = 1 is
        the one-token-at-a-time projection (tested equal)."""
        if topk <= 0:
            raise ValueError(f"projector.topk={topk} must be a positive integer")
        if metric not in ("cos", "l2"):
            raise ValueError(f"projector.metric={metric!r} unknown; accepted: cos, l2")
        if sim_weight < 0:
            raise ValueError(f"projector.sim_weight={sim_weight} must be >= 0")
        if lm_candidates < 0:
            raise ValueError(f"projector.lm_candidates={lm_candidates} must be >= 0 (0: neighbours only)")
        if beam < 1:
            raise ValueError(f"projector.beam={beam} must be >= 1 (1: no beam search)")
        self.topk, self.metric, self.sim_weight, self.lm_candidates = topk, metric, sim_weight, lm_candidates
        self.beam = beam

    def check(self, ctx: ProjectionContext) -> None:
        for name, v in (("topk", self.topk), ("lm_candidates", self.lm_candidates)):
            if v > len(ctx.allowed_ids):
                raise ValueError(f"projector.{name}={v} exceeds the allowed vocabulary ({len(ctx.allowed_ids)} tokens)")

    def _scores(self, h, c, cos_i, unit_x_i, ctx: ProjectionContext, logits=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(candidate ids, scores) at one position for decoder states h [R, d]: the neighbours c
        [R, k] scored by their logit (+ sim_weight x cos_i), then, with lm_candidates, the LM's m
        likeliest allowed tokens scored the same way (+ sim_weight x their cosine to unit_x_i).
        Logits only, without the log-softmax constant of each row: the caller adds it where
        rows must compare (beam search, which has the full logits [R, V] for that constant
        already and passes them, so no logit is computed twice)."""
        if logits is not None:
            s = logits.gather(1, c)
        else:
            head = ctx.model.get_output_embeddings()
            bias = getattr(head, "bias", None)
            # Only the k candidates' logits: the N x V head product (a fifth of a small model's
            # step) is skipped, since one constant per row leaves the argmax over candidates unchanged.
            s = torch.einsum("nd,nkd->nk", h.float(), head.weight[c].float())
            if bias is not None:
                s = s + bias[c].float()
        if cos_i is not None:
            s = s + self.sim_weight * cos_i
        if not self.lm_candidates:
            return c, s
        if logits is not None:
            la = logits[:, ctx.allowed_ids]
        else:
            w_allowed, b_allowed = ctx.allowed_head
            la = h.float() @ w_allowed.T  # [R, A]: the same constant-free logits as s
            if b_allowed is not None:
                la = la + b_allowed
        sl, top = la.topk(self.lm_candidates, dim=-1)
        if self.sim_weight:
            sl = sl + self.sim_weight * (unit_x_i[:, None] * ctx.allowed_unit[top]).sum(-1)
        return torch.cat([c, ctx.allowed_ids[top]], 1), torch.cat([s, sl], 1)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, ctx: ProjectionContext) -> torch.Tensor:
        self.check(ctx)
        n, length, _ = x.shape
        cand = candidate_ids(x, ctx, self.topk, self.metric)  # [N, L, k]
        cos = candidate_cosines(x, ctx, cand) if self.sim_weight else None
        if self.beam > 1:
            return self._beam_search(x, ctx, cand, cos)
        decoder = ctx.model.get_decoder()
        unit_x = F.normalize(x.detach().float(), dim=-1) if self.lm_candidates and self.sim_weight else None
        out = decoder(input_ids=torch.tensor(ctx.prefix_ids, device=x.device).expand(n, -1), use_cache=True)
        past, h = out.past_key_values, out.last_hidden_state[:, -1]
        chosen = torch.empty(n, length, dtype=torch.long, device=x.device)
        for i in range(length):
            c, s = self._scores(
                h, cand[:, i], None if cos is None else cos[:, i], None if unit_x is None else unit_x[:, i], ctx
            )
            pick = c.gather(1, s.argmax(1, keepdim=True))[:, 0]
            chosen[:, i] = pick
            if i + 1 < length:
                out = decoder(input_ids=pick[:, None], past_key_values=past, use_cache=True)
                past, h = out.past_key_values, out.last_hidden_state[:, -1]
        return chosen

    def _beam_search(self, x, ctx: ProjectionContext, cand: torch.Tensor, cos: torch.Tensor | None) -> torch.Tensor:
        """Beam search over the same candidates and scores as the one-token path: every row keeps
        B live prefixes (rows r*B .. r*B+B-1 of the decoder batch and its KV cache)."""
        n, length = cand.shape[:2]
        nb, k, dev = n * self.beam, cand.shape[-1], x.device
        decoder, head = ctx.model.get_decoder(), ctx.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        unit_x = F.normalize(x.detach().float(), dim=-1) if self.lm_candidates and self.sim_weight else None
        per_beam = lambda t: None if t is None else t.repeat_interleave(self.beam, 0)  # noqa: E731
        out = decoder(input_ids=torch.tensor(ctx.prefix_ids, device=dev).expand(nb, -1), use_cache=True)
        past, h = out.past_key_values, out.last_hidden_state[:, -1]
        # all B copies of a row start equal: only the first is live, or the beam fills with duplicates
        total = torch.full((n, self.beam), float("-inf"), device=dev)
        total[:, 0] = 0.0
        seqs = torch.empty(n, self.beam, 0, dtype=torch.long, device=dev)
        rows = torch.arange(n, device=dev)[:, None]
        for i in range(length):
            full = h.float() @ head.weight.T.float()
            if bias is not None:
                full = full + bias.float()
            c, s = self._scores(
                h,
                per_beam(cand[:, i]),
                per_beam(None if cos is None else cos[:, i]),
                per_beam(None if unit_x is None else unit_x[:, i]),
                ctx,
                logits=full,
            )
            s = s - full.logsumexp(-1, keepdim=True)  # prefixes differ, so normalise: log-probabilities
            # an LM favourite that is also a neighbour would be the same hypothesis twice
            s[:, k:] = s[:, k:].masked_fill((c[:, k:, None] == c[:, None, :k]).any(-1), float("-inf"))
            width = c.shape[1]
            total, idx = (total.view(nb, 1) + s).view(n, self.beam * width).topk(self.beam, dim=-1)  # [N, B]
            src = idx // width  # which live prefix each new one extends
            pick = c.view(n, self.beam, width)[rows, src, idx % width]  # [N, B]
            seqs = torch.cat([seqs[rows, src], pick[..., None]], -1)
            if i + 1 < length:
                past.reorder_cache((rows * self.beam + src).flatten())
                out = decoder(input_ids=pick.view(nb, 1), past_key_values=past, use_cache=True)
                past, h = out.past_key_values, out.last_hidden_state[:, -1]
        return seqs[rows[:, 0], total.argmax(-1)]


@torch.no_grad()
def lm_topk_reference(
    x: torch.Tensor,
    ctx: ProjectionContext,
    topk: int,
    metric: str = "cos",
    sim_weight: float = 0.0,
    lm_candidates: int = 0,
) -> torch.Tensor:
    """The reference implementation's structure: one row at a time, re-encoding the whole
    prefix for every position. Kept to test and benchmark the fast path against."""
    n, length, _ = x.shape
    cand = candidate_ids(x, ctx, topk, metric)
    cos = candidate_cosines(x, ctx, cand)
    chosen = torch.empty(n, length, dtype=torch.long, device=x.device)
    for r in range(n):
        seq = list(ctx.prefix_ids)
        for i in range(length):
            logits = ctx.model(input_ids=torch.tensor([seq], device=x.device)).logits[0, -1]
            c, cs = cand[r, i], cos[r, i]
            if lm_candidates:  # the LM's favourites among the allowed tokens, scored the same way
                lm_top = ctx.allowed_ids[logits[ctx.allowed_ids].topk(lm_candidates).indices]
                c, cs = (
                    torch.cat([c, lm_top]),
                    torch.cat([cs, candidate_cosines(x[r, i, None, None], ctx, lm_top[None, None])[0, 0]]),
                )
            pick = int(c[_scores(logits, c, cs, sim_weight).argmax()])
            chosen[r, i] = pick
            seq.append(pick)
    return chosen
