"""Which label does a finished text's gradient fit? Scores for selecting a synthetic set.

Generation scores each sequence against its own class target only. A low distance there
does not make the text an example of its class: with the verbalizer loss every example's
gradient under label c is ±p·v(x) with one label-independent v(x), and the class targets
share a large common component (cos(T_neg, T_pos) ≈ −0.98 for the last block of
SmolLM2-135M on rotten tomatoes), so a text can sit close to its own target by matching the
shared part alone. The label-fit margin asks the discriminative question instead: under
which label does the text's gradient best match that label's target? It is computed as
fine-tuning sees the text (decoded, re-tokenised, inside the template).

Uses only a release and synthetic text: post-processing, no privacy cost beyond the release's.
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..gradients import MatchedParams, label_and_vocab
from ..privacy.mechanism import per_example_grads_vmap
from .objective import EPS


def cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """grads: per matched tensor [N, *shape]; target: one class's tensors. → [N] of 1 − cos,
    averaged over tensors (the matcher's `cos` distance, tensor by tensor)."""
    n = grads[0].shape[0]
    parts = []
    for g, t in zip(grads, target):
        g, t = g.float().reshape(n, -1), t.float().reshape(-1).to(g.device)
        dot = (g * t).sum(1)
        parts.append(1 - dot / ((g * g).sum(1).clamp_min(EPS).sqrt() * (t * t).sum().clamp_min(EPS).sqrt()))
    return torch.stack(parts).mean(0).cpu()


def label_fit(
    model,
    task,
    matched: MatchedParams,
    targets,
    texts: Sequence[str],
    match_loss: str = "verbalizer",
    max_text_tokens: int | None = None,
    chunk: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """[N, C]: distance of text i's gradient *under label j* to class j's target.
    `progress`: a bar over the (label, chunk) steps, the slow part of margin selection."""
    dev = next(model.parameters()).device
    out = torch.zeros(len(texts), len(targets))
    bar = tqdm(
        total=len(targets) * math.ceil(len(texts) / chunk), desc="margin scores", unit="chunk", disable=not progress
    )
    for j, tj in enumerate(targets):
        label, vocab = label_and_vocab(task, j, match_loss, dev)
        for s in range(0, len(texts), chunk):
            g = per_example_grads_vmap(model, task, matched, list(texts[s : s + chunk]), label, max_text_tokens, vocab)
            out[s : s + chunk, j] = cosine_distance(g, tj)
            bar.update(1)
    bar.close()
    return out


def label_margin(fit: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """[N]: best other label's distance minus the own label's; > 0 when the own label fits best."""
    y = torch.as_tensor(list(labels))
    rows = torch.arange(len(y))
    own = fit[rows, y]
    other = fit.clone()
    other[rows, y] = float("inf")
    return other.min(1).values - own
