"""The reference implementation's *structure*, rebuilt from gmtext's straightforward paths.

Not part of the package: it exists only so the benchmark can time gmtext's fast paths
against the structure of the official GRADMM code, in the same process, on the same
model and data. What it reproduces (the reference code's known slow paths):

- target gradients one real example at a time (`class_target_gradients_loop`);
- initialisation by many random candidate batches, each scored by a full autograd
  gradient computation of the matched parameters;
- ADMM run one class at a time, D(x) by a plain double backward (closed_form=False);
- the LM-guided top-k projection re-encoding the whole prefix at every position, one
  row at a time (`lm_topk_reference`), run twice per outer step (once for logging).
"""

from __future__ import annotations

import time

import torch

from gmtext.matching.admm import _clip_per_class
from gmtext.matching.objective import MatchingObjective
from gmtext.matching.projectors import lm_topk_reference


def per_class_objectives(model, matched, targets, task) -> list[MatchingObjective]:
    """One autograd objective per class (the reference handles one class at a time)."""
    return [
        MatchingObjective(
            model, matched, [targets[k]], [task.label_token_ids[k]], task.prefix_ids, task.suffix_ids, closed_form=False
        )
        for k in range(len(targets))
    ]


def reference_init(objs, ctx, b: int, length: int, candidates: int, gen: torch.Generator) -> torch.Tensor:
    """`candidates` random token batches per class, each scored by an autograd gradient; keep the best."""
    best, best_loss = [], []
    allowed = ctx.allowed_ids
    for obj in objs:
        bt, bl = None, float("inf")
        for _ in range(candidates):
            tok = allowed[torch.randint(len(allowed), (1, b, length), generator=gen).to(allowed.device)]
            d = float(obj.discrete(tok)[0][0])
            if d < bl:
                bt, bl = tok[0], d
        best.append(bt)
        best_loss.append(bl)
    return torch.stack(best)


class ReferenceADMM:
    """State of a per-class ADMM run with the reference structure."""

    def __init__(
        self, objs, ctx, tokens: torch.Tensor, topk: int, lr: float = 0.008, rho: float = 1.0, grad_clip: float = 1.0
    ):
        self.objs, self.ctx, self.topk, self.rho, self.grad_clip = objs, ctx, topk, rho, grad_clip
        self.x = [
            objs[k].tokens_to_x(tokens[k]).detach().float().clone().requires_grad_(True) for k in range(len(objs))
        ]
        self.lam = [torch.zeros_like(x) for x in self.x]
        self.opt = [torch.optim.Adam([x], lr=lr) for x in self.x]
        self.best = [float("inf")] * len(objs)

    def outer_step(self, inner_steps: int) -> dict:
        t = {"project": 0.0, "x_step": 0.0, "evaluate": 0.0}
        for k, obj in enumerate(self.objs):
            x, lam, opt = self.x[k], self.lam[k], self.opt[k]
            s = time.perf_counter()
            z = lm_topk_reference((x + lam / self.rho).detach(), self.ctx, self.topk)
            t["project"] += time.perf_counter() - s
            s = time.perf_counter()
            dz = float(obj.discrete(z[None])[0][0])
            self.best[k] = min(self.best[k], dz)
            t["evaluate"] += time.perf_counter() - s
            s = time.perf_counter()
            z_emb = obj.tokens_to_x(z).detach().float()
            for _ in range(inner_steps):
                opt.zero_grad()
                d, _, _ = obj.losses(x[None])
                loss = d.sum() + self.rho / 2 * ((x - z_emb + lam / self.rho) ** 2).sum(-1).mean()
                loss.backward()
                _clip_per_class(x.grad[None], self.grad_clip)
                opt.step()
            with torch.no_grad():
                lam += self.rho * (x - z_emb)
            t["x_step"] += time.perf_counter() - s
            s = time.perf_counter()
            lm_topk_reference((x + lam / self.rho).detach(), self.ctx, self.topk)  # second projection, logging only
            t["project"] += time.perf_counter() - s
        return t


def reference_inner_step(objs, xs, opts) -> None:
    """One x-step Adam update per class with the autograd objective (no ADMM penalty terms
    differ between the paths, so they are left out on both sides of the inner-step row)."""
    for obj, x, opt in zip(objs, xs, opts):
        opt.zero_grad()
        d, _, _ = obj.losses(x[None])
        d.sum().backward()
        _clip_per_class(x.grad[None], 1.0)
        opt.step()
