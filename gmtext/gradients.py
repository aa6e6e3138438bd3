"""Gradients of the classification loss w.r.t. the matched parameter subset.

Two kinds of callers: the release (per-class target gradients from real data, optionally
per-example and clipped for DP) and the matcher (gradients of synthetic batches). Both
select parameters through `MatchedParams`, so the two sides always compare the same
tensors in the same order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD = "lm_head"
FINAL_NORM = "final_norm"
# The middle third of the blocks (layers 10-19 of a 30-block model): their gradients separate the
# classes far better than the last block's (docs/selection.md), so the margin probe matches them.
MIDDLE_BLOCKS = "middle_blocks"


class MatchedParams:
    """The parameter subset whose gradients are matched.

    specs: `lm_head` (the output projection's role only, even when tied to the input
    embeddings), `final_norm`, `last_blocks:K`, `middle_blocks`, `re:<regex>` over parameter names, or
    `sketch:<K_IN>x<K_OUT>:<SEED>:<regex>` (gmtext/sketch.py: attaches zero-initialised
    random-projection side branches to the nn.Linear modules matching <regex> and matches
    their G parameters, a k_in*k_out-dimensional projection of each layer's gradient).
    Sketch G parameters are matched only through `sketch:` specs, never by the others.
    When only the head is matched its gradient has a closed form (softmax error ⊗ last
    hidden state), which the fast objective uses instead of a double backward.
    """

    def __init__(self, model: nn.Module, specs: Sequence[str]):
        if not specs:
            raise ValueError(
                "matcher.params is empty; accepted entries: "
                "lm_head, final_norm, last_blocks:K, middle_blocks, re:<regex>"
            )
        self.model = model
        self.specs = list(specs)
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
        if any(s == HEAD for s in specs) and head.weight is emb.weight:
            # Untie for autograd only: a second Parameter over the same storage, so the
            # head's gradient excludes the input-embedding path (no extra memory).
            head.weight = nn.Parameter(emb.weight.detach(), requires_grad=False)
        from . import sketch as _sketch

        sketch_sel = {}
        base_names = [n for n, _ in model.named_parameters(remove_duplicate=False) if not _sketch.is_sketch_name(n)]
        for s in specs:
            if s.startswith(_sketch.PREFIX):
                k_in, k_out, seed, pattern = _sketch.parse_spec(s)
                sketch_sel[s] = _sketch.attach(model, block_regex(pattern, base_names), k_in, k_out, seed)
        names = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not _sketch.is_sketch_name(n)}
        all_names = dict(model.named_parameters(remove_duplicate=False))
        head_names = {n for n, p in names.items() if any(p is q for q in head.parameters())}
        blocks = block_prefixes(names)
        chosen: dict[str, nn.Parameter] = {}
        for s in specs:
            if s == HEAD:
                sel = {n: names[n] for n in sorted(head_names)}
            elif s == FINAL_NORM:
                sel = {n: p for n, p in names.items() if is_final_norm(n) and not _in_block(n, blocks)}
            elif s.startswith("last_blocks:"):
                k = int(s.split(":", 1)[1])
                if not 1 <= k <= len(blocks):
                    raise ValueError(
                        f"matcher.params entry {s!r}: model has {len(blocks)} blocks; use 1..{len(blocks)}"
                    )
                pre = blocks[-k:]
                sel = {n: p for n, p in names.items() if any(n.startswith(b) for b in pre)}
            elif s == MIDDLE_BLOCKS:
                pre = middle_third(blocks)
                sel = {n: p for n, p in names.items() if any(n.startswith(b) for b in pre)}
            elif s.startswith("re:"):
                sel = {n: p for n, p in names.items() if re.search(s[3:], n)}
            elif s in sketch_sel:
                sel = {n: all_names[n] for n in sketch_sel[s]}
            else:
                raise ValueError(
                    f"matcher.params entry {s!r} unknown; accepted: lm_head, final_norm, last_blocks:K, middle_blocks, "
                    "re:<regex>, sketch:<K_IN>x<K_OUT>:<SEED>:<regex>"
                )
            if not sel:
                raise ValueError(f"matcher.params entry {s!r} matches no parameter of this model")
            chosen.update(sel)
        self.names = list(chosen)
        self.params = [chosen[n] for n in self.names]
        self.head_only = set(self.names) == head_names
        self.activate()

    def activate(self) -> "MatchedParams":
        """Make these the only tensors with requires_grad (another MatchedParams on the same
        model, e.g. a probe's, switches them off)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        return self

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params]

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def block_regex(pattern: str, param_names) -> str:
    """A sketch spec's module pattern: `middle_blocks` and `last_blocks:K` name blocks relative to
    the model's depth (one recipe for any model), anything else is a regex over module names."""
    if pattern != MIDDLE_BLOCKS and not pattern.startswith("last_blocks:"):
        return pattern
    blocks = block_prefixes(param_names)
    if pattern == MIDDLE_BLOCKS:
        pre = middle_third(blocks)
    else:
        k = pattern.split(":", 1)[1]
        if not (k.isdigit() and 1 <= int(k) <= len(blocks)):
            raise ValueError(
                f"matched_params entry sketch:{pattern!r}: model has {len(blocks)} blocks; "
                f"use last_blocks:1..{len(blocks)}"
            )
        pre = blocks[-int(k) :]
    if not pre:
        raise ValueError(f"matched_params entry sketch:{pattern!r}: the model has no numbered blocks")
    return "^(" + "|".join(re.escape(b) for b in pre) + ")"


def middle_third(blocks: list) -> list:
    """Blocks [L//3, 2L//3) of L, at least one: model-relative, so one recipe fits any depth."""
    lo = len(blocks) // 3
    return blocks[lo : max(2 * len(blocks) // 3, lo + 1)]


def block_prefixes(names) -> list[str]:
    found = {}
    for n in names:
        m = re.match(r"(.*\.(layers|h|blocks)\.)(\d+)\.", n)
        if m:
            found[int(m.group(3))] = m.group(1) + m.group(3) + "."
    return [found[i] for i in sorted(found)]


def is_final_norm(name: str) -> bool:
    return re.search(r"(^|\.)(norm|final_layer_norm|ln_f|final_layernorm)\.", name) is not None


def _in_block(name, blocks) -> bool:
    return any(name.startswith(b) for b in blocks)


MATCH_LOSSES = ("full_vocab", "verbalizer")


def check_match_loss(match_loss: str) -> None:
    if match_loss not in MATCH_LOSSES:
        raise ValueError(f"match_loss={match_loss!r} unknown; accepted: {', '.join(MATCH_LOSSES)}")


def _logits_are_head_of_hidden(model) -> bool:
    """Whether logits = output head of the decoder's last hidden state, so the head may run on
    chosen positions only (no softcapping or logit scale applied after it, as Gemma-2 and
    Cohere do)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    if not (hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")):
        return False
    return model.get_decoder() is not None and model.get_output_embeddings() is not None


def last_hidden(model, ids, mask, last) -> torch.Tensor:
    """[B, d] decoder output at position `last[b]` of each row b (its last real token; where the
    padding is, left or right, only `last` knows)."""
    hid = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return hid[torch.arange(ids.shape[0], device=ids.device), last]


def last_token_logits(model, ids, mask, last, vocab=None, full_forward: bool = False) -> torch.Tensor:
    """float32 logits at each row's last real position `last`: [B, V], or [B, C] restricted to
    the verbalizer token ids `vocab` (the classifier every stage uses).

    The head runs on the B last hidden states only: the full [B, L, V] logits cost ~L times
    more and are unused. `full_forward` (a reference path), and models whose logits are not
    the head of the hidden state, take the model's own forward and gather from it."""
    if full_forward or not _logits_are_head_of_hidden(model):
        logits = model(input_ids=ids, attention_mask=mask).logits[torch.arange(ids.shape[0], device=ids.device), last]
        return _restrict(logits, vocab)
    return head_logits(model, last_hidden(model, ids, mask, last), vocab)


def head_logits(model, hidden: torch.Tensor, vocab=None) -> torch.Tensor:
    """float32 logits of the model's output head on [B, d] hidden states, restricted to the
    token ids `vocab` when given (shared by every path that already has the last hidden state)."""
    return _restrict(model.get_output_embeddings()(hidden), vocab)


def _restrict(logits: torch.Tensor, vocab) -> torch.Tensor:
    if vocab is not None:
        logits = logits[:, torch.as_tensor(vocab, device=logits.device)]
    return logits.float()


def last_token_loss(model, ids, mask, last, labels, vocab=None) -> torch.Tensor:
    """Per-example cross-entropy of the label at each row's last real position, through the
    model's whole forward (reference). With `vocab` the loss is over the verbalizer tokens
    only and `labels` are class indices: the loss fine-tuning optimises."""
    return F.cross_entropy(
        last_token_logits(model, ids, mask, last, vocab, full_forward=True), labels, reduction="none"
    )


def last_token_loss_fast(model, ids, mask, last, labels, vocab=None) -> torch.Tensor:
    """Same as `last_token_loss`, but the LM head runs only at each row's last real position
    (the full-sequence logits are [N, T, V]: ~20% of a small model's FLOPs, all unused)."""
    return F.cross_entropy(last_token_logits(model, ids, mask, last, vocab), labels, reduction="none")


def label_and_vocab(task, c: int, match_loss: str, dev):
    check_match_loss(match_loss)
    if match_loss == "verbalizer":
        return c, torch.tensor(task.label_token_ids, device=dev)
    return task.label_token_ids[c], None


@dataclass
class ClassTargets:
    """Per-class target gradients: grads[c][t] is the class-c mean gradient for tensor t."""

    grads: list[list[torch.Tensor]]
    names: list[str]
    counts: list[int]


def class_target_gradients(
    model,
    task,
    matched: MatchedParams,
    texts_by_class: Sequence[Sequence[str]],
    batch_size: int = 16,
    max_text_tokens: int | None = None,
    match_loss: str = "full_vocab",
) -> ClassTargets:
    """Batched mean gradient per class: one backward per chunk of a mean loss, which equals the
    mean of per-example gradients exactly (right padding cannot leak into a causal prefix).
    Texts are chunked in order of token length (less padding) and the head runs only at the
    last real position; the sum is order-independent up to float rounding."""
    dev = next(model.parameters()).device
    grads = []
    for c, texts in enumerate(texts_by_class):
        acc = [torch.zeros_like(p) for p in matched.params]
        label, vocab = label_and_vocab(task, c, match_loss, dev)
        texts = sorted(texts, key=lambda t: len(task.encode_text(t)))
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            ids, mask, last = task.batch(chunk, max_text_tokens)
            labels = torch.full((len(chunk),), label)
            loss = last_token_loss_fast(
                model, ids.to(dev), mask.to(dev), last.to(dev), labels.to(dev), vocab
            ).sum() / len(texts)
            gs = torch.autograd.grad(loss, matched.params)
            for a, g in zip(acc, gs):
                a += g.detach()
        grads.append(acc)
    return ClassTargets(grads, matched.names, [len(t) for t in texts_by_class])


def class_target_gradients_loop(
    model, task, matched: MatchedParams, texts_by_class, max_text_tokens=None, match_loss: str = "full_vocab"
) -> ClassTargets:
    """Reference path: one example at a time (the reference implementation's structure)."""
    dev = next(model.parameters()).device
    grads = []
    for c, texts in enumerate(texts_by_class):
        acc = [torch.zeros_like(p) for p in matched.params]
        label, vocab = label_and_vocab(task, c, match_loss, dev)
        for t in texts:
            ids, mask, last = task.batch([t], max_text_tokens)
            loss = last_token_loss(
                model, ids.to(dev), mask.to(dev), last.to(dev), torch.tensor([label], device=dev), vocab
            )[0]
            for a, g in zip(acc, torch.autograd.grad(loss, matched.params)):
                a += g.detach() / len(texts)
        grads.append(acc)
    return ClassTargets(grads, matched.names, [len(t) for t in texts_by_class])
