"""The LM side of Private Evolution: class-conditional samples and their variations.

One function does both: rows are written token by token after a class prompt, and row i copies
its first keep[i] tokens from `forced` before sampling the rest. keep = 0 is a fresh sample
(the initial population); keep = a random share of a kept sample's tokens is a variation of it
(its opening survives, the rest is rewritten at the variation temperature). Everything here is
public: prompts, the LM, the population and a seeded generator; no private record is read.
"""

from __future__ import annotations

import torch


def allowed_mask(allowed_ids: torch.Tensor, vocab: int, device) -> torch.Tensor:
    """[vocab] additive mask: 0 for tokens the sampler may emit, -inf elsewhere (the same token
    set GRADMM's LM samples use: matching.vocab.allowed_token_ids)."""
    mask = torch.full((vocab,), float("-inf"), device=device)
    mask[allowed_ids.to(device)] = 0.0
    return mask


@torch.no_grad()
def sample_rows(
    model,
    prompt_ids: list[int],
    forced: torch.Tensor,
    keep: torch.Tensor,
    temperature: float,
    mask: torch.Tensor,
    gen: torch.Generator,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, L], perplexity [n]): n rows of L = forced.shape[1] tokens after `prompt_ids`,
    row i taking forced[i, :keep[i]] and sampling the rest at `temperature` (KV-cached, `chunk`
    rows at a time). Perplexity is the LM's own (temperature 1, full vocabulary) over all L tokens."""
    toks, ppl = [], []
    for s in range(0, len(forced), chunk):
        t, p = _sample_chunk(model, prompt_ids, forced[s : s + chunk], keep[s : s + chunk], temperature, mask, gen)
        toks.append(t)
        ppl.append(p)
    return torch.cat(toks), torch.cat(ppl)


def _sample_chunk(model, prompt_ids, forced, keep, temperature, mask, gen):
    dev = mask.device
    n, length = forced.shape
    out = model(input_ids=torch.tensor(prompt_ids, device=dev).expand(n, -1), use_cache=True)
    logp_sum = torch.zeros(n, dtype=torch.float64)
    rows = []
    for i in range(length):
        logits = out.logits[:, -1, : mask.shape[0]].float()
        probs = (logits / temperature + mask[: logits.shape[-1]]).softmax(-1).cpu()
        sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tok = torch.where(keep.cpu() > i, forced[:, i].cpu(), sampled)
        logp_sum += logits.log_softmax(-1).cpu().gather(1, tok[:, None]).squeeze(1).double()
        rows.append(tok)
        if i + 1 < length:
            out = model(input_ids=tok[:, None].to(dev), past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(rows, 1), torch.exp(-logp_sum / max(length, 1)).float()


def keep_lengths(n: int, length: int, keep_min: float, keep_max: float, gen: torch.Generator) -> torch.Tensor:
    """[n] numbers of leading tokens a variation keeps: round(u · length), u ~ U[keep_min, keep_max]."""
    u = keep_min + (keep_max - keep_min) * torch.rand(n, generator=gen)
    return (u * length).round().long().clamp(0, length)
