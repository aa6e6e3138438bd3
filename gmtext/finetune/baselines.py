"""Training-set sources for the fine-tune stage, and the DP-SGD baseline.

Sources: `synthetic` (a synthetic.jsonl / selected.jsonl), `real` (seeded balanced real
subset), `none` (zero-shot), `fewshot` (k real demonstrations per class, in context),
`prompted` (ZeroGen-style: the same LM prompted with each label's description) and
`dpsgd` (DP-SGD fine-tuning on a real subset; the only source besides `real` and
`fewshot` that touches real training examples, and the only private one).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Example, LabeledSplit, Task, sample_per_class
from ..data.synthetic import read_synthetic_rows
from .trainer import FineTuner, FitResult

SOURCES = ("synthetic", "real", "none", "fewshot", "prompted", "dpsgd")


# --------------------------------------------------------------------------- synthetic
def read_synthetic(path: str | Path, label_names: Sequence[str]) -> list[Example]:
    """Training examples from a synthetic set (fields text, label; see gmtext.data.synthetic)."""
    return [Example(r["text"].strip(), r["label"]) for r in read_synthetic_rows(path, label_names)]


# --------------------------------------------------------------------------- real
def real_subset(split: LabeledSplit, num_classes: int, size: int, seed: int) -> list[Example]:
    """`size` real training examples, size // num_classes per class, seeded, dev excluded."""
    if size < num_classes:
        raise ValueError(f"train.size={size}: need at least one example per class ({num_classes} classes)")
    return sample_per_class(split, num_classes, size // num_classes, seed)


# --------------------------------------------------------------------------- prompted
def _strip_article(desc: str) -> str:
    d = desc.strip()
    for a in ("a ", "an ", "A ", "An "):
        if d.startswith(a):
            return d[len(a):]
    return d


def _clean(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().strip('"').strip("'").strip()
        if line:
            return line
    return ""


def prompt_ids(tokenizer, instruction: str, use_chat: bool | None = None) -> list[int]:
    if use_chat is None:
        use_chat = getattr(tokenizer, "chat_template", None) is not None
    if use_chat:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    ids = tokenizer(instruction + "\n", add_special_tokens=True).input_ids
    return list(ids)


@torch.no_grad()
def prompted_examples(model, tokenizer, descriptions: Sequence[str], size: int, seed: int,
                      prompt: str = "Write one short {description} sentence.", temperature: float = 1.0, top_p: float = 0.95,
                      max_new_tokens: int = 40, use_chat: bool | None = None, batch_size: int = 16, max_tries: int = 5) -> tuple[list[Example], dict]:
    """ZeroGen-style baseline: sample `size // C` texts per class from the LM prompted with
    the class description (chat template when the tokenizer has one). Seeded; empty
    generations are resampled."""
    c = len(descriptions)
    if c == 0:
        raise ValueError("dataset.label_descriptions is empty: the prompted baseline needs one description per label")
    if size < c:
        raise ValueError(f"train.size={size}: need at least one example per class ({c} classes)")
    if "{description}" not in prompt:
        raise ValueError(f"train.prompt={prompt!r} must contain '{{description}}'")
    per = size // c
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out, prompts = [], []
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None} if t is not None]
    for k, desc in enumerate(descriptions):
        instr = prompt.format(description=_strip_article(desc))
        prompts.append(instr)
        ids = torch.tensor([prompt_ids(tokenizer, instr, use_chat)], device=dev)
        texts: list[str] = []
        for attempt in range(max_tries):
            if len(texts) >= per:
                break
            torch.manual_seed(seed * 1_000_003 + k * 7919 + attempt)
            need = per - len(texts)
            for i in range(0, need, batch_size):
                nb = min(batch_size, need - i)
                gen = model.generate(ids.expand(nb, -1), attention_mask=torch.ones(nb, ids.shape[1], dtype=torch.long, device=dev),
                                     do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos or None)
                for row in gen[:, ids.shape[1]:]:
                    t = _clean(tokenizer.decode(row.tolist(), skip_special_tokens=True))
                    if t:
                        texts.append(t)
        if len(texts) < per:
            raise RuntimeError(f"prompted baseline: only {len(texts)}/{per} non-empty generations for class {k} after {max_tries} tries")
        out += [Example(t, k) for t in texts[:per]]
    model.train(was_training)
    return out, {"prompts": prompts, "per_class": per}


# --------------------------------------------------------------------------- DP-SGD
class _ExampleLoss(nn.Module):
    """Verbalizer cross-entropy of one unpadded-prefix example, for torch.func (vmap-safe:
    no attention mask, the last real row picked by a one-hot; trailing pads cannot reach
    it through causal attention)."""

    def __init__(self, model, label_token_ids):
        super().__init__()
        self.model = model
        self.register_buffer("lab", torch.tensor(list(label_token_ids)), persistent=False)

    def forward(self, ids, sel, y):
        hid = self.model.get_decoder()(input_ids=ids[None]).last_hidden_state[0]
        h = (hid * sel[:, None]).sum(0)
        logits = self.model.get_output_embeddings()(h[None])[:, self.lab].float()
        return F.cross_entropy(logits, y[None])


def _per_example_clipped_sum(model, task, names, params, batch: Sequence[Example], clip_norm: float, microbatch: int, max_text_tokens):
    """Sum over `batch` of per-example gradients (of the trainable params), each clipped to
    L2 norm `clip_norm` jointly over all tensors. vmap in microbatches bounds memory."""
    from torch.func import functional_call, grad, vmap

    dev = params[0].device
    wrapper = _ExampleLoss(model, task.label_token_ids).to(dev)
    keys = ["model." + n for n in names]
    p = {k: t.detach() for k, t in zip(keys, params)}

    def loss(pp, i1, s1, y1):
        return functional_call(wrapper, pp, (i1, s1, y1), strict=False)

    per_grad = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in params]
    for i in range(0, len(batch), microbatch):
        part = batch[i : i + microbatch]
        ids, _, last = task.batch([e.text for e in part], max_text_tokens)
        ids = ids.to(dev)
        sel = F.one_hot(last, ids.shape[1]).to(dev, torch.float32)
        y = torch.tensor([e.label for e in part], device=dev)
        g = per_grad(p, ids, sel, y)
        gs = [g[k] for k in keys]
        norms = torch.sqrt(sum(x.reshape(len(part), -1).float().pow(2).sum(1) for x in gs))
        scale = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for s, x in zip(sums, gs):
            s += (x.float() * scale.view(-1, *([1] * (x.dim() - 1)))).sum(0)
    return sums


def dpsgd_fit(finetuner: FineTuner, model: nn.Module, task: Task, examples: Sequence[Example], epsilon: float, delta: float,
              clip_norm: float, accountant: str = "prv", microbatch: int = 8, on_step: Callable[[dict], None] | None = None) -> FitResult:
    """DP-SGD (Abadi et al.) on the finetuner's trainable parameters.

    Poisson subsampling with rate q = batch_size / n, per-example clipping to `clip_norm`,
    Gaussian noise of std sigma * clip_norm on the clipped sum, divided by the expected
    batch size; AdamW step (post-processing). sigma is calibrated by opacus' accountant
    (`prv` or `rdp`) for q and the step count, and the spent epsilon is re-accounted at
    the end. Sampling and noise come from the OS CSPRNG (privacy/noise.py), never from the
    experiment seed (so DP runs are not bit-reproducible, by design). Adjacency:
    add/remove one example (the standard subsampled-Gaussian analysis).
    """
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from ..privacy import noise as secure

    if not (epsilon > 0 and 0 < delta < 1 and clip_norm > 0):
        raise ValueError(f"dpsgd: need epsilon > 0, 0 < delta < 1, clip_norm > 0 (got {epsilon}, {delta}, {clip_norm})")
    if accountant not in ("prv", "rdp"):
        raise ValueError(f"train.accountant={accountant!r}: accepted: prv, rdp")
    t0 = time.perf_counter()
    examples = list(examples)
    n = len(examples)
    if n == 0:
        raise ValueError("dpsgd: no training examples")
    names = [nm for nm, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("dpsgd: the model has no trainable parameter; call finetuner.prepare(model) first")
    q = min(1.0, finetuner.batch_size / n)
    steps = finetuner.num_steps(n)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    torch.manual_seed(finetuner.seed)
    opt = finetuner.optimizer(params)
    expected = q * n
    losses = []
    model.train()
    for step in range(steps):
        take = (secure.uniform(n) <= q).nonzero()[0].tolist()  # Poisson sampling from the OS CSPRNG
        batch = [examples[i] for i in take]
        for g in opt.param_groups:
            g["lr"] = finetuner.lr_at(step, steps)
        sums = _per_example_clipped_sum(model, task, names, params, batch, clip_norm, microbatch, finetuner.max_text_tokens) if batch \
            else [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for p, s in zip(params, sums):
            noise = secure.randn(p.shape, std=sigma * clip_norm, device=p.device)
            p.grad = ((s + noise) / expected).to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # nothing computed from the private batch (its loss, its size) is reported: only the public schedule
        if on_step:
            on_step({"step": step, "lr": opt.param_groups[0]["lr"]})
    model.eval()
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(sigma, q, steps)]
    spent = float(acc.get_epsilon(delta=delta))
    extra = {"epsilon": spent, "epsilon_target": float(epsilon), "delta": float(delta), "noise_multiplier": float(sigma),
             "sample_rate": q, "steps": steps, "clip_norm": float(clip_norm), "accountant": accountant, "adjacency": "add_remove"}
    return FitResult(model, losses, steps, time.perf_counter() - t0, sum(p.numel() for p in params), extra)
