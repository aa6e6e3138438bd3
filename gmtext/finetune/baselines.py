"""Training-set sources for the fine-tune stage, and the DP-SGD baseline.

Sources: `synthetic` (a synthetic.jsonl / selected.jsonl), `real` (seeded balanced real
subset), `none` (zero-shot), `fewshot` (k real demonstrations per class, in context),
`prompted` (ZeroGen-style: the same LM prompted with each label's description) and
`dpsgd` (DP-SGD on the private train split, gmtext/finetune/dpsgd.py; the only source
besides `real` and `fewshot` that touches real training examples, and the only private one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data import Example, LabeledSplit, sample_per_class
from ..data.synthetic import read_synthetic_rows

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
            return d[len(a) :]
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
def prompted_examples(
    model,
    tokenizer,
    descriptions: Sequence[str],
    size: int,
    seed: int,
    prompt: str = "Write one short {description} sentence.",
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 40,
    use_chat: bool | None = None,
    batch_size: int = 16,
    max_tries: int = 5,
    progress: bool = False,
) -> tuple[list[Example], dict]:
    """ZeroGen-style baseline: sample `size // C` texts per class from the LM prompted with
    the class description (chat template when the tokenizer has one). Seeded; empty
    generations are resampled. `progress`: a bar (stderr) over the kept texts."""
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
    bar = tqdm(total=per * c, desc="prompted", unit="text", disable=not progress)
    eos = [
        t
        for t in {
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None,
        }
        if t is not None
    ]
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
                gen = model.generate(
                    ids.expand(nb, -1),
                    attention_mask=torch.ones(nb, ids.shape[1], dtype=torch.long, device=dev),
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos or None,
                )
                kept = len(texts)
                for row in gen[:, ids.shape[1] :]:
                    t = _clean(tokenizer.decode(row.tolist(), skip_special_tokens=True))
                    if t:
                        texts.append(t)
                bar.update(min(len(texts), per) - kept)
        if len(texts) < per:
            bar.close()
            raise RuntimeError(
                f"prompted baseline: only {len(texts)}/{per} non-empty generations "
                f"for class {k} after {max_tries} tries"
            )
        out += [Example(t, k) for t in texts[:per]]
    bar.close()
    model.train(was_training)
    return out, {"prompts": prompts, "per_class": per}
