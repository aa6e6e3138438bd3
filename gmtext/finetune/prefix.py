"""Frozen-prefix cache: run the frozen lower blocks once per record, train on the rest.

When only the last k blocks (and the final norm) train, as `finetuner=last_layers` does, the
embeddings and the first L - k blocks are constants: their output for a record is the same at
every step. DP-SGD visits each of its ~8.5k records about `epochs` times, and on 2 CPU cores
that frozen forward is most of a step's time. So the hidden state entering block L - k is
computed once per record (right-padded batches; causal attention keeps padding out of every
real position) and the steps run only the trainable suffix on it. The per-example gradients,
clipping and noise are those of the uncached path, up to float summation order
(tests/test_dpsgd.py checks both).

The suffix reuses the decoder's own forward with `inputs_embeds` = the cached state and its
block list cut to the suffix, so rotary positions and the causal mask are built exactly as
in the full model. Decoders that transform `inputs_embeds` themselves (Gemma's embedding
scale, OPT's learned positions) would break that; `suffix_reproduces_model` checks on a
public string that the suffix gives the full model's logits and the caller falls back to
the plain path otherwise. Nothing here reads a private record to decide anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from ..data import Task
from ..gradients import _logits_are_head_of_hidden, head_logits, last_token_logits

PUBLIC_CHECK_TEXTS = ("a", "A public sentence, only used to check that the cached path is exact.")


class _Stop(Exception):
    pass


def frozen_prefix_depth(model: nn.Module) -> int:
    """Index of the first decoder block with a trainable parameter, when everything before it
    (embeddings, earlier blocks) is frozen and every trainable parameter sits in a block from
    there on, the final norm or the output head; 0 when no prefix can be cached."""
    if not _logits_are_head_of_hidden(model):
        return 0
    dec = model.get_decoder()
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return 0
    trainable = [i for i, block in enumerate(layers) if any(p.requires_grad for p in block.parameters())]
    if not trainable:
        return 0
    start = trainable[0]
    allowed = {id(p) for block in layers[start:] for p in block.parameters()}
    for mod in (getattr(dec, "norm", None), model.get_output_embeddings()):
        if mod is not None:
            allowed |= {id(p) for p in mod.parameters()}
    if any(p.requires_grad and id(p) not in allowed for p in model.parameters()):
        return 0  # e.g. trainable embeddings (a tied head counts as both)
    return start


@contextmanager
def _suffix_only(dec: nn.Module, start: int):
    """The decoder with its block list cut to blocks[start:] (the same module objects, so
    opacus' hooks on them still fire); restored on exit."""
    full = dec.layers
    dec.layers = full[start:]
    try:
        yield dec
    finally:
        dec.layers = full


class SuffixClassifier(nn.Module):
    """forward(states, mask, last) → [B, C] verbalizer logits, where `states` is the hidden
    state entering block `start` (prefix_states): the trainable suffix of VerbalizerClassifier."""

    def __init__(self, model: nn.Module, start: int, label_token_ids: Sequence[int]):
        super().__init__()
        self.model, self.start, self.label_token_ids = model, int(start), list(label_token_ids)

    def forward(self, states, mask, last):
        dec = self.model.get_decoder()
        with _suffix_only(dec, self.start):
            hid = dec(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
        hid = hid[torch.arange(states.shape[0], device=states.device), last]
        return head_logits(self.model, hid, self.label_token_ids)


@torch.no_grad()
def _states(model: nn.Module, start: int, ids, mask) -> torch.Tensor:
    """[B, T, d] hidden state entering block `start` (the forward stops there)."""
    caught = {}

    def stop(_mod, args, kwargs):
        caught["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    dec = model.get_decoder()
    handle = dec.layers[start].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        dec(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught["h"]


def prefix_states(
    model: nn.Module,
    task: Task,
    texts: Sequence[str],
    start: int,
    max_text_tokens: int | None,
    batch_size: int = 32,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Per text, the [len, d] hidden state entering block `start` over its real tokens
    (computed in eval mode: the cached prefix has no dropout). Batches are formed from texts
    of similar length, which halves the padding; each state is still its own text's alone."""
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(task.encode(texts[i], max_text_tokens)))
    was_training = model.training
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(texts)
    try:
        for i in tqdm(range(0, len(order), batch_size), desc="frozen prefix", unit="batch", disable=not progress):
            take = order[i : i + batch_size]
            ids, mask, last = task.batch([texts[j] for j in take], max_text_tokens)
            h = _states(model, start, ids.to(dev), mask.to(dev))
            for b, j in enumerate(take):
                out[j] = h[b, : int(last[b]) + 1].clone()
    finally:
        model.train(was_training)
    return out


def pad_states(states: Sequence[torch.Tensor]):
    """Right-pad [len_i, d] states → ([B, T, d] states, [B, T] mask, [B] last)."""
    width = max(s.shape[0] for s in states)
    h = states[0].new_zeros((len(states), width, states[0].shape[1]))
    mask = torch.zeros((len(states), width), dtype=torch.long)
    for b, s in enumerate(states):
        h[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
    return h, mask, mask.sum(1) - 1


@torch.no_grad()
def suffix_reproduces_model(model: nn.Module, task: Task, start: int, max_text_tokens: int | None) -> bool:
    """Whether the cached path gives the full model's verbalizer logits on public strings."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids, mask, last = (t.to(dev) for t in task.batch(list(PUBLIC_CHECK_TEXTS), max_text_tokens))
        want = last_token_logits(model, ids, mask, last, task.label_token_ids)
        h, m, la = pad_states(prefix_states(model, task, PUBLIC_CHECK_TEXTS, start, max_text_tokens, progress=False))
        got = SuffixClassifier(model, start, task.label_token_ids)(h, m.to(dev), la.to(dev))
    except Exception:  # a decoder whose forward does not take inputs_embeds this way
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6))
