"""GRADMM: ADMM over continuous embeddings x and projected tokens z (docs/generation.md).

Per outer step: z = Proj(x + λ/ρ); a few Adam steps on D(x) + ρ/2·‖x − z + λ/ρ‖²
(+ γ·LM cross-entropy of x predicting z); λ ← λ + ρ(x − z). Each class keeps the z
with the best *discrete* matching distance seen, not the last one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ADMMConfig, EmbeddingOnlyConfig
from .objective import MatchingObjective, check_matching_options, check_objective
from .projectors import ProjectionContext


@dataclass
class MatchResult:
    tokens: torch.Tensor  # [C, B, L] best discrete iterate per class
    class_loss: torch.Tensor  # [C] its discrete matching distance
    seq_loss: torch.Tensor  # [C, B] each sequence's own matching distance
    perplexity: torch.Tensor  # [C, B]
    history: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def _clip_per_class(grad: torch.Tensor, max_norm: float) -> None:
    """Clip each class's slice separately so classes stay independent of each other."""
    if max_norm <= 0:
        return
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))))


class ADMMMatcher:
    def __init__(
        self,
        *,
        outer_steps: int = ADMMConfig.outer_steps,
        inner_steps: int = ADMMConfig.inner_steps,
        lr: float = ADMMConfig.lr,
        rho: float = ADMMConfig.rho,
        grad_clip: float = ADMMConfig.grad_clip,
        distance: str = ADMMConfig.distance,
        lm_weight: float = ADMMConfig.lm_weight,
        init: str = ADMMConfig.init,
        init_prompt: str = ADMMConfig.init_prompt,
        init_candidates: int = ADMMConfig.init_candidates,
        init_temperature: float = ADMMConfig.init_temperature,
        closed_form: bool = ADMMConfig.closed_form,
        admm: bool = ADMMConfig.admm,
        nan_retries: int = ADMMConfig.nan_retries,
        objective: str = ADMMConfig.objective,
        rho_balance: float = ADMMConfig.rho_balance,
        rho_factor: float = ADMMConfig.rho_factor,
        max_perplexity_ratio: float = ADMMConfig.max_perplexity_ratio,
        contrastive: float = ADMMConfig.contrastive,
        seq_chunk: int = ADMMConfig.seq_chunk,
    ):
        """objective: `batch` matches each class batch's mean gradient (the paper) and keeps the
        best batch; `sequence` matches every sequence's own gradient and keeps the best
        iterate of every sequence separately.

        rho_balance = μ > 0 adapts ρ by residual balancing (Boyd et al. 2011, §3.4.1): after an
        outer step whose primal residual exceeds μ × the dual one, ρ grows by `rho_factor`;
        when the dual exceeds μ × the primal, it shrinks by it. λ is the unscaled dual, so
        it needs no rescaling. 0 keeps ρ fixed (the paper).

        max_perplexity_ratio = r > 0 guards readability: a z-step iterate may replace a
        sequence's kept text (a class's kept batch under `batch`, by geometric-mean perplexity)
        only if its perplexity is at most r × that of the LM start. At r = 1 no kept text is less
        readable than the start it came from, which is the no-matching twin's text for the same
        seed; matching may then only move text within the LM's own fluency. 0: no guard (the paper).

        contrastive = β: the distance every step, start and kept iterate is judged by becomes the
        own-target distance minus β × the best other label's (MatchingObjective; the stage builds
        the objective with it). 0: own target only (the paper).

        seq_chunk: how many sequences per class the objective takes per-sequence gradients for
        at once (the stage builds the objective with it; 0: the whole batch)."""
        for name, v in (("outer_steps", outer_steps), ("inner_steps", inner_steps)):
            if v < 1:
                raise ValueError(f"matcher.{name}={v} must be >= 1")
        if lr <= 0 or rho < 0 or (admm and rho == 0):
            raise ValueError(f"matcher.lr={lr} must be > 0 and matcher.rho={rho} > 0 (>= 0 without ADMM)")
        if init not in ("lm_sample", "class_prompt", "random"):
            raise ValueError(f"matcher.init={init!r} unknown; accepted: lm_sample, class_prompt, random")
        if init == "class_prompt" and "{description}" not in init_prompt:
            raise ValueError(
                f"matcher.init_prompt={init_prompt!r} has no {{description}}; accepted: a format string with "
                "{description} (the class's dataset.label_descriptions entry) and optionally {context}"
            )
        self.init_prompt = init_prompt
        if init_candidates < 1:
            raise ValueError(f"matcher.init_candidates={init_candidates} must be >= 1")
        if rho_balance < 0 or (rho_balance > 0 and rho_factor <= 1):
            raise ValueError(
                f"matcher.rho_balance={rho_balance} must be >= 0 (0: fixed ρ) and matcher.rho_factor={rho_factor} > 1"
            )
        self.rho_balance, self.rho_factor = rho_balance, rho_factor
        if max_perplexity_ratio < 0:
            raise ValueError(f"matcher.max_perplexity_ratio={max_perplexity_ratio} must be >= 0 (0: no guard)")
        self.max_perplexity_ratio = max_perplexity_ratio
        check_matching_options(contrastive, seq_chunk)
        self.contrastive, self.seq_chunk = contrastive, seq_chunk
        if nan_retries < 0:
            raise ValueError(f"matcher.nan_retries={nan_retries} must be >= 0")
        self.nan_retries = nan_retries
        check_objective(objective)
        self.objective = objective
        self.outer_steps, self.inner_steps, self.lr, self.rho = outer_steps, inner_steps, lr, rho
        self.grad_clip, self.distance, self.lm_weight = grad_clip, distance, lm_weight
        self.init, self.init_candidates, self.init_temperature = init, init_candidates, init_temperature
        self.closed_form, self.admm = closed_form, admm

    # -------- initialisation (public: LM samples, after the shared context or a class prompt, or
    # random tokens; never real text) --------
    @torch.no_grad()
    def sample_tokens(
        self, ctx: ProjectionContext, n: int, length: int, gen: torch.Generator, prefix_ids=None
    ) -> torch.Tensor:
        """n LM samples after prefix_ids (default: the shared context), or n random token strings."""
        dev = ctx.embeddings.device
        allowed = ctx.allowed_ids
        if self.init == "random":
            idx = torch.randint(len(allowed), (n, length), generator=gen)
            return allowed[idx.to(allowed.device)]
        prefix = torch.tensor(ctx.prefix_ids if prefix_ids is None else prefix_ids, device=dev).expand(n, -1)
        out = ctx.model(input_ids=prefix, use_cache=True)
        mask = torch.full((ctx.embeddings.shape[0],), float("-inf"), device=dev)
        mask[allowed] = 0
        toks = []
        for i in range(length):
            logits = out.logits[:, -1, : mask.shape[0]].float() / self.init_temperature + mask[: out.logits.shape[-1]]
            probs = logits.softmax(-1).cpu()
            t = torch.multinomial(probs, 1, generator=gen).to(dev)
            toks.append(t)
            if i + 1 < length:
                out = ctx.model(input_ids=t, past_key_values=out.past_key_values, use_cache=True)
        return torch.cat(toks, 1)

    def initial_tokens(self, obj: MatchingObjective, ctx, c, b, length, gen):
        k = self.init_candidates
        if self.init == "class_prompt":  # each class's candidates written after its own public prompt
            if ctx.class_prefix_ids is None or len(ctx.class_prefix_ids) != c:
                raise ValueError(f"matcher.init=class_prompt needs one class prompt per class ({c})")
            cand = torch.stack(
                [self.sample_tokens(ctx, k * b, length, gen, p).view(k, b, length) for p in ctx.class_prefix_ids], 1
            )
        else:
            cand = self.sample_tokens(ctx, k * c * b, length, gen).view(k, c, b, length)
        if k == 1:
            return cand[0]
        if self.objective == "sequence":  # best candidate of every sequence slot
            losses = torch.stack([obj.discrete(cand[j], per_sequence=True)[1] for j in range(k)])  # [k, C, B]
            best = losses.argmin(0)
            return cand.gather(0, best[None, :, :, None].expand(1, c, b, length))[0]
        losses = torch.stack([obj.discrete(cand[j])[0] for j in range(k)])  # [k, C]
        best = losses.argmin(0)
        return cand[best, torch.arange(c, device=best.device)]

    def _score(self, obj: MatchingObjective, tokens: torch.Tensor) -> torch.Tensor:
        """What the best iterate is chosen by: [C] batch distances, or [C, B] per sequence."""
        d, s = obj.discrete(tokens, per_sequence=self.objective == "sequence")
        return s if self.objective == "sequence" else d

    def _log_ppl(self, ppl: torch.Tensor) -> torch.Tensor:
        """What the readability guard compares: [C, B] log perplexities, or [C] class means."""
        return ppl.log() if self.objective == "sequence" else ppl.log().mean(1)

    # -------- the ADMM loop --------
    def run(
        self,
        obj: MatchingObjective,
        projector,
        ctx: ProjectionContext,
        num_classes: int,
        batch_size: int,
        length: int,
        gen: torch.Generator,
        on_step: Callable[[dict], None] | None = None,
    ) -> MatchResult:
        """z-step (project x + λ/ρ to tokens, keep each sequence's best so far), x-step (Adam on
        the matching loss + the ρ-penalty), λ-step; one record per outer step, with the primal
        and dual residuals that tell whether the two copies of the text agree (docs/generation.md)."""
        t0 = time.perf_counter()
        timings = {"init": 0.0, "project": 0.0, "x_step": 0.0, "evaluate": 0.0}
        c, b = num_classes, batch_size
        tok0 = self.initial_tokens(obj, ctx, c, b, length, gen)
        timings["init"] = time.perf_counter() - t0
        x = obj.tokens_to_x(tok0).detach().float().clone().requires_grad_(True)
        lam = torch.zeros_like(x)
        opt = torch.optim.Adam([x], lr=self.lr)
        best_tok = tok0.clone()
        best_loss = self._score(obj, tok0)
        guard = self.max_perplexity_ratio > 0
        if guard:  # the start's readability, the bar every later iterate must clear
            max_log_ppl = self._log_ppl(obj.perplexity(tok0)) + math.log(self.max_perplexity_ratio)
        history = []
        steps = self.outer_steps if self.admm else 1
        z, z_prev, z_emb_prev = tok0, tok0, None  # z: the tokens of the last z-step (the LM start before the first)
        rho = self.rho  # changes between outer steps only under rho_balance
        for step in range(steps + 1):
            # z-step
            t = time.perf_counter()
            if self.admm or step == steps:
                z = projector((x + lam / max(rho, 1e-12)).detach().view(c * b, length, -1), ctx).view(c, b, length)
            timings["project"] += time.perf_counter() - t
            t = time.perf_counter()
            z_ppl, guard_rec = None, {}
            if self.admm or step == steps:
                dz = self._score(obj, z)
                improved = dz < best_loss
                if guard:
                    z_ppl = obj.perplexity(z)
                    readable = self._log_ppl(z_ppl) <= max_log_ppl + 1e-6
                    # the share of sequences that matched better but read worse than their start
                    guard_rec = {"guard_refused": (improved & ~readable).float().mean().item()}
                    improved &= readable
                best_loss = torch.where(improved, dz, best_loss)
                best_tok[improved] = z[improved]
            timings["evaluate"] += time.perf_counter() - t
            if step == steps:
                rec = {
                    "outer_step": step,
                    "discrete_loss": dz.mean().item(),
                    "best_discrete_loss": best_loss.mean().item(),
                    **guard_rec,
                }
                history.append(rec)
                if on_step:
                    on_step(rec)
                break
            t = time.perf_counter()
            z_emb = obj.tokens_to_x(z).detach().float() if self.admm else None
            d_cls, pen, retries = self._x_step(obj, x, z, z_emb, lam, opt, step, rho)
            timings["x_step"] += time.perf_counter() - t
            rec = {
                "outer_step": step,
                "continuous_loss": d_cls.mean().item(),
                "admm_penalty": float(pen.detach().mean()) if self.admm else 0.0,
                "discrete_loss": dz.mean().item() if self.admm else float("nan"),
                "best_discrete_loss": best_loss.mean().item(),
            }
            if self.admm:
                with torch.no_grad():
                    lam += rho * (x - z_emb)  # λ-step
                rec["perplexity"] = (z_ppl if z_ppl is not None else obj.perplexity(z)).mean().item()
                rec.update(self._residuals(x, z, z_emb, z_prev, z_emb_prev, rho), rho=rho)
                rho = self._balanced_rho(rho, rec["primal_residual"], rec["dual_residual"])
                z_prev, z_emb_prev = z, z_emb
            rec.update(guard_rec)
            if retries:
                rec.update(x_step_retries=retries, lr=opt.param_groups[0]["lr"])
            history.append(rec)
            if on_step:
                on_step(rec)
        t = time.perf_counter()
        class_loss, seq_loss = obj.discrete(best_tok, per_sequence=True)
        ppl = obj.perplexity(best_tok)
        timings["evaluate"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return MatchResult(best_tok, class_loss, seq_loss, ppl, history, timings)

    def _balanced_rho(self, rho: float, primal: float, dual: float) -> float:
        """The next outer step's ρ (residual balancing; unchanged when off or the dual residual
        is not defined yet, at the first step)."""
        if self.rho_balance <= 0 or math.isnan(dual):
            return rho
        if primal > self.rho_balance * dual:
            return rho * self.rho_factor
        if dual > self.rho_balance * primal:
            return rho / self.rho_factor
        return rho

    def _residuals(self, x, z, z_emb, z_prev, z_emb_prev, rho) -> dict:
        """ADMM's convergence measures, per token (RMS over positions, so lengths compare):
        primal ‖x − z‖ (the continuous text still disagrees with its tokens) and dual
        ρ‖z − z_prev‖ (the tokens still move); `tokens_changed` is the share of positions whose
        token differs from the previous z-step (the LM start at step 0)."""
        with torch.no_grad():
            per_tok = lambda v: v.pow(2).sum(-1).mean().sqrt().item()  # noqa: E731
            out = {"primal_residual": per_tok(x - z_emb), "tokens_changed": (z != z_prev).float().mean().item()}
            out["dual_residual"] = rho * per_tok(z_emb - z_emb_prev) if z_emb_prev is not None else float("nan")
        return out

    def _x_step(self, obj: MatchingObjective, x, z, z_emb, lam, opt, step: int, rho: float):
        """`inner_steps` Adam steps on x (the matching loss plus, under ADMM, the ρ-penalty to
        z − λ/ρ); a non-finite loss or gradient undoes the whole x-step and retries it with half
        the step size, at most `nan_retries` times. Returns (class losses, penalty, retries)."""
        inner = self.inner_steps if self.admm else self.inner_steps * self.outer_steps
        saved, retries = (x.detach().clone(), copy.deepcopy(opt.state_dict())), 0
        while True:
            for _ in range(inner):
                opt.zero_grad()
                d_cls, lm, _ = obj.losses(
                    x, lm_tokens=z if (self.lm_weight > 0 and self.admm) else None, objective=self.objective
                )
                loss = d_cls.sum()
                pen = torch.zeros(())
                if self.admm:
                    pen = rho / 2 * ((x - z_emb + lam / rho) ** 2).sum(-1).mean((1, 2))  # [C]
                    loss = loss + pen.sum()
                if lm is not None:
                    loss = loss + self.lm_weight * lm.sum()
                loss.backward(inputs=[x])  # only x: no gradients into the matched parameters
                if not (torch.isfinite(loss) and torch.isfinite(x.grad).all()):
                    break
                _clip_per_class(x.grad, self.grad_clip)
                opt.step()
            else:
                return d_cls, pen, retries
            lr = opt.param_groups[0]["lr"]
            if retries == self.nan_retries:
                raise FloatingPointError(
                    f"non-finite loss or gradient in the x-step of outer step {step}, still at lr {lr:.3g} "
                    f"after {retries} halvings (matcher.nan_retries); lower matcher.lr or check the release"
                )
            retries += 1
            with torch.no_grad():
                x.copy_(saved[0])
            opt.load_state_dict(copy.deepcopy(saved[1]))  # a copy: Adam updates its state in place
            opt.param_groups[0]["lr"] = lr / 2


class EmbeddingMatcher(ADMMMatcher):
    """Ablation: optimise continuous embeddings on D alone (no ADMM coupling), then project
    once at the end with the configured projector."""

    def __init__(
        self,
        *,
        outer_steps: int = EmbeddingOnlyConfig.outer_steps,
        inner_steps: int = EmbeddingOnlyConfig.inner_steps,
        lr: float = EmbeddingOnlyConfig.lr,
        grad_clip: float = EmbeddingOnlyConfig.grad_clip,
        distance: str = EmbeddingOnlyConfig.distance,
        init: str = EmbeddingOnlyConfig.init,
        init_candidates: int = EmbeddingOnlyConfig.init_candidates,
        init_temperature: float = EmbeddingOnlyConfig.init_temperature,
        closed_form: bool = EmbeddingOnlyConfig.closed_form,
        objective: str = EmbeddingOnlyConfig.objective,
    ):
        super().__init__(
            outer_steps=outer_steps,
            inner_steps=inner_steps,
            lr=lr,
            rho=0.0,
            grad_clip=grad_clip,
            distance=distance,
            lm_weight=0.0,
            init=init,
            init_candidates=init_candidates,
            init_temperature=init_temperature,
            closed_form=closed_form,
            admm=False,
            objective=objective,
        )
