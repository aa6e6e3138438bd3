"""Evaluation: argmax over the verbalizer-token logits at the last real position.

Batched, no grad, rows sorted by length so batches carry little padding (predictions do
not depend on the batch: right padding is invisible to a causal prefix). Few-shot
in-context evaluation prepends k demonstrations per class, each formatted with the same
template and verbalizer, and trains nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import Example, Task
from .trainer import verbalizer_logits


@dataclass
class EvalResult:
    accuracy: float
    macro_f1: float
    per_class_accuracy: dict[str, float]
    confusion: list[list[int]]  # confusion[true][pred]
    n: int
    predictions: list[int] = field(default_factory=list, repr=False)

    def to_dict(self, prefix: str = "") -> dict:
        return {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}macro_f1": self.macro_f1,
            f"{prefix}per_class_accuracy": self.per_class_accuracy,
            f"{prefix}confusion": self.confusion,
            f"{prefix}n": self.n,
        }


def classification_metrics(labels: Sequence[int], preds: Sequence[int], label_names: Sequence[str]) -> EvalResult:
    """Accuracy, macro-F1 (mean over classes of 2TP/(2TP+FP+FN), 0 for a class never
    predicted nor present) and per-class accuracy (recall) from labels and predictions."""
    c = len(label_names)
    conf = [[0] * c for _ in range(c)]
    for y, p in zip(labels, preds):
        conf[y][p] += 1
    n = len(labels)
    acc = sum(conf[i][i] for i in range(c)) / n if n else 0.0
    f1s, per = [], {}
    for i in range(c):
        tp = conf[i][i]
        fn = sum(conf[i]) - tp
        fp = sum(conf[j][i] for j in range(c)) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
        per[label_names[i]] = tp / sum(conf[i]) if sum(conf[i]) else float("nan")
    return EvalResult(acc, sum(f1s) / c, per, conf, n, list(preds))


def _pad(seqs: list[list[int]], pad_id: int):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, mask.sum(1) - 1


@torch.no_grad()
def predict(
    model,
    task: Task,
    texts: Sequence[str],
    batch_size: int = 32,
    max_text_tokens: int | None = None,
    context_ids: Sequence[int] | None = None,
    accelerator=None,
    desc: str | None = None,
) -> list[int]:
    """Predicted class index per text. `context_ids` (few-shot demonstrations, already
    encoded) are inserted after the start token, before the template prefix.

    With an `accelerator` of N > 1 processes each rank predicts a shard (batches of
    `batch_size` per rank) and every rank returns all the predictions (gather_predictions),
    checked to hold every text exactly once; one process, or none given, runs the loop
    below unchanged."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    seqs = [task.encode(t, max_text_tokens) for t in texts]
    if context_ids:
        ns = _num_start(task)
        seqs = [s[:ns] + list(context_ids) + s[ns:] for s in seqs]
    if accelerator is not None and accelerator.num_processes > 1:
        rows, _ = gather_predictions(model, task, seqs, batch_size, accelerator, desc)
        model.train(was_training)
        if sorted(j for j, _ in rows) != list(range(len(seqs))):
            raise RuntimeError(
                f"distributed evaluation gathered {len(rows)} predictions for {len(seqs)} examples "
                f"({len({j for j, _ in rows})} distinct): refusing to report metrics over a wrong set"
            )
        preds = [0] * len(seqs)
        for j, p in rows:
            preds[j] = p
        return preds
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    preds = [0] * len(seqs)
    for i in tqdm(
        range(0, len(order), batch_size), desc=desc, unit="batch", disable=desc is None, leave=False
    ):  # desc: show a bar
        idx = order[i : i + batch_size]
        ids, mask, last = _pad([seqs[j] for j in idx], task.tokenizer.pad_token_id)
        logits = verbalizer_logits(model, ids.to(dev), mask.to(dev), last.to(dev), task.label_token_ids)
        for j, p in zip(idx, logits.argmax(-1).tolist()):
            preds[j] = p
    model.train(was_training)
    return preds


@torch.no_grad()
def gather_predictions(
    model, task: Task, seqs: list[list[int]], batch_size: int, accelerator, desc: str | None = None
) -> tuple[list[list[int]], int]:
    """Data-parallel prediction of encoded sequences: a DataLoader over the length-sorted
    indices, sharded by the accelerator (rank r takes batches r, r+N, ...; the last ones
    are padded with repeated samples so every rank runs as many full batches), gathered per
    batch as [index, prediction] rows with gather_for_metrics, which cuts the repeats off.
    Returns the rows (every rank gets all of them) and how many samples this rank ran,
    repeats included. `desc` set: a progress bar of that name over this rank's batches."""
    dev = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    loader = accelerator.prepare_data_loader(
        DataLoader(order, batch_size=batch_size, shuffle=False), device_placement=False
    )
    got: list[torch.Tensor] = []
    seen = 0
    for idx in tqdm(loader, desc=desc, unit="batch", disable=desc is None, leave=False):
        idx = idx.tolist()
        seen += len(idx)
        ids, mask, last = _pad([seqs[j] for j in idx], task.tokenizer.pad_token_id)
        logits = verbalizer_logits(model, ids.to(dev), mask.to(dev), last.to(dev), task.label_token_ids)
        rows = torch.stack([torch.tensor(idx, device=dev), logits.argmax(-1)], 1)
        got.append(accelerator.gather_for_metrics(rows).cpu())
    return (torch.cat(got).tolist() if got else []), seen


def evaluate(
    model,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_text_tokens: int | None = None,
    context_ids: Sequence[int] | None = None,
    accelerator=None,
    desc: str | None = None,
) -> EvalResult:
    """Metrics over `examples`; `desc` set: a progress bar of that name (one process)."""
    if not examples:
        raise ValueError("evaluate: no examples to evaluate on")
    preds = predict(
        model, task, [e.text for e in examples], batch_size, max_text_tokens, context_ids, accelerator, desc
    )
    return classification_metrics([e.label for e in examples], preds, task.label_names)


def _num_start(task: Task) -> int:
    pre = task.template.split("{text}")[0]
    return len(task.prefix_ids) - len(task.tokenizer(pre, add_special_tokens=False).input_ids)


def fewshot_context(task: Task, demos: Sequence[Example], seed: int = 0, separator: str = "\n") -> list[int]:
    """Token ids of the demonstrations: template(text) + verbalizer + separator each, in a
    seeded order that interleaves the classes. Uses the same pieces as `Task.encode`."""
    by_class: dict[int, list[Example]] = {}
    for d in demos:
        by_class.setdefault(d.label, []).append(d)
    rng = random.Random(seed)
    for v in by_class.values():
        rng.shuffle(v)
    ordered = []
    for i in range(max((len(v) for v in by_class.values()), default=0)):
        round_ = [v[i] for v in by_class.values() if i < len(v)]
        rng.shuffle(round_)
        ordered += round_
    ns = _num_start(task)
    sep = task.tokenizer(separator, add_special_tokens=False).input_ids if separator else []
    ids: list[int] = []
    for d in ordered:
        ids += task.encode(d.text)[ns:] + [task.label_token_ids[d.label]] + sep
    return ids


def evaluate_fewshot(
    model,
    task: Task,
    demos: Sequence[Example],
    examples: Sequence[Example],
    batch_size: int = 32,
    max_text_tokens: int | None = None,
    seed: int = 0,
) -> EvalResult:
    return evaluate(model, task, examples, batch_size, max_text_tokens, fewshot_context(task, demos, seed))
