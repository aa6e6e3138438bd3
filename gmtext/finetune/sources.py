"""Training sources: what the fine-tune stage trains on (`train=<option>`, built by `_target_`).

Each source validates its own settings in its constructor and answers the stage's questions
itself, so the stage never branches on a source's name:

* `load(ctx)` → the training examples and in-context demonstrations (+ info for metrics.json);
* `trains`: False when the model is evaluated as loaded (zero-shot, few-shot in context);
* `check(lrs, num_processes)`: settings that depend on the stage (several lrs, processes);
* `fit(...)`: one training run (DP-SGD replaces the finetuner's own loop);
* `privacy_parts(split, fit_extra)`: the ledger records of what the model saw of the private
  split (None: a synthetic set of unknown origin);
* `published_input()`: the published set it trains on (linked as a tracker artifact), or None;
* `private_fit`: the loss, run time and class counts of training are statistics of private
  records (DP-SGD) and are never logged or published.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..artifacts import write_jsonl
from ..config import TrainDPSGDConfig, TrainFewShotConfig, TrainPromptedConfig, TrainRealConfig, TrainSyntheticConfig
from ..data import LabeledSplit, Task, sample_per_class
from ..data.synthetic import resolve_synthetic_path, synthetic_privacy
from ..privacy.ledger import Ledger, LedgerEntry
from .baselines import prompted_examples, read_synthetic, real_subset
from .distributed import broadcast


@dataclass
class SourceContext:
    """What a source may read: the loaded model and task, the (private) train split, the seed."""

    lm: Any
    task: Task
    train_split: LabeledSplit
    seed: int
    label_descriptions: list[str]
    accelerator: Any = None
    progress: bool = False  # long loading work (prompted generation) shows a bar


@dataclass
class TrainingSet:
    examples: list = field(default_factory=list)  # fine-tuning examples
    demos: list = field(default_factory=list)  # in-context demonstrations
    info: dict = field(default_factory=dict)  # metrics.json["train_info"]


def _non_private(name: str, split: str, what: str) -> dict:
    return {
        "epsilon": math.inf,
        "delta": 0.0,
        "ledger": Ledger(0.0, [LedgerEntry(name, "non_private", split, note=what)]),
    }


class TrainingSource:
    """Defaults shared by the sources: fine-tune with the finetuner on public-by-construction data."""

    name = "?"
    trains = True
    private_fit = False

    def check(self, lrs: list[float], num_processes: int) -> None:
        """Stage-level settings this source cannot work with (raised before the model loads)."""

    def load(self, ctx: SourceContext) -> TrainingSet:
        raise NotImplementedError

    def fit(self, finetuner, model, task: Task, examples, on_step, accelerator=None):
        return finetuner.fit(model, task, examples, on_step, accelerator=accelerator)

    def num_steps(self, finetuner, n: int) -> int | None:
        return finetuner.num_steps(n)

    def privacy_parts(self, split: str, fit_extra: dict | None) -> list[dict] | None:
        return []  # nothing from the private split

    def write_outputs(self, run_dir: Path, task: Task, data: TrainingSet) -> None:
        """Files beside metrics.json (main process only)."""

    def published_input(self) -> Path | None:
        """The published set this source trains on (a tracker artifact the fine-tune run uses,
        linked to the run that wrote it); None: nothing published (real data, none, prompted)."""
        return None


class SyntheticSource(TrainingSource):
    """Fine-tune on a synthetic set (synthetic.jsonl, selected.jsonl or a generate/select run dir)."""

    name = "synthetic"

    def __init__(self, path: Optional[str] = TrainSyntheticConfig.path):
        self.path = path

    def check(self, lrs, num_processes) -> None:
        if not self.path:
            raise ValueError("train=synthetic needs train.path=<synthetic.jsonl | selected.jsonl | generate run dir>")

    def load(self, ctx: SourceContext) -> TrainingSet:
        return TrainingSet(
            read_synthetic(self.path, ctx.task.label_names), info={"path": str(resolve_synthetic_path(self.path))}
        )

    def privacy_parts(self, split, fit_extra):
        rec = synthetic_privacy(self.path)
        return None if rec is None else [rec]

    def published_input(self) -> Path:
        return resolve_synthetic_path(self.path)


class RealSource(TrainingSource):
    """A seeded, class-balanced random subset of the real train split (non-private)."""

    name = "real"

    def __init__(self, size: int = TrainRealConfig.size):
        self.size = size

    def load(self, ctx: SourceContext) -> TrainingSet:
        return TrainingSet(real_subset(ctx.train_split, ctx.task.num_classes, self.size, ctx.seed))

    def privacy_parts(self, split, fit_extra):
        return [_non_private("real", split, "real training examples")]


class NoTraining(TrainingSource):
    """Zero-shot: evaluate the model as loaded."""

    name = "none"
    trains = False

    def load(self, ctx: SourceContext) -> TrainingSet:
        return TrainingSet()


class FewShotSource(TrainingSource):
    """In-context few-shot: k real demonstrations per class, no training."""

    name = "fewshot"
    trains = False

    def __init__(self, k: int = TrainFewShotConfig.k):
        if k < 1:
            raise ValueError(f"train.k={k}: need at least one demonstration per class")
        self.k = k

    def load(self, ctx: SourceContext) -> TrainingSet:
        return TrainingSet(demos=sample_per_class(ctx.train_split, ctx.task.num_classes, self.k, ctx.seed))

    def privacy_parts(self, split, fit_extra):
        return [_non_private("fewshot", split, "real in-context demonstrations")]


class PromptedSource(TrainingSource):
    """ZeroGen-style baseline: the same LM prompted with dataset.label_descriptions writes the set."""

    name = "prompted"

    def __init__(
        self,
        size: int = TrainPromptedConfig.size,
        prompt: str = TrainPromptedConfig.prompt,
        temperature: float = TrainPromptedConfig.temperature,
        top_p: float = TrainPromptedConfig.top_p,
        max_new_tokens: int = TrainPromptedConfig.max_new_tokens,
        use_chat: Optional[bool] = TrainPromptedConfig.use_chat,
    ):
        self.size, self.prompt, self.temperature, self.top_p = size, prompt, temperature, top_p
        self.max_new_tokens, self.use_chat = max_new_tokens, use_chat

    def load(self, ctx: SourceContext) -> TrainingSet:
        t0 = time.perf_counter()
        exs, info = prompted_examples(
            ctx.lm.model,
            ctx.lm.tokenizer,
            ctx.label_descriptions,
            self.size,
            ctx.seed,
            self.prompt,
            self.temperature,
            self.top_p,
            self.max_new_tokens,
            self.use_chat,
            progress=ctx.progress,
        )
        info.update(generation_seconds=time.perf_counter() - t0)
        return TrainingSet(
            broadcast(ctx.accelerator, exs), info=info
        )  # every rank trains on the main process's samples

    def write_outputs(self, run_dir, task, data) -> None:
        write_jsonl(
            Path(run_dir) / "prompted.jsonl",
            [{"text": e.text, "label": e.label, "label_name": task.label_names[e.label]} for e in data.examples],
        )


class DPSGDSource(TrainingSource):
    """DP-SGD on the private train split (gmtext/finetune/dpsgd.py, opacus)."""

    name = "dpsgd"
    private_fit = True

    def __init__(
        self,
        size: Optional[int] = TrainDPSGDConfig.size,
        epsilon: float = TrainDPSGDConfig.epsilon,
        delta: float = TrainDPSGDConfig.delta,
        clip_norm: float = TrainDPSGDConfig.clip_norm,
        accountant: str = TrainDPSGDConfig.accountant,
        microbatch: int = TrainDPSGDConfig.microbatch,
        adjacency: str = TrainDPSGDConfig.adjacency,
        cache_prefix: bool = TrainDPSGDConfig.cache_prefix,
    ):
        from .dpsgd import check_dpsgd_args  # opacus: seconds of import time, only for DP-SGD runs

        check_dpsgd_args(epsilon, delta, clip_norm, accountant, microbatch, str(adjacency))
        self.size, self.epsilon, self.delta, self.clip_norm = size, epsilon, delta, clip_norm
        self.accountant, self.microbatch, self.adjacency = str(accountant), microbatch, str(adjacency)
        self.cache_prefix = bool(cache_prefix)
        self.num_records: int | None = None  # the split's public row count, set by load()

    def check(self, lrs, num_processes) -> None:
        if len(lrs) > 1:
            raise ValueError(
                "finetune.lrs: selecting the lr over several DP-SGD runs spends the privacy budget once per run, "
                "which is not accounted; give one lr (finetuner.lr) for train=dpsgd"
            )
        if num_processes > 1:
            raise ValueError(
                f"train=dpsgd runs on one process (its sampling and accounting are per process); "
                f"launched with {num_processes}: run plain gmtext-finetune"
            )

    def load(self, ctx: SourceContext) -> TrainingSet:
        from .dpsgd import private_records, public_record_count

        self.num_records = public_record_count(ctx.train_split)
        return TrainingSet(private_records(ctx.train_split, self.size, ctx.seed))

    def num_steps(self, finetuner, n: int) -> int | None:
        return finetuner.num_steps(self.num_records if self.num_records is not None else n)

    def fit(self, finetuner, model, task, examples, on_step, accelerator=None):
        from .dpsgd import dpsgd_fit

        return dpsgd_fit(
            finetuner,
            model,
            task,
            examples,
            self.epsilon,
            self.delta,
            self.clip_norm,
            self.accountant,
            self.microbatch,
            on_step,
            self.adjacency,
            self.num_records,
            self.cache_prefix,
        )

    def privacy_parts(self, split, fit_extra):
        dp = fit_extra
        m = float(dp["noise_multiplier"])
        entry = LedgerEntry(
            "dpsgd",
            "subsampled_gaussian",
            split,
            records=(
                "each non-empty record outside the dev hash bucket"
                + ("" if self.size is None else f", kept by the keyed hash at rate train.size / rows ({self.size})")
                + ", Poisson-sampled at each step by os.urandom uniforms"
            ),
            num_records=dp.get("num_records"),  # the row count the schedule derives from (public, see dpsgd.py)
            noise_source=dp.get("noise_source"),
            noise_multiplier=m,
            sensitivity=float(dp["clip_norm"]),
            sigma=m * float(dp["clip_norm"]),
            count=int(dp["steps"]),
            sample_rate=float(dp["sample_rate"]),
            adjacency=dp.get("adjacency", "add_remove"),
        )
        return [
            {
                "epsilon": float(dp["epsilon"]),
                "delta": float(dp["delta"]),
                "ledger": Ledger(float(dp["delta"]), [entry], dp.get("relation", "add_remove")),
            }
        ]
