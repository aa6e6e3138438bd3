"""Fine-tuners: full model, LoRA adapters (peft), or the last k blocks + final norm.

Each is a component built from config (`_target_` + exactly its constructor arguments).
The loss is the classification loss of the task: cross-entropy over the verbalizer tokens
only (logits at each row's last real token, restricted to `task.label_token_ids`, target =
class index), with ids built by `Task.batch`, so fine-tuning sees exactly the template and
first-token verbalizers that generation matched.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LORA_TARGET_MODULES, FullFineTunerConfig, LastLayersFineTunerConfig, LoRAFineTunerConfig
from ..data import Example, Task
from ..gradients import block_prefixes, is_final_norm, last_token_logits


def verbalizer_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, label_token_ids: Sequence[int]
) -> torch.Tensor:
    """[B, C] float32 logits of the verbalizer tokens at each row's last real position
    (gradients.last_token_logits: the same numbers generation and the release use)."""
    return last_token_logits(model, ids, mask, last, list(label_token_ids))


def classification_loss(
    model, task: Task, examples: Sequence[Example], max_text_tokens: int | None, reduction: str = "mean"
) -> torch.Tensor:
    dev = next(model.parameters()).device
    ids, mask, last = task.batch([e.text for e in examples], max_text_tokens)
    y = torch.tensor([e.label for e in examples], device=dev)
    logits = verbalizer_logits(model, ids.to(dev), mask.to(dev), last.to(dev), task.label_token_ids)
    return F.cross_entropy(logits, y, reduction=reduction)


@dataclass
class FitResult:
    model: nn.Module
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    trainable_params: int = 0
    extra: dict = field(default_factory=dict)


class FineTuner:
    """Common training loop: AdamW, linear warmup then constant lr, seeded shuffling.

    `prepare(model)` chooses the trainable parameters (and may wrap the model);
    subclasses override `_select`. `fit` trains a model that `prepare` returned.
    `batch_size` is the global batch: examples per optimizer step over all processes when
    run data-parallel under `accelerate launch` (see `fit`).
    """

    def __init__(
        self,
        lr: float = FullFineTunerConfig.lr,
        epochs: int = FullFineTunerConfig.epochs,
        max_steps: int = FullFineTunerConfig.max_steps,
        batch_size: int = FullFineTunerConfig.batch_size,
        weight_decay: float = FullFineTunerConfig.weight_decay,
        warmup_ratio: float = FullFineTunerConfig.warmup_ratio,
        seed: int = FullFineTunerConfig.seed,
        grad_clip: float = FullFineTunerConfig.grad_clip,
        max_text_tokens: int = FullFineTunerConfig.max_text_tokens,
    ):
        if lr <= 0 or batch_size < 1 or epochs < 0 or max_steps < 0 or not 0 <= warmup_ratio < 1:
            raise ValueError(
                f"finetuner: need lr > 0, batch_size >= 1, epochs >= 0, max_steps >= 0, 0 <= warmup_ratio < 1 "
                f"(got lr={lr}, batch_size={batch_size}, epochs={epochs}, max_steps={max_steps}, "
                f"warmup_ratio={warmup_ratio})"
            )
        self.lr, self.epochs, self.max_steps, self.batch_size = float(lr), int(epochs), int(max_steps), int(batch_size)
        self.weight_decay, self.warmup_ratio, self.seed = float(weight_decay), float(warmup_ratio), int(seed)
        self.grad_clip, self.max_text_tokens = float(grad_clip), max_text_tokens

    # ----- parameter selection -------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Freeze everything except what this fine-tuner trains; returns the model to train."""
        torch.manual_seed(self.seed)
        model = self._wrap(model)
        for p in model.parameters():
            p.requires_grad_(False)
        sel = self._select(model)
        if not sel:
            raise ValueError(f"{type(self).__name__}: no trainable parameter selected for this model")
        for p in sel.values():
            p.requires_grad_(True)
        return model

    def _wrap(self, model):
        return model

    def _select(self, model) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())

    @staticmethod
    def trainable_names(model) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def num_steps(self, n: int, batch_size: int | None = None) -> int:
        bs = batch_size or self.batch_size
        return self.max_steps if self.max_steps > 0 else self.epochs * math.ceil(n / bs)

    def schedule(self, n: int, total: int, rng: random.Random) -> list[list[int]]:
        """Index batches for `total` steps: each epoch is a fresh shuffle cut into batches
        (the last one may be smaller), so every example is seen once per epoch."""
        out: list[list[int]] = []
        while len(out) < total:
            perm = list(range(n))
            rng.shuffle(perm)
            out += [perm[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        return out[:total]

    def lr_at(self, step: int, total: int) -> float:
        warm = int(self.warmup_ratio * total)
        return self.lr * (step + 1) / warm if step < warm else self.lr

    def optimizer(self, params) -> torch.optim.Optimizer:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)

    # ----- training --------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        task: Task,
        examples: Sequence[Example],
        on_step: Callable[[dict], None] | None = None,
        accelerator=None,
    ) -> FitResult:
        """Train `model` (as returned by `prepare`) on `examples`; deterministic given the seed.

        Runs through an `accelerate.Accelerator` (one is made when none is given). On one
        process it changes nothing: the same batches, loss, clipping and AdamW steps. On N
        processes (`accelerate launch`) `batch_size` stays the *global* batch: every rank
        draws the same seeded schedule and takes its share `batch[rank::N]` of each batch;
        the loss is the sum over its share divided by the global batch length, times N
        (DDP averages gradients over ranks), so every step applies the gradient of the mean
        loss over the whole global batch, as one process would (up to float summation
        order). The model must already sit on `accelerator.device`."""
        from .distributed import get_accelerator

        t0 = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("fit: the model has no trainable parameter; call prepare(model) first")
        examples = list(examples)
        if not examples:
            return FitResult(model, [], 0, 0.0, sum(p.numel() for p in params))
        acc = accelerator if accelerator is not None else get_accelerator()
        world, rank = acc.num_processes, acc.process_index
        torch.manual_seed(self.seed)
        rng = random.Random(self.seed)
        net, opt = acc.prepare(VerbalizerClassifier(model, task.label_token_ids), self.optimizer(params))
        total = self.num_steps(len(examples))
        losses = []
        model.train()
        for step, take in enumerate(self.schedule(len(examples), total, rng)):
            for g in opt.param_groups:
                g["lr"] = self.lr_at(step, total)
            if world == 1:
                loss = _classifier_loss(net, task, [examples[i] for i in take], self.max_text_tokens)
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                value = float(loss.detach())
            else:
                mine = take[rank::world]
                # a rank without a share (global batch < N) still joins the gradient all-reduce, with weight 0
                part_sum = _classifier_loss(
                    net, task, [examples[i] for i in mine] or [examples[take[0]]], self.max_text_tokens, reduction="sum"
                ) * (1.0 if mine else 0.0)
                opt.zero_grad(set_to_none=True)
                acc.backward(part_sum * (world / len(take)))
                value = float(acc.reduce(part_sum.detach(), "sum")) / len(take)
            if self.grad_clip > 0:
                acc.clip_grad_norm_(params, self.grad_clip)
            opt.step()
            losses.append(value)
            if on_step:
                on_step({"step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"]})
        model.eval()
        del net, opt
        acc.free_memory()  # the accelerator keeps no reference to this model (a stage trains one per lr)
        return FitResult(model, losses, total, time.perf_counter() - t0, sum(p.numel() for p in params))


class VerbalizerClassifier(nn.Module):
    """`model` as a classifier: forward(ids, mask, last) → [B, C] verbalizer logits. The
    module the Accelerator prepares (and DDP wraps on several processes), so that the
    gradient all-reduce sees the same cheap last-position forward as one process."""

    def __init__(self, model: nn.Module, label_token_ids: Sequence[int]):
        super().__init__()
        self.model = model
        self.label_token_ids = list(label_token_ids)

    def forward(self, ids, mask, last):
        return verbalizer_logits(self.model, ids, mask, last, self.label_token_ids)


def _classifier_loss(
    net, task: Task, examples: Sequence[Example], max_text_tokens: int | None, reduction: str = "mean"
) -> torch.Tensor:
    """classification_loss through a (prepared) VerbalizerClassifier."""
    dev = next(net.parameters()).device
    ids, mask, last = task.batch([e.text for e in examples], max_text_tokens)
    y = torch.tensor([e.label for e in examples], device=dev)
    logits = net(ids.to(dev), mask.to(dev), last.to(dev))
    return F.cross_entropy(logits, y, reduction=reduction)


class FullFineTuner(FineTuner):
    """Every parameter is trained (tied input/output embeddings count once)."""


class LoRAFineTuner(FineTuner):
    """peft LoRA adapters (default on the attention q/v projections); the base model stays frozen."""

    def __init__(
        self,
        r: int = LoRAFineTunerConfig.r,
        alpha: int = LoRAFineTunerConfig.alpha,
        dropout: float = LoRAFineTunerConfig.dropout,
        target_modules: Sequence[str] = LORA_TARGET_MODULES,
        lr: float = LoRAFineTunerConfig.lr,
        **kw,
    ):
        super().__init__(lr=lr, **kw)
        if r < 1:
            raise ValueError(f"finetuner.r={r}: LoRA rank must be >= 1")
        self.r, self.alpha, self.dropout, self.target_modules = int(r), int(alpha), float(dropout), list(target_modules)

    def _wrap(self, model):
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in self.target_modules if t not in names]
        if missing:
            raise ValueError(
                f"finetuner.target_modules {missing} not found in the model "
                "(e.g. Llama: q_proj, v_proj; OPT: q_proj, v_proj; Phi: q_proj, v_proj)"
            )
        cfg = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules, bias="none"
        )
        return get_peft_model(model, cfg)

    def _select(self, model):
        return {n: p for n, p in model.named_parameters() if "lora_" in n}


class LastLayersFineTuner(FineTuner):
    """Only the last `num_layers` transformer blocks and the final norm are trained."""

    def __init__(
        self,
        num_layers: int = LastLayersFineTunerConfig.num_layers,
        train_final_norm: bool = LastLayersFineTunerConfig.train_final_norm,
        **kw,
    ):
        super().__init__(**kw)
        if num_layers < 1:
            raise ValueError(f"finetuner.num_layers={num_layers}: must be >= 1")
        self.num_layers, self.train_final_norm = int(num_layers), bool(train_final_norm)

    def _select(self, model):
        names = dict(model.named_parameters())
        blocks = block_prefixes(names)
        if self.num_layers > len(blocks):
            raise ValueError(f"finetuner.num_layers={self.num_layers}: the model has {len(blocks)} blocks")
        pre = tuple(blocks[-self.num_layers :])
        sel = {n: p for n, p in names.items() if n.startswith(pre)}
        if self.train_final_norm:
            sel.update({n: p for n, p in names.items() if is_final_norm(n) and not n.startswith(tuple(blocks))})
        return sel
