"""What several stages set up the same way: threads and seed, the model and task, the dataset
splits, the matched parameters, and the one way a stage obtains a release.

It sits below the stages (which never import each other) and above the components: a stage
calls these with its config and then only talks to components (matcher, projector, privacy
mechanism, selector, training source, finetuner) built by `config.build`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from .artifacts import read_json, run_lock
from .config import build
from .data import LabeledSplit, Task, carve_fraction, load_configured, release_records, sample_per_class
from .gradients import MatchedParams
from .models import check_fits_context, load_model
from .privacy.ledger import split_id
from .privacy.release import META_FILE, PRIVACY_FILE, RELEASE_FILE, Release, ReleaseInputs, release_fingerprint
from .sketch import PREFIX, expand_specs, is_sketch_name
from .tracking import artifact_name

PROBE_DIR = "probe"  # beside run_dir/release: the probe release made with the generator's


def start(cfg: DictConfig) -> None:
    """Thread count and global seed, as every model-loading stage begins."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def load_generator_model(cfg: DictConfig):
    m = cfg.model
    return load_model(
        m.name,
        device=m.device,
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        tiny_hidden=m.tiny_hidden,
        tiny_layers=m.tiny_layers,
    )


def build_task(cfg: DictConfig, tokenizer) -> Task:
    ds = cfg.dataset
    return Task(tokenizer, ds.template, list(ds.label_names), list(ds.verbalizers), start_token=cfg.model.start_token)


def dataset_split(ds: DictConfig, split: str, every_class: bool = True) -> LabeledSplit:
    """`split` of the configured dataset: the one place the dataset.* fields map onto load_split.
    With dataset.carve.eval_fraction > 0 the evaluation split is carved out of the train split's
    file and the train split is what the carve leaves (data.load_configured). `every_class`:
    data.load_split (False for a split a DP mechanism reads)."""
    return load_configured(ds, split, every_class)


def matched_params(cfg: DictConfig, model, specs=None) -> MatchedParams:
    """The matched tensors named by `specs` (default cfg.matched_params), sketch entries expanded."""
    return MatchedParams(model, expand_specs(list(cfg.matched_params if specs is None else specs), cfg.get("sketch")))


def training_source(cfg: DictConfig):
    """The configured training source (train=<option>, gmtext/finetune/sources.py)."""
    return build(cfg.train, drop=("source",))


# What a synthetic set is published with: the file it is read from and the record beside it
# (its config, summary and privacy ledger).
SIDECARS = {"synthetic.jsonl": "generate.json", "selected.jsonl": "select.json"}


def synthetic_artifact(cfg: DictConfig, path: Path) -> tuple[str, str, dict, dict]:
    """(name, type, files, metadata) of a set of texts as a tracker artifact: `selected` for a
    selection, `synthetic` otherwise (a generated pool, a merged or prompted set), with the
    record beside it when there is one. Producer and consumer build it the same way."""
    path = Path(path)
    kind = "selected" if path.name == "selected.jsonl" else "synthetic"
    files = {path.name: path}
    side = path.parent / SIDECARS.get(path.name, "")
    if path.name in SIDECARS and side.exists():
        files[side.name] = side
    return artifact_name(kind, cfg.dataset.name), kind, files, {"dataset": cfg.dataset.name}


# --------------------------------------------------------------------------- releases
def privacy_mechanism(cfg: DictConfig):
    """The configured privacy mechanism (privacy=<option>), checked against the inclusion rule
    before any real data is read."""
    mech = build(cfg.privacy, drop=("name",))
    mech.check_inclusion(cfg.real_per_class)
    return mech


def protected_split_id(cfg: DictConfig) -> str:
    """Public identity of the split a release reads (privacy/ledger.split_id)."""
    return split_id(cfg.dataset, cfg.dataset.train_split)


def inclusion_rule(cfg: DictConfig, mech) -> str:
    """Which records of the split the release reads, in words (public: config only)."""
    carve = carve_fraction(cfg.dataset)
    return _inclusion_rule(cfg, mech) + (
        f"; records carved into the evaluation split (sha256 < {carve}) never enter" if carve else ""
    )


def _inclusion_rule(cfg: DictConfig, mech) -> str:
    if cfg.real_per_class is not None:
        return f"random.sample of {cfg.real_per_class} per class (seed {cfg.seed}), dev hash bucket excluded"
    if mech.sample_rate < 1:
        return (
            "each non-empty record outside the dev hash bucket, "
            f"kept iff sha256(key={cfg.seed}, text) < {mech.sample_rate}"
        )
    return "every non-empty record outside the dev hash bucket"


def select_real_examples(ds_cfg, num_classes: int, real_per_class: int | None, seed: int, sample_rate: float = 1.0):
    """(texts per class, number of rows of the protected split), the split without the carved
    evaluation records, if any.

    `real_per_class=None`: every record of the split, decided record by record
    (data.release_records): the DP path. An integer keeps the seeded class-balanced sample of
    the non-private research runs (reproduces their published numbers; refused under DP)."""
    # the whole-split path decides record by record, and an empty class is a zero sum, not a stop
    split = dataset_split(ds_cfg, ds_cfg.train_split, every_class=real_per_class is not None)
    rows = len(split.examples) + split.skipped_empty
    if real_per_class is None:
        return release_records(split, num_classes, sample_rate, seed), rows
    chosen = sample_per_class(split, num_classes, real_per_class, seed)
    return [[e.text for e in chosen if e.label == c] for c in range(num_classes)], rows


def makes_dp_release(cfg: DictConfig, release_dir: Path) -> bool:
    """Whether obtaining the release will run a private mechanism on private data (no release
    given, none finished in release_dir): the tracker must then not watch it."""
    mech = build(cfg.privacy, drop=("name",))
    return (
        bool(getattr(mech, "private", True)) and not cfg.get("release") and not (Path(release_dir) / META_FILE).exists()
    )


def release_artifact(cfg: DictConfig, release_dir, kind: str = "release") -> tuple[str, dict, dict] | None:
    """(name, files, metadata) of a finished release dir as a tracker artifact; None when it
    holds none. Everything in it is meant for publication: the noisy targets (exact means
    only under privacy=none) and their ledger."""
    d = Path(release_dir)
    if not (d / META_FILE).exists():
        return None
    privacy, meta = read_json(d / PRIVACY_FILE), read_json(d / META_FILE)
    # kind: "release" (the generator's targets) or "probe" (the margin probe's): two names, so the
    # probe does not become the newest version of the generator's release
    return (
        artifact_name(kind, cfg.dataset.name),
        {f: d / f for f in (RELEASE_FILE, META_FILE, PRIVACY_FILE)},
        {
            "epsilon": float(privacy.get("epsilon", math.inf)),
            "delta": float(privacy.get("delta", 0.0)),
            "mechanism": privacy.get("mechanism"),
            "fingerprint": meta.get("fingerprint"),
            "param_names": meta.get("param_names"),
        },
    )


def _probe_specs(cfg: DictConfig) -> list[str]:
    specs = list(cfg.probe.matched_params)
    if specs and not 0 < cfg.probe.budget_share < 1:
        raise ValueError(f"probe.budget_share={cfg.probe.budget_share!r}: must be in (0, 1)")
    return specs


def _check_target_precision(precision: str, matched: MatchedParams, probe_specs: list[str], mech) -> None:
    """bf16 runs only on the clipped hook path: every released tensor a sketch, a clip norm set
    (checked before any record is read)."""
    if precision == "float32":
        return
    if getattr(mech, "clip_norm", None) is None:
        raise ValueError(
            f"target_precision={precision}: only clipped per-example passes run in bf16, and privacy.clip_norm "
            "is null; set privacy.clip_norm or target_precision=float32"
        )
    raw = [n for n in matched.names if not is_sketch_name(n)] + [s for s in probe_specs if not s.startswith(PREFIX)]
    if raw:
        raise ValueError(
            f"target_precision={precision}: every matched tensor must be sketched (sketch:... entries), "
            f"but {raw[:3]} are not; use target_precision=float32"
        )


def load_or_make_release(
    cfg: DictConfig,
    release_dir: Path,
    lm,
    task: Task,
    matched: MatchedParams,
    existing: str | None = None,
    edit_texts=None,
) -> tuple[Release, bool]:
    """The one way a stage obtains a release: load `existing` (a release dir given by the user)
    or a finished release in `release_dir`, checked against this config's fingerprint and
    privacy mechanism; otherwise read real data, make the configured release and save it
    into `release_dir`. Making it holds a lock on `release_dir`, so two stages started
    together on one run dir never both spend the budget: the second is refused.
    `edit_texts` (texts_by_class → texts_by_class) lets the canary audit plant its canaries
    into the private set. Returns (release, reused)."""
    fp = release_fingerprint(lm.fingerprint, cfg.dataset.name, task, matched.names, cfg.match_loss)
    mech = build(cfg.privacy, drop=("name",))  # a bad budget fails before real data is touched

    def load(src) -> Release:
        rel = Release.load(src)
        rel.check(fp, matched.names)
        mech.check_reuse(rel)
        return rel

    if existing:
        return load(existing), True
    mech.check_inclusion(cfg.real_per_class)
    probe_specs = _probe_specs(cfg)
    _check_target_precision(str(cfg.target_precision), matched, probe_specs, mech)
    release_dir = Path(release_dir)
    with run_lock(release_dir.parent, f"{release_dir.name}-making"):  # beside it: a failed start leaves no empty dir
        if (release_dir / META_FILE).exists():
            return load(release_dir), True
        check_fits_context(
            lm.model,
            "dataset.max_text_tokens",
            cfg.dataset.max_text_tokens,
            len(task.prefix_ids) + len(task.suffix_ids),
        )
        texts, num_rows = select_real_examples(
            cfg.dataset, task.num_classes, cfg.real_per_class, cfg.seed, mech.sample_rate
        )
        if edit_texts is not None:
            texts = edit_texts(texts)
        inp = ReleaseInputs(
            fp,
            cfg.dataset.max_text_tokens,
            num_rows,
            cfg.target_batch_size,
            cfg.match_loss,
            protected_split_id(cfg),
            inclusion_rule(cfg, mech),
            bool(cfg.progress),
            str(cfg.target_precision),
        )
        if not probe_specs:
            rel = mech.release(lm.model, task, matched, texts, inp)
        else:
            probe = matched_params(cfg, lm.model, probe_specs)
            fp_probe = release_fingerprint(lm.fingerprint, cfg.dataset.name, task, probe.names, cfg.match_loss)
            rel, prel = mech.release_joint(
                lm.model, task, [(matched, fp), (probe, fp_probe)], texts, inp, float(cfg.probe.budget_share)
            )
            matched.activate()
            prel.save(release_dir.parent / PROBE_DIR)  # before the generator's: its release.json marks both complete
        rel.save(release_dir)
    return rel, False
