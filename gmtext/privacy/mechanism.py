"""Per-example clipped gradient sums: what the Gaussian mechanism of the release adds noise to.

For each class c, S_c = sum over the class's records i of clip_C(g_i), where g_i is the
gradient of record i's loss w.r.t. *all* matched tensors jointly (one vector) and
clip_C(g) = g * min(1, C / ||g||). The release (stages/release.py) adds Gaussian noise to the
joint vector (S_1, ..., S_K) and divides by a public constant; docs/privacy.md derives the
sensitivity.

Per-example gradients, three paths that give the same numbers (tested):

* ``closed_form`` (only the LM head is matched, ``matched.head_only``): the head's
  per-example gradient is e_i h_i^T with e_i = softmax(logits_i) - onehot(label_i) and
  h_i the last hidden state at the last real token, so ||g_i||^2 = |e_i|^2 |h_i|^2
  (+ |e_i|^2 for a bias) and the clipped sum is E^T diag(s) H: no V x d tensor per example.
* ``vmap``: ``torch.func.vmap(grad(...))`` over ``functional_call`` of the model, in
  chunks; each example runs alone inside vmap (no padding mask needed: right padding
  cannot reach the last real token of a causal LM).
* ``loop``: one backward per example (reference, slow).
* ``sketch_hooks`` (every matched tensor is a sketch G, gmtext/sketch.py): one batched
  forward that records each branch's a = P_inᵀ x, one backward to the branches' outputs,
  and per-example ∂L/∂G = Σ_t (∂L/∂z_t) a_tᵀ over each row's real tokens; ``auto`` picks it.
  `clipped_sums_parts` runs it once for several sketched parameter sets (the generator's and
  the probe's releases), each clipped on its own: one pass over the data instead of one per set.

The noise itself comes from privacy/noise.py (the OS CSPRNG), never from a seeded generator.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..gradients import MatchedParams, last_hidden, last_token_logits, last_token_loss
from ..sketch import PRECISIONS, is_sketch_name, per_example_grads_hooks

METHODS = ("auto", "closed_form", "vmap", "loop", "sketch_hooks")


@dataclass
class ClippedSum:
    """Sum over one class's examples of jointly clipped per-example gradients.

    `norms` (unclipped per-example norms) is diagnostic only and never released."""

    sums: list[torch.Tensor]
    norms: torch.Tensor
    count: int


# bf16 kernels on this CPU take another path for very narrow batches, which rounded a short
# record differently (up to 1.3e-2 relative below 23 tokens, bit-identical at 23+: docs/privacy.md)
BF16_MIN_WIDTH = 24


def min_width_for(precision: str) -> int:
    return BF16_MIN_WIDTH if precision == "bfloat16" else 0


def width_chunks(widths: Sequence[int], chunk: int) -> list[list[int]]:
    """Indices grouped by width (in their given order within a width), each group cut into
    chunks of at most `chunk`."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be >= 1")
    groups: dict[int, list[int]] = {}
    for j, w in enumerate(widths):
        groups.setdefault(w, []).append(j)
    return [g[i : i + chunk] for w in sorted(groups) for g in (groups[w],) for i in range(0, len(g), chunk)]


def chunk_plan(
    task, texts: Sequence[str], max_text_tokens: int | None, chunk: int, min_width: int = 0
) -> list[list[int]]:
    """Indices of `texts` cut into chunks of at most `chunk` records of one padded width each.

    Why: rounding can make a record's computed gradient depend on the batch it runs in. Cutting
    one length-sorted list lets a neighbouring dataset shift every chunk boundary after the
    changed record, so every other record's term could move by rounding. Here a record's chunk
    has its own width, max(its token count, `min_width`) (so it is never padded beyond that),
    and its chunk-mates are the records of that same width in dataset order: replacing one
    record regroups only the records of its old and new widths (tested)."""
    return width_chunks([max(len(task.encode(t, max_text_tokens)), min_width) for t in texts], chunk)


def _check_method(method: str, matched: MatchedParams) -> str:
    if method not in METHODS:
        raise ValueError(f"per-example gradient method {method!r} unknown; accepted: {METHODS}")
    if method == "auto":
        if matched.head_only:
            return "closed_form"
        return "sketch_hooks" if _all_sketch(matched) else "vmap"
    if method == "sketch_hooks" and not _all_sketch(matched):
        raise ValueError(
            "sketch_hooks per-example gradients need every matched param to come from a sketch: spec, "
            f"got {matched.specs}"
        )
    if method == "closed_form" and not matched.head_only:
        raise ValueError(f"closed_form per-example gradients need matched params = lm_head only, got {matched.specs}")
    return method


def _all_sketch(matched: MatchedParams) -> bool:
    return all(is_sketch_name(n) for n in matched.names)


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """s_i = min(1, C / ||g_i||) (0-norm rows keep factor 1); 0 for a non-finite norm.

    A record whose gradient is not finite (an overflow, fp16) contributes nothing: decided from
    that record alone, and a zero vector is within the sensitivity of any clipped one. Passing it
    on would make its class's whole target NaN, and the run's failure would reveal the record."""
    s = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), s, torch.zeros_like(s))


def _zero_nonfinite_rows(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """x with the rows of non-finite norm set to 0 (0 · NaN would still be NaN)."""
    ok = torch.isfinite(norms).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(ok, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- closed form
def _head_parts(model, matched: MatchedParams):
    head = model.get_output_embeddings()
    order = {id(p): i for i, p in enumerate(matched.params)}
    w_idx = order[id(head.weight)]
    b_idx = order.get(id(head.bias)) if getattr(head, "bias", None) is not None else None
    return head, w_idx, b_idx


def _head_chunk(model, matched, task, texts, label_id, max_text_tokens, vocab=None):
    """e [N, V] and h [N, d] (float32) for a chunk of texts: dLoss/dlogits and the last hidden
    state. With `vocab` (verbalizer loss) `label_id` is the class index and e is zero outside
    the verbalizer rows, because that loss never sees the other logits."""
    dev = next(model.parameters()).device
    head, _, _ = _head_parts(model, matched)
    ids, mask, last = task.batch(texts, max_text_tokens)
    with torch.no_grad():
        h = last_hidden(model, ids.to(dev), mask.to(dev), last.to(dev))
        logits = head(h).float()  # the closed form needs h itself, and logits = head(h)
        if vocab is None:
            e = logits.softmax(-1)
            e[:, label_id] -= 1.0
        else:
            ev = logits[:, vocab].softmax(-1)
            ev[:, label_id] -= 1.0
            e = torch.zeros_like(logits)
            e[:, vocab] = ev
    return e, h.float()


def clipped_sum_closed_form(
    model, task, matched, texts, label_id, clip_norm, max_text_tokens=None, chunk=16, vocab=None, on_chunk=None
) -> ClippedSum:
    head, w_idx, b_idx = _head_parts(model, matched)
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in matched.params]
    norms = torch.zeros(len(texts))
    for idx in chunk_plan(task, texts, max_text_tokens, chunk):
        e, h = _head_chunk(model, matched, task, [texts[j] for j in idx], label_id, max_text_tokens, vocab)
        e2 = (e * e).sum(-1)
        n2 = e2 * (h * h).sum(-1)
        if b_idx is not None:
            n2 = n2 + e2
        nrm = n2.sqrt()
        s = clip_factors(nrm, clip_norm)
        e, h = _zero_nonfinite_rows(e, nrm), _zero_nonfinite_rows(h, nrm)
        sums[w_idx] += (e * s[:, None]).T @ h  # E^T diag(s) H
        if b_idx is not None:
            sums[b_idx] += (e * s[:, None]).sum(0)
        norms[idx] = nrm.cpu()
        if on_chunk:
            on_chunk(len(e))
    return ClippedSum(sums, norms, len(texts))


# --------------------------------------------------------------------------- vmap
class _LastTokenLoss(nn.Module):
    """Loss of one example (batch of 1) from decoder + head, as a module for functional_call."""

    def __init__(self, model, vocab=None):
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, ids, last, label):
        return F.cross_entropy(last_token_logits(self.model, ids[None], None, last[None], self.vocab), label[None])


def per_example_grads_vmap(
    model, task, matched, texts, label_id, max_text_tokens=None, vocab=None
) -> list[torch.Tensor]:
    """Per-example gradients [N, *shape] for every matched tensor, vectorised with torch.func.
    `vocab` given: verbalizer-only cross-entropy and `label_id` is the class index."""
    from torch.func import functional_call, grad, vmap

    dev = next(model.parameters()).device
    wrapper = _LastTokenLoss(model, vocab)
    names = ["model." + n for n in matched.names]
    params = {k: p.detach() for k, p in zip(names, matched.params)}
    ids, _, last = task.batch(texts, max_text_tokens)
    ids, last = ids.to(dev), last.to(dev)
    labels = torch.full((len(texts),), label_id, device=dev)

    def loss(p, i1, s1, l1):
        return functional_call(wrapper, p, (i1, s1, l1), strict=False)

    with warnings.catch_warnings():  # SDPA has no vmap batching rule on CPU: slower fallback, same numbers
        warnings.filterwarnings("ignore", message="There is a performance drop")
        g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, ids, last, labels)
    return [g[k].detach() for k in names]


def per_example_grads_loop(
    model, task, matched, texts, label_id, max_text_tokens=None, vocab=None
) -> list[torch.Tensor]:
    """Reference: one forward/backward per example through the full model (last_token_loss)."""
    dev = next(model.parameters()).device
    out = [[] for _ in matched.params]
    for t in texts:
        ids, mask, last = task.batch([t], max_text_tokens)
        loss = last_token_loss(
            model, ids.to(dev), mask.to(dev), last.to(dev), torch.tensor([label_id], device=dev), vocab
        )[0]
        for acc, g in zip(out, torch.autograd.grad(loss, matched.params)):
            acc.append(g.detach())
    return [torch.stack(a) for a in out]


def _check_precision(precision: str, method: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"target_precision={precision!r} is not valid; accepted: {', '.join(PRECISIONS)}")
    if precision != "float32" and method != "sketch_hooks":
        raise ValueError(
            f"target_precision={precision!r} needs every matched tensor sketched (sketch:... entries, the "
            f"hook path); the {method} path runs in float32 only"
        )


def _clip_materialised(grads: list[torch.Tensor], clip_norm: float):
    n = grads[0].shape[0]
    nrm = torch.sqrt(sum(g.reshape(n, -1).float().pow(2).sum(1) for g in grads))
    s = clip_factors(nrm, clip_norm)
    return [_zero_nonfinite_rows(g.float() * s.view(n, *([1] * (g.dim() - 1))), nrm).sum(0) for g in grads], nrm


def clipped_sum(
    model,
    task,
    matched: MatchedParams,
    texts: Sequence[str],
    label_id: int,
    clip_norm: float,
    max_text_tokens: int | None = None,
    chunk: int = 16,
    method: str = "auto",
    vocab=None,
    on_chunk=None,
    precision: str = "float32",
) -> ClippedSum:
    """Sum of per-example gradients of `texts` (all labelled `label_id`), each clipped jointly
    over all matched tensors to L2 norm `clip_norm`. `vocab` (verbalizer token ids) switches to
    the verbalizer-only loss; `label_id` is then the class index (gradients.label_and_vocab).
    `on_chunk(n)` is told after every chunk (a progress bar; never a value of the data)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got clip_norm={clip_norm!r}")
    method = _check_method(method, matched)
    _check_precision(precision, method)
    texts = list(texts)
    if method == "closed_form":
        return clipped_sum_closed_form(
            model, task, matched, texts, label_id, clip_norm, max_text_tokens, chunk, vocab, on_chunk
        )
    paths = {"sketch_hooks": per_example_grads_hooks, "vmap": per_example_grads_vmap, "loop": per_example_grads_loop}
    f = paths[method]
    mw = min_width_for(precision)
    if method == "sketch_hooks":
        f = functools.partial(f, precision=precision, min_width=mw)
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in matched.params]
    norms = torch.zeros(len(texts))
    for idx in chunk_plan(task, texts, max_text_tokens, 1 if method == "loop" else chunk, mw):
        cs, nrm = _clip_materialised(
            f(model, task, matched, [texts[j] for j in idx], label_id, max_text_tokens, vocab), clip_norm
        )
        for acc, c in zip(sums, cs):
            acc += c
        norms[idx] = nrm.cpu()
        if on_chunk:
            on_chunk(len(idx))
    return ClippedSum(sums, norms, len(texts))


class _Union:
    """The union of several MatchedParams on one model, each name once (what one hook pass reads)."""

    def __init__(self, parts: Sequence[MatchedParams]):
        self.model = parts[0].model
        chosen = {}
        for mp in parts:
            if mp.model is not self.model:
                raise ValueError("clipped_sums_parts: every part must live on the same model")
            chosen.update(zip(mp.names, mp.params))
        self.names, self.params = list(chosen), list(chosen.values())
        self.specs = [s for mp in parts for s in mp.specs]
        self.head_only = False

    activate = MatchedParams.activate  # the same switch: only these tensors require grad


def clipped_sums_parts(
    model,
    task,
    parts: Sequence[MatchedParams],
    texts: Sequence[str],
    label_id: int,
    clip_norm: float,
    max_text_tokens: int | None = None,
    chunk: int = 16,
    vocab=None,
    on_chunk=None,
    precision: str = "float32",
) -> list[ClippedSum]:
    """`clipped_sum` for several all-sketch parameter sets from one forward/backward per chunk:
    part j's per-example gradient is clipped to `clip_norm` over part j's tensors alone, exactly
    as separate `clipped_sum` calls would (tested), so each part stays its own Gaussian mechanism
    with sensitivity 2C; the backward reaches the earliest sketched layer of any part once."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got clip_norm={clip_norm!r}")
    for mp in parts:
        _check_method("sketch_hooks", mp)
    _check_precision(precision, "sketch_hooks")
    union = _Union(parts).activate()
    where = {n: i for i, n in enumerate(union.names)}
    index = [[where[n] for n in mp.names] for mp in parts]
    texts = list(texts)
    mw = min_width_for(precision)
    sums = [[torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in mp.params] for mp in parts]
    norms = [torch.zeros(len(texts)) for _ in parts]
    for idx in chunk_plan(task, texts, max_text_tokens, chunk, mw):
        grads = per_example_grads_hooks(
            model,
            task,
            union,
            [texts[j] for j in idx],
            label_id,
            max_text_tokens,
            vocab,
            precision,
            mw,
        )
        for acc, nr, ix in zip(sums, norms, index):
            cs, nrm = _clip_materialised([grads[k] for k in ix], clip_norm)
            for a, c in zip(acc, cs):
                a += c
            nr[idx] = nrm.cpu()
        if on_chunk:
            on_chunk(len(idx))
    return [ClippedSum(sm, nr, len(texts)) for sm, nr in zip(sums, norms)]
