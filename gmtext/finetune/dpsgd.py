"""DP-SGD fine-tuning baseline, on opacus' PrivacyEngine.

Mechanism: the subsampled Gaussian mechanism of Abadi et al. (2016), composed over the
training steps. Each step Poisson-samples the private records with rate q, clips every
per-example gradient (jointly over all trainable tensors) to L2 norm `clip_norm`, sums, adds
N(0, (sigma * clip_norm)^2) per coordinate and divides by the expected batch size; the
optimizer step is post-processing.

Adjacency (`train.adjacency`): the budget is a promise about neighbouring datasets, and a
comparison of ε between methods only means something under one relation. Under replace_one
(the default, as for GRADMM's releases and PE) sigma is calibrated on the ledger's PLD of the
subsampled Gaussian under substitution (gmtext.privacy.ledger.subsampled_noise_multiplier);
opacus' accountants know only add/remove. Under add_remove, opacus' accountant (PRV or RDP)
calibrates sigma and reports the spent ε, as in standard DP-SGD; the same run is about 1.6×
that ε under replace-one at ε = 1 (docs/privacy.md).

What opacus does here: per-example gradients (GradSampleModule hooks; layers it has no
rule for, e.g. transformers' LlamaRMSNorm, fall back to its functorch path), clipping,
the physical/logical batch split (BatchMemoryManager) and accounting. What gmtext replaces:
the two sources of randomness. opacus' secure_mode needs torchcsprng (not installable for
this torch) and its default generators are torch Mersenne Twisters, which keep 32 bits of
their seed, so both the noise and the batch membership could be recovered by a seed search.
Here the noise comes from `gmtext.privacy.noise` (os.urandom; SecureDPOptimizer) and the
Poisson mask from os.urandom uniforms (SecurePoissonSampler). Nothing computed from a
private batch (loss, batch size) leaves this module; only step and lr are reported.

Which count sets q and the step count: the split's row count (`public_record_count`), not the
number of records that train. The records that train are the rows outside the dev hash bucket,
and whether a row falls in that bucket is a function of its text: under replace-one, swapping
one record for one in the bucket changes the training-set size by one, so a q, a step count or
an `n_train` derived from it would tell the two neighbours apart. The row count is the same for
every replace-one neighbour (the GRADMM release divides by it for the same reason). Under
add_remove it is treated as public, as in standard DP-SGD practice (opacus derives q from the
dataset length the same way).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import Example, LabeledSplit, Task, _keyed_uniform, is_dev
from ..privacy import noise
from ..privacy.accountant import ADJACENCIES, check_budget_args
from ..privacy.ledger import subsampled_epsilon, subsampled_noise_multiplier
from .prefix import SuffixClassifier, frozen_prefix_depth, pad_states, prefix_states, suffix_reproduces_model
from .trainer import FineTuner, FitResult, VerbalizerClassifier

ACCOUNTANTS = ("prv", "rdp")
NUM_RECORDS_NOTE = (
    "num_records, the train split's row count (the same for every replace-one neighbour; treated as "
    "public under add_remove, as in standard DP-SGD practice), sets q = 1/ceil(num_records/batch_size), "
    "the step count and the subsample rate of train.size; how many records actually train is not released"
)


# --------------------------------------------------------------------------- which records
def keyed_uniform(seed: int, text: str) -> float:
    """A uniform in [0, 1) that is a function of (seed, text) alone (the release's keyed hash,
    keyed by the seed): a record's inclusion in a subsample never depends on which other
    records exist, so the subsample of a dataset with one more record is the old subsample
    plus at most that record (add/remove adjacency survives the subsampling)."""
    return _keyed_uniform(text, int(seed))


def record_subsample(examples: Sequence[Example], rate: float, seed: int) -> list[Example]:
    """The examples whose keyed_uniform(seed, text) < rate, in input order."""
    return [e for e in examples if keyed_uniform(seed, e.text) < rate]


def public_record_count(split: LabeledSplit) -> int:
    """The split's row count, empty rows included: what q, the step count and the subsample
    rate derive from (module docstring)."""
    return len(split.examples) + split.skipped_empty


def private_records(split: LabeledSplit, size: int | None, seed: int) -> list[Example]:
    """DP-SGD's training set: every train-split record outside the dev hash bucket, or, with
    an int `size`, a record-stable subsample of expected size about `size` (rate
    size / public_record_count, a count every replace-one neighbour shares, so each record's
    inclusion depends on its own text alone). Not class-balanced: balancing would make a
    record's inclusion depend on the others."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"train.size={size!r}: accepted: null (the whole train split) or an int >= 1")
    pool = [e for e in split.examples if not is_dev(e.text)]
    rows = public_record_count(split)
    if size is None or size >= rows:
        return pool
    return record_subsample(pool, size / rows, seed)


# --------------------------------------------------------------------------- secure randomness
class SecurePoissonSampler(UniformWithReplacementSampler):
    """opacus' Poisson batch sampler with its mask drawn from os.urandom uniforms
    (`gmtext.privacy.noise.uniform`) instead of a seedable torch generator. Subclassing keeps
    BatchMemoryManager's handling of Poisson batches (it checks for this class)."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int):
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=None, steps=steps)

    def __iter__(self):
        for _ in range(self.steps):
            take = noise.uniform(self.num_samples) < self.sample_rate
            yield take.nonzero()[0].tolist()


class SecureDPOptimizer(DPOptimizer):
    """opacus' flat-clipping DPOptimizer whose Gaussian noise comes from
    `gmtext.privacy.noise` (os.urandom; added in float64, released rounded to the gradient's
    dtype) rather than torch.normal on a seedable generator."""

    def add_noise(self):
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            (noisy,), _ = noise.add_noise([p.summed_grad], std)
            p.grad = noisy.to(p.summed_grad.dtype).view_as(p)
            _mark_as_processed(p.summed_grad)


class _SecurePrivacyEngine(PrivacyEngine):
    """PrivacyEngine that hands out SecureDPOptimizer. Only the single-process, flat-clipping
    case is supported (the only one gmtext runs DP-SGD in).

    `expected_batch_size`: the divisor of the noisy sum, q · num_records. opacus would take
    int(len(dataset) · q), a function of how many records train, which is private (module
    docstring): a divisor that moves between neighbours scales the released update."""

    def __init__(self, accountant: str, expected_batch_size: float):
        self.public_batch = float(expected_batch_size)
        with warnings.catch_warnings():  # "Secure RNG turned off": opacus' RNG is not used, see the module docstring
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            super().__init__(accountant=accountant, secure_mode=False)

    def _prepare_optimizer(
        self,
        *,
        optimizer,
        noise_multiplier,
        max_grad_norm,
        expected_batch_size,
        loss_reduction="mean",
        distributed=False,
        clipping="flat",
        noise_generator=None,
        grad_sample_mode="hooks",
        **kwargs,
    ):
        if (
            distributed
            or clipping != "flat"
            or noise_generator is not None
            or grad_sample_mode not in ("hooks", "functorch")
        ):
            raise ValueError(
                "dpsgd: only single-process flat clipping with hooks/functorch per-sample gradients is supported"
            )
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        return SecureDPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=self.public_batch,
            loss_reduction=loss_reduction,
        )


# --------------------------------------------------------------------------- data
class _Records(Dataset):
    """The training items (examples, or (cached state, label) pairs) as a map-style dataset."""

    def __init__(self, examples: Sequence):
        self.examples = list(examples)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def _collate_states(batch):
    """Batch of (cached prefix state, label) → (states, mask, last, labels), right-padded like
    Task.batch; None for an empty batch."""
    if not batch:
        return None
    h, mask, last = pad_states([s for s, _ in batch])
    return h, mask, last, torch.tensor([y for _, y in batch])


def _collate(task: Task, max_text_tokens: int | None):
    """Batch → (ids, mask, last, labels) exactly as classification_loss builds them (right
    padding; padded positions cannot reach the last real token through causal attention,
    so they contribute nothing to any per-example gradient); None for an empty batch."""

    def collate(batch: Sequence[Example]):
        if not batch:
            return None
        ids, mask, last = task.batch([e.text for e in batch], max_text_tokens)
        return ids, mask, last, torch.tensor([e.label for e in batch])

    return collate


# --------------------------------------------------------------------------- training
def check_dpsgd_args(epsilon, delta, clip_norm, accountant, microbatch, adjacency="replace_one") -> None:
    """One-line errors naming the bad value and what is accepted."""
    check_budget_args("train", epsilon, delta, accountant, ACCOUNTANTS)
    if adjacency not in ADJACENCIES:
        raise ValueError(f"train.adjacency={adjacency!r}: accepted: {', '.join(ADJACENCIES)}")
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"train.clip_norm={clip_norm!r}: accepted: a finite number > 0")
    if isinstance(microbatch, bool) or not isinstance(microbatch, int) or microbatch < 1:
        raise ValueError(f"train.microbatch={microbatch!r}: accepted: an int >= 1 (examples per physical batch)")


def dpsgd_fit(
    finetuner: FineTuner,
    model: nn.Module,
    task: Task,
    examples: Sequence[Example],
    epsilon: float,
    delta: float,
    clip_norm: float,
    accountant: str = "prv",
    microbatch: int = 8,
    on_step: Callable[[dict], None] | None = None,
    adjacency: str = "replace_one",
    num_records: int | None = None,
    cache_prefix: bool = True,
) -> FitResult:
    """(epsilon, delta)-DP fine-tuning of the finetuner's trainable parameters on `examples`.

    `num_records` (N): the public count the schedule derives from (the split's row count,
    public_record_count; None: len(examples), for callers whose example count is public).
    Logical (expected) batch: finetuner.batch_size, so q = 1 / ceil(N / batch_size);
    steps: finetuner.max_steps, else finetuner.epochs * ceil(N / batch_size); optimizer and
    lr schedule: the finetuner's (AdamW). `microbatch` bounds the physical batch (memory
    only; it does not change the mechanism). sigma is calibrated for the exact step count
    (opacus' make_private_with_epsilon converts epochs to steps with int(epochs / q), which
    rounds down for some q and would undercount by one step). FitResult.losses stays empty
    and on_step gets only step and lr: the loss of a private batch is not released.
    `adjacency` picks the relation sigma is calibrated under (module docstring).
    `cache_prefix`: when the trainable parameters are a suffix of the blocks (last_layers),
    run the frozen blocks once per record and train on their cached output
    (gmtext/finetune/prefix.py): the same mechanism; each step does about a third of the work.
    """
    from opacus.accountants.utils import get_noise_multiplier

    check_dpsgd_args(epsilon, delta, clip_norm, accountant, microbatch, adjacency)
    t0 = time.perf_counter()
    records = _Records(examples)
    if num_records is None and len(records) == 0:
        raise ValueError("dpsgd: no training examples")
    n = len(records) if num_records is None else num_records
    if isinstance(n, bool) or not isinstance(n, int) or n < max(1, len(records)):
        raise ValueError(
            f"dpsgd: num_records={num_records!r}: accepted: an int >= 1 and >= the number of training examples"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("dpsgd: the model has no trainable parameter; call finetuner.prepare(model) first")
    per_epoch = math.ceil(n / finetuner.batch_size)
    q = 1.0 / per_epoch
    total = finetuner.num_steps(n)
    if adjacency == "replace_one":
        sigma = subsampled_noise_multiplier(epsilon, delta, q, total, "replace_one")
    else:
        sigma = get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=total, accountant=accountant
        )
        # the ledger (dp_accounting's PLD) is what every artifact reports: opacus' accountant must
        # not certify a multiplier the ledger reads as over budget
        if subsampled_epsilon(sigma, delta, q, total, "add_remove") > epsilon:
            sigma = max(sigma, subsampled_noise_multiplier(epsilon, delta, q, total, "add_remove"))
    torch.manual_seed(finetuner.seed)
    start = frozen_prefix_depth(model) if cache_prefix else 0
    if start and not suffix_reproduces_model(model, task, start, finetuner.max_text_tokens):
        start = 0  # a decoder the cached path cannot reproduce (decided on public strings)
    if start:
        states = prefix_states(model, task, [e.text for e in examples], start, finetuner.max_text_tokens)
        records = _Records(list(zip(states, (e.label for e in examples))))
        module, collate = SuffixClassifier(model, start, task.label_token_ids), _collate_states
    else:
        module, collate = VerbalizerClassifier(model, task.label_token_ids), _collate(task, finetuner.max_text_tokens)
    sampler = SecurePoissonSampler(num_samples=len(records), sample_rate=q, steps=per_epoch)
    loader = DataLoader(records, batch_sampler=sampler, collate_fn=collate)
    engine = _SecurePrivacyEngine(accountant=accountant, expected_batch_size=q * n)
    net, opt, loader = engine.make_private(
        module=module,
        optimizer=finetuner.optimizer(params),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=clip_norm,
        poisson_sampling=False,
    )
    dev = params[0].device
    step = 0
    model.train()
    try:
        while step < total:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=microbatch, optimizer=opt) as physical:
                for batch in physical:
                    for g in opt.param_groups:
                        g["lr"] = finetuner.lr_at(step, total)
                    if batch is None:  # an empty Poisson batch still releases a noisy (all-noise) step
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        ids, mask, last, y = (t.to(dev) for t in batch)
                        F.cross_entropy(net(ids, mask, last), y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if not opt._is_last_step_skipped:
                        if on_step:
                            on_step({"step": step, "lr": opt.param_groups[0]["lr"]})
                        step += 1
                        if step >= total:
                            break
    finally:
        net._close()  # removes opacus' hooks and per-sample state: the model trains/evaluates normally afterwards
        for p in params:
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    model.eval()
    spent_add_remove = float(engine.get_epsilon(delta))  # opacus' accountant, which followed the run
    spent = spent_add_remove
    if adjacency == "replace_one":
        spent = subsampled_epsilon(float(sigma), float(delta), q, step, "replace_one")
    extra = {
        "epsilon": spent,
        "epsilon_add_remove": spent_add_remove,
        "relation": adjacency,
        "epsilon_target": float(epsilon),
        "delta": float(delta),
        "noise_multiplier": float(sigma),
        "sample_rate": q,
        "num_records": n,
        "expected_batch_size": q * n,  # the normaliser: public, like q (the realised batches are not)
        "steps": step,
        "clip_norm": float(clip_norm),
        "accountant": accountant if adjacency == "add_remove" else "dp_accounting PLD (replace_one)",
        "adjacency": "add_remove",  # the multiplier's reference: σ / per-record clip
        "noise_source": noise.SOURCE,
        "sampling_source": "os.urandom Poisson mask (gmtext.privacy.noise.uniform)",
        "num_records_public_note": NUM_RECORDS_NOTE,
        "frozen_prefix_blocks": start,  # blocks run once per record and cached (0: none); a function of the config
    }
    return FitResult(model, [], step, time.perf_counter() - t0, sum(p.numel() for p in params), extra)
