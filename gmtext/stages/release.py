"""The release: the only stage that reads private real examples.

It turns real data into per-class target gradients (noisy and accounted when privacy is
on) and writes them with a privacy ledger. Everything downstream receives a `Release`,
which carries gradients, counts and public metadata only: no text, no lengths, no
statistics of the real data beyond what the ledger accounts for.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tqdm.auto import tqdm

from ..artifacts import read_json, run_lock, save_torch, write_json
from ..data import Task, carve_fraction, load_configured, release_records, sample_per_class
from ..gradients import MatchedParams, class_target_gradients, label_and_vocab
from ..models import check_fits_context
from ..privacy.accountant import ACCOUNTANTS, ADJACENCIES, calibrate_noise_multiplier, sum_sensitivity, validate_budget
from ..privacy.ledger import Ledger, LedgerEntry, split_id
from ..privacy.mechanism import _check_method, clipped_sum
from ..privacy.noise import SOURCE as NOISE_SOURCE
from ..privacy.noise import add_noise
from ..sketch import expand_specs

RELEASE_FILE = "targets.pt"
META_FILE = "release.json"
PRIVACY_FILE = "privacy.json"


class ReleaseMismatch(ValueError):
    pass


@dataclass
class Release:
    targets: list[list[torch.Tensor]]  # [class][tensor]
    param_names: list[str]
    label_names: list[str]
    divisors: list[float]  # what each class's sum was divided by: the real count (ε = ∞) or a public constant (DP)
    fingerprint: str
    privacy: dict = field(default_factory=dict)

    def save(self, out_dir) -> None:
        out = Path(out_dir)
        save_torch(out / RELEASE_FILE, {"targets": [[t.detach().cpu() for t in tc] for tc in self.targets]})
        write_json(out / PRIVACY_FILE, self.privacy)
        meta = {k: v for k, v in asdict(self).items() if k not in ("targets", "privacy")}
        write_json(out / META_FILE, meta)  # written last: its presence marks a complete release

    @classmethod
    def load(cls, out_dir) -> "Release":
        out = Path(out_dir)
        if not (out / META_FILE).exists():
            raise FileNotFoundError(f"release={str(out)!r}: no {META_FILE} there (not a release directory, or an unfinished one)")
        meta = read_json(out / META_FILE)
        if "counts" in meta:  # releases written before the DP release divided by a public constant
            meta["divisors"] = [float(n) for n in meta.pop("counts")]
        targets = torch.load(out / RELEASE_FILE, map_location="cpu", weights_only=True)["targets"]
        return cls(targets=targets, privacy=read_json(out / PRIVACY_FILE), **meta)

    def check(self, fingerprint: str, names: list[str]) -> None:
        if fingerprint != self.fingerprint:
            raise ReleaseMismatch(f"release fingerprint {self.fingerprint} does not match this config ({fingerprint}): it was made for another model, dataset, template, verbalizers or matched parameters")
        if names != self.param_names:
            raise ReleaseMismatch(f"release holds gradients for {self.param_names[:3]}..., this config matches {names[:3]}...")

    @property
    def epsilon(self) -> float:
        return float(self.privacy.get("epsilon", math.inf))


def release_fingerprint(model_fingerprint: str, dataset_name: str, task: Task, matched_names: list[str], match_loss: str = "full_vocab") -> str:
    """What the targets depend on, public parts only: reusing a release with a different
    model/template/verbalizer/parameter set would match the wrong thing."""
    key = json.dumps([model_fingerprint, dataset_name, task.template, task.label_names, task.label_token_ids, task.prefix_ids, task.suffix_ids, matched_names] + ([match_loss] if match_loss != "full_vocab" else []))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _load_private_split(ds_cfg):
    return load_configured(ds_cfg, ds_cfg.train_split)  # without the carved evaluation records, if any


def select_real_examples(ds_cfg, num_classes: int, real_per_class: int | None, seed: int, sample_rate: float = 1.0):
    """(texts per class, number of rows of the protected split).

    `real_per_class=None`: every record of the split, decided record by record
    (data.release_records): the DP path. An integer keeps the seeded class-balanced sample of
    the non-private research runs (reproduces their published numbers; refused under DP)."""
    split = _load_private_split(ds_cfg)
    rows = len(split.examples) + split.skipped_empty
    if real_per_class is None:
        return release_records(split, num_classes, sample_rate, seed), rows
    chosen = sample_per_class(split, num_classes, real_per_class, seed)
    return [[e.text for e in chosen if e.label == c] for c in range(num_classes)], rows


def protected_split_id(cfg) -> str:
    """Public identity of the split a release reads (privacy/ledger.split_id)."""
    return split_id(cfg.dataset, cfg.dataset.train_split)


def inclusion_rule(cfg) -> str:
    """Which records of the split the release reads, in words (public: config only)."""
    carve = carve_fraction(cfg.dataset)
    return _inclusion_rule(cfg) + (f"; records carved into the evaluation split (sha256 < {carve}) never enter" if carve else "")


def _inclusion_rule(cfg) -> str:
    if cfg.real_per_class is not None:
        return f"random.sample of {cfg.real_per_class} per class (seed {cfg.seed}), dev hash bucket excluded"
    rate = float(cfg.privacy.sample_rate) if cfg.privacy.name == DP_NAME else 1.0
    if rate < 1:
        return f"each non-empty record outside the dev hash bucket, kept iff sha256(key={cfg.seed}, text) < {rate}"
    return "every non-empty record outside the dev hash bucket"


def _release_id(targets) -> str:
    """Hash of the released targets (public values): names this artifact in ledgers."""
    h = hashlib.sha256()
    for tc in targets:
        for t in tc:
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _non_private_privacy(split: str, records: str, name: str, note: str, **extra) -> dict:
    ledger = Ledger(0.0, [LedgerEntry(name=name, kind="non_private", split=split, records=records, note=note)])
    return {"mechanism": "none", "epsilon": math.inf, "delta": 0.0, **extra, "note": note, "ledger": ledger.to_dict()}


def make_release(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str, max_text_tokens: int, batch_size: int = 16,
                 match_loss: str = "full_vocab", split: str = "unknown", records: str = "") -> Release:
    """Non-private release: exact per-class mean gradients (ε = ∞)."""
    tg = class_target_gradients(model, task, matched, texts_by_class, batch_size, max_text_tokens, match_loss)
    privacy = _non_private_privacy(split, records, "release", "non-private: targets are exact means of real-example gradients")
    return Release(tg.grads, tg.names, list(task.label_names), [float(n) for n in tg.counts], fingerprint, privacy)


def _clipped_sums(model, task: Task, matched: MatchedParams, texts_by_class, clip_norm: float, max_text_tokens: int,
                  batch_size: int, method: str, match_loss: str, progress: bool = False):
    """Per class, the sum of per-example gradients clipped to clip_norm (what both the DP
    release and the noiseless clipped release start from), with the same loss as the plain means."""
    dev = next(model.parameters()).device
    bar = tqdm(total=sum(map(len, texts_by_class)), desc="release", unit="ex", disable=not progress)
    for c, texts in enumerate(texts_by_class):
        label, vocab = label_and_vocab(task, c, match_loss, dev)
        yield clipped_sum(model, task, matched, texts, label, clip_norm, max_text_tokens, batch_size, method, vocab,
                          on_chunk=bar.update)
    bar.close()


def make_clipped_release(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str, max_text_tokens: int,
                         clip_norm: float, batch_size: int = 16, match_loss: str = "full_vocab", split: str = "unknown",
                         records: str = "") -> Release:
    """Non-private release of clipped means: the DP release without its noise (ε = ∞).

    Separates what clipping does to the targets from what noise does. With a C below every
    per-example norm it weights examples equally: the plain mean is dominated by the examples
    the model gets most wrong (the verbalizer-loss gradient scales with 1 − p(label)), so for
    a class the model already favours it describes that class's atypical members."""
    targets = [[(t / len(texts)).to(p.dtype) for t, p in zip(cs.sums, matched.params)]
               for texts, cs in zip(texts_by_class, _clipped_sums(model, task, matched, texts_by_class, clip_norm, max_text_tokens,
                                                                 batch_size, "auto", match_loss))]
    privacy = _non_private_privacy(split, records, "release", "non-private: targets are means of real-example gradients clipped to "
                                   "clip_norm, no noise", clip_norm=clip_norm, match_loss=match_loss)
    return Release(targets, list(matched.names), list(task.label_names), [float(len(t)) for t in texts_by_class], fingerprint, privacy)


def _none_clip_norm(pcfg) -> float | None:
    """privacy=none's optional clip_norm, checked (one-line error) before any real data is read."""
    clip = pcfg.get("clip_norm") if hasattr(pcfg, "get") else getattr(pcfg, "clip_norm", None)
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.clip_norm={clip!r}: must be a finite number > 0, or null for unclipped means")
    return None if clip is None else float(clip)


# --------------------------------------------------------------------------- DP release
# One Gaussian mechanism on the joint vector of every class's clipped gradient sum; the exact
# guarantee, sensitivities and ledger format are in docs/privacy.md ("The release mechanism").
DP_NAME = "dp"


@dataclass
class DPDetails:
    """What a DP release added, for tests and diagnostics only: never saved, never returned
    by `make_dp_release` (the clipped sums are exactly what the noise hides)."""

    clipped_sums: list[list[torch.Tensor]]
    noise: list[list[torch.Tensor]]
    norms: list[torch.Tensor]
    sigma: float
    noise_multiplier: float
    sensitivity: float
    divisor: float


@functools.lru_cache(maxsize=64)
def _calibrate(epsilon: float, delta: float, accountant: str) -> float:
    return calibrate_noise_multiplier(epsilon, delta, 1, accountant)


def validate_dp_config(pcfg, real_per_class: int | None = None) -> None:
    """One-line ValueErrors for impossible settings, before any real data is read."""
    eps, delta, clip = pcfg.epsilon, pcfg.delta, pcfg.clip_norm
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"privacy.epsilon={eps!r}: must be a finite number > 0")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"privacy.delta={delta!r}: must be in (0, 1)")
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.clip_norm={clip!r}: must be a finite number > 0")
    if pcfg.accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={pcfg.accountant!r}: accepted {list(ACCOUNTANTS)}")
    if pcfg.adjacency not in ADJACENCIES:
        raise ValueError(f"privacy.adjacency={pcfg.adjacency!r}: accepted {list(ADJACENCIES)}")
    rate = pcfg.sample_rate
    if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
        raise ValueError(f"privacy.sample_rate={rate!r}: must be in (0, 1] (the share of records kept, each decided on its own)")
    div = pcfg.divisor
    if div is not None and not (isinstance(div, (int, float)) and math.isfinite(div) and div > 0):
        raise ValueError(f"privacy.divisor={div!r}: must be a finite number > 0, or null")
    if div is None and pcfg.adjacency == "add_remove":
        raise ValueError("privacy.adjacency=add_remove: the number of records is private under add/remove, so the divisor "
                         "of the released sums cannot come from it; set privacy.divisor (any public constant > 0)")
    if real_per_class is not None:
        raise ValueError(f"real_per_class={real_per_class}: privacy=dp releases from the whole private split "
                         "(real_per_class=null) or a record-by-record subsample (privacy.sample_rate=q); a fixed number per "
                         "class would make which records enter depend on the other records")


def public_divisor(pcfg, num_rows: int, num_classes: int) -> float:
    """The constant the noisy sums are divided by (scale only: the matching distance is a cosine).
    Under replace-one adjacency the number of rows is the same for every neighbour, so
    rows × sample_rate / classes is public; under add/remove it must come from the config."""
    if pcfg.divisor is not None:
        return float(pcfg.divisor)
    return max(1.0, num_rows * float(pcfg.sample_rate) / num_classes)


def make_dp_release_with_details(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str,
                                 max_text_tokens: int, pcfg, num_rows: int, split: str = "unknown", records: str = "", batch_size: int = 16,
                                 method: str = "auto", match_loss: str = "full_vocab", noise_multiplier: float | None = None,
                                 name: str = "release", progress: bool = False) -> tuple[Release, DPDetails]:
    """DP release: S_c = sum of clipped per-example gradients of class c, for every class at
    once; released T_c = (S_c + N(0, σ² I)) / D with σ = noise_multiplier × Δ (Δ = 2C
    replace-one, C add/remove, over the joint vector) and D a public constant.
    `noise_multiplier` given: a share of a budget split by the caller (the ledger composes it)."""
    validate_dp_config(pcfg)
    num_classes = task.num_classes
    if len(texts_by_class) != num_classes:
        raise ValueError(f"DP release: got texts for {len(texts_by_class)} classes, the task has {num_classes}")
    method = _check_method(method, matched)
    mult = noise_multiplier or _calibrate(float(pcfg.epsilon), float(pcfg.delta), pcfg.accountant)
    sens = sum_sensitivity(float(pcfg.clip_norm), pcfg.adjacency)
    sigma = mult * sens
    divisor = public_divisor(pcfg, num_rows, num_classes)
    sums = list(_clipped_sums(model, task, matched, texts_by_class, float(pcfg.clip_norm), max_text_tokens, batch_size, method,
                              match_loss, progress))
    flat = [t for cs in sums for t in cs.sums]
    noisy, noise_flat = add_noise(flat, sigma)  # one draw per coordinate of the joint vector
    k = len(matched.params)
    targets = [[(noisy[c * k + j] / divisor).to(p.dtype) for j, p in enumerate(matched.params)] for c in range(num_classes)]
    entry = LedgerEntry(name=name, kind="gaussian", split=split, records=records, noise_multiplier=mult, sensitivity=sens, sigma=sigma,
                        adjacency=pcfg.adjacency, release_id=_release_id(targets), noise_source=NOISE_SOURCE,
                        num_records=num_rows if pcfg.adjacency == "replace_one" else None)
    ledger = Ledger(float(pcfg.delta), [entry])
    warns = validate_budget(float(pcfg.epsilon), float(pcfg.delta), num_rows if pcfg.adjacency == "replace_one" else None)
    for w in warns:
        warnings.warn(f"privacy: {w}", stacklevel=2)
    ledger_dict = ledger.to_dict()  # composes once (the PLD accountant is the slow part)
    privacy = {
        "mechanism": "gaussian",
        "epsilon": ledger_dict["epsilon"],
        "delta": float(pcfg.delta),
        "unit": "one record (row) of the protected split",
        "adjacency": pcfg.adjacency,
        "clip_norm": float(pcfg.clip_norm),
        "sensitivity": sens,
        "noise_multiplier": mult,
        "sigma": sigma,
        "divisor": divisor,
        "sample_rate": float(pcfg.sample_rate),
        # the row count is the same for every replace-one neighbour, so it is public; under add/remove it is not
        "num_records": num_rows if pcfg.adjacency == "replace_one" else "withheld (private under add_remove)",
        "calibration_accountant": pcfg.accountant,
        "per_example_gradients": method,
        "match_loss": match_loss,
        "noise_source": NOISE_SOURCE,
        "warnings": warns,
        "ledger": ledger_dict,
    }
    rel = Release(targets, list(matched.names), list(task.label_names), [divisor] * num_classes, fingerprint, privacy)
    means_noise = [noise_flat[c * k:(c + 1) * k] for c in range(num_classes)]
    return rel, DPDetails([cs.sums for cs in sums], means_noise, [cs.norms for cs in sums], sigma, mult, sens, divisor)


def make_dp_release(*args, **kwargs) -> Release:
    """DP release (see make_dp_release_with_details); only the noisy targets leave this function."""
    return make_dp_release_with_details(*args, **kwargs)[0]


def build_release(cfg, model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str, num_rows: int) -> Release:
    """The configured release (privacy=none → exact or clipped means, privacy=dp → Gaussian mechanism)."""
    split, records = protected_split_id(cfg), inclusion_rule(cfg)
    mtt, bs = cfg.dataset.max_text_tokens, cfg.target_batch_size
    if cfg.privacy.name == DP_NAME:
        return make_dp_release(model, task, matched, texts_by_class, fingerprint, mtt, cfg.privacy, num_rows, split, records, bs,
                               match_loss=cfg.match_loss, progress=cfg.progress)
    clip = _none_clip_norm(cfg.privacy)
    if clip is not None:
        return make_clipped_release(model, task, matched, texts_by_class, fingerprint, mtt, clip, bs, cfg.match_loss, split, records)
    return make_release(model, task, matched, texts_by_class, fingerprint, mtt, bs, cfg.match_loss, split, records)


PROBE_DIR = "probe"


def split_multipliers(m_total: float, probe_share: float) -> tuple[float, float]:
    """Noise multipliers of the generator and probe releases that together spend exactly what
    one release with m_total would: Gaussian mechanisms compose as μ² = Σ μ_i² (Gaussian DP,
    exact), with μ = 1/m, so the probe gets μ² · share and the generator the rest."""
    if not 0 < probe_share < 1:
        raise ValueError(f"probe.budget_share={probe_share!r}: must be in (0, 1)")
    return m_total / math.sqrt(1.0 - probe_share), m_total / math.sqrt(probe_share)


def _check_probe(cfg) -> list[str]:
    specs = list(cfg.probe.matched_params)
    if specs and not 0 < cfg.probe.budget_share < 1:
        raise ValueError(f"probe.budget_share={cfg.probe.budget_share!r}: must be in (0, 1)")
    return specs


def build_joint_release(cfg, model, task: Task, matched: MatchedParams, probe: MatchedParams, texts_by_class,
                        fingerprints: tuple[str, str], num_rows: int) -> tuple[Release, Release]:
    """Generator and probe releases from the same records under one budget. Under DP each gets
    its share of one (ε, δ) (split_multipliers) and both carry the joint ledger, so the pool,
    the probe and a selection that uses both all report the same ε, at the same δ."""
    if cfg.privacy.name != DP_NAME:
        return tuple(build_release(cfg, model, task, mp.activate(), texts_by_class, fp, num_rows)
                     for mp, fp in ((matched, fingerprints[0]), (probe, fingerprints[1])))
    pcfg = cfg.privacy
    m_gen, m_probe = split_multipliers(_calibrate(float(pcfg.epsilon), float(pcfg.delta), pcfg.accountant),
                                       float(cfg.probe.budget_share))
    split, records = protected_split_id(cfg), inclusion_rule(cfg)
    rels = []
    for name, mp, fp, mult in (("release", matched, fingerprints[0], m_gen), ("probe", probe, fingerprints[1], m_probe)):
        mp.activate()
        rels.append(make_dp_release(model, task, mp, texts_by_class, fp, cfg.dataset.max_text_tokens, pcfg, num_rows, split,
                                    records, cfg.target_batch_size, match_loss=cfg.match_loss, noise_multiplier=mult,
                                    name=name, progress=cfg.progress))
    joint = Ledger(float(pcfg.delta), [e for r in rels for e in Ledger.from_dict(r.privacy["ledger"]).entries])
    joint_dict = joint.to_dict()
    for r in rels:
        r.privacy.update(epsilon=joint_dict["epsilon"], ledger=joint_dict, probe_budget_share=float(cfg.probe.budget_share))
    return rels[0], rels[1]


def check_release_privacy(rel: Release, pcfg) -> None:
    """With privacy=dp, refuse to reuse a release that is non-private, spends more ε than
    configured, or was made under another adjacency; with privacy=none, refuse a non-private
    release made with a different clip_norm."""
    if pcfg.name != DP_NAME:
        want, have = _none_clip_norm(pcfg), rel.privacy.get("clip_norm")
        if rel.privacy.get("mechanism") == "none" and want != (None if have is None else float(have)):
            raise ReleaseMismatch(f"privacy.clip_norm={want}: the non-private release to reuse was made with clip_norm={have}")
        return
    if rel.privacy.get("mechanism") != "gaussian":
        raise ReleaseMismatch("privacy=dp but the release to reuse is non-private (epsilon=inf); make a DP release first")
    if rel.epsilon > float(pcfg.epsilon) * (1 + 1e-6) or float(rel.privacy.get("delta", 1.0)) > float(pcfg.delta):
        raise ReleaseMismatch(f"privacy.epsilon={pcfg.epsilon} / delta={pcfg.delta}: the release to reuse spent "
                              f"epsilon={rel.epsilon:.4g}, delta={rel.privacy.get('delta')}")
    if rel.privacy.get("adjacency") != pcfg.adjacency:
        raise ReleaseMismatch(f"privacy.adjacency={pcfg.adjacency}: the release to reuse was made under "
                              f"adjacency={rel.privacy.get('adjacency')}, a different guarantee")


# Settings run_release does not read: a run dir's release is reused across them (a pipeline
# resumed with a larger num_per_class grows its pool from the same release).
NOT_READ_BY_RELEASE = frozenset({"matcher", "projector", "num_per_class", "batch_size", "selector", "pool", "finetuner", "train",
                                 "finetune", "shard", "release"})


def makes_dp_release(cfg, release_dir: Path) -> bool:
    """Whether obtaining the release will run the DP mechanism on private data (no release
    given, none finished in release_dir): the tracker must then not watch it."""
    return cfg.privacy.name == DP_NAME and not cfg.get("release") and not (Path(release_dir) / META_FILE).exists()


def release_artifact(cfg, release_dir) -> tuple[str, dict, dict] | None:
    """(name, files, metadata) of a finished release dir as a tracker artifact; None when it
    holds none. Everything in it is meant for publication: the noisy targets (exact means
    only under privacy=none) and their ledger."""
    from ..tracking import artifact_name

    d = Path(release_dir)
    if not (d / META_FILE).exists():
        return None
    privacy, meta = read_json(d / PRIVACY_FILE), read_json(d / META_FILE)
    return (artifact_name("release", cfg.dataset.name), {f: d / f for f in (RELEASE_FILE, META_FILE, PRIVACY_FILE)},
            {"epsilon": float(privacy.get("epsilon", math.inf)), "delta": float(privacy.get("delta", 0.0)),
             "mechanism": privacy.get("mechanism"), "fingerprint": meta.get("fingerprint"), "param_names": meta.get("param_names")})


def run_release(cfg, run_dir) -> dict:
    """gmtext-release: real data → run_dir/release (targets.pt, privacy.json, release.json).

    An existing complete release in run_dir is reused, never redone: a second noisy release
    of the same data would spend the privacy budget again."""
    import time

    from omegaconf import OmegaConf

    from ..artifacts import RESUME_FREE_KEYS, check_resume, record_config, run_lock
    from ..tracking import make_tracker
    from .generate import build_task, load_generator_model

    run_dir = Path(run_dir)
    out = run_dir / "release"
    if cfg.privacy.name == DP_NAME:
        validate_dp_config(cfg.privacy, cfg.real_per_class)
    config = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(run_dir, "release"):
        # the release in run_dir is reused: only under the settings it was made with
        check_resume(run_dir, "release", config, free=RESUME_FREE_KEYS | NOT_READ_BY_RELEASE)
        # before the model: a failed load or release ends the tracker's run as failed
        with make_tracker(cfg.logger, run_dir, "release", config, private=makes_dp_release(cfg, out)) as tracker:
            t0 = time.perf_counter()
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            torch.manual_seed(cfg.seed)
            lm = load_generator_model(cfg)
            task = build_task(cfg, lm.tokenizer)
            matched = MatchedParams(lm.model, expand_specs(cfg.matched_params, cfg.get("sketch")))
            t_load = time.perf_counter() - t0
            rel, reused = load_or_make_release(cfg, out, lm, task, matched)
            record_config(run_dir, "release", config)
            summary = {"release_dir": str(out), "reused": reused, "epsilon": rel.epsilon, "delta": rel.privacy.get("delta"),
                       "mechanism": rel.privacy.get("mechanism"), "sigma": rel.privacy.get("sigma"), "divisors": rel.divisors,
                       "num_params": sum(t.numel() for t in rel.targets[0]), "model_load_seconds": t_load}
            if (run_dir / PROBE_DIR / META_FILE).exists():
                summary["probe_dir"] = str(run_dir / PROBE_DIR)
            if rel.privacy.get("mechanism") == "none":  # a DP release's run time depends on the private records: not published
                summary["wall_seconds"] = time.perf_counter() - t0
            write_json(run_dir / "release_summary.json", summary)
            tracker.summary({k: v for k, v in summary.items() if k not in ("release_dir", "probe_dir")})
            tracker.commit()
            for d in (out, run_dir / PROBE_DIR):  # the probe release, made with it from the same budget
                if (art := release_artifact(cfg, d)) is not None:
                    tracker.log_artifact(art[0], "release", art[1], art[2])
    return summary


def load_or_make_release(cfg, release_dir: Path, lm, task: Task, matched: MatchedParams, existing: str | None = None,
                         edit_texts=None) -> tuple[Release, bool]:
    """The one way a stage obtains a release: load `existing` (a release dir given by the user)
    or a finished release in `release_dir`, checked against this config's fingerprint and
    privacy settings; otherwise read real data, build the configured release and save it
    into `release_dir`. Making it holds a lock on `release_dir`, so two stages started
    together on one run dir never both spend the budget: the second is refused.
    `edit_texts` (texts_by_class → texts_by_class) lets the canary audit plant its canaries
    into the private set. Returns (release, reused)."""
    fp = release_fingerprint(lm.fingerprint, cfg.dataset.name, task, matched.names, cfg.match_loss)

    def load(src) -> Release:
        rel = Release.load(src)
        rel.check(fp, matched.names)
        check_release_privacy(rel, cfg.privacy)
        return rel

    if existing:
        return load(existing), True
    if cfg.privacy.name == DP_NAME:  # fail on a bad budget before touching real data
        validate_dp_config(cfg.privacy, cfg.real_per_class)
    else:
        _none_clip_norm(cfg.privacy)
    _check_probe(cfg)
    release_dir = Path(release_dir)
    with run_lock(release_dir.parent, f"{release_dir.name}-making"):  # beside it: a failed start leaves no empty dir
        if (release_dir / META_FILE).exists():
            return load(release_dir), True
        check_fits_context(lm.model, "dataset.max_text_tokens", cfg.dataset.max_text_tokens, len(task.prefix_ids) + len(task.suffix_ids))
        rate = float(cfg.privacy.sample_rate) if cfg.privacy.name == DP_NAME else 1.0
        texts, num_rows = select_real_examples(cfg.dataset, task.num_classes, cfg.real_per_class, cfg.seed, rate)
        if edit_texts is not None:
            texts = edit_texts(texts)
        probe_specs = _check_probe(cfg)
        if not probe_specs:
            rel = build_release(cfg, lm.model, task, matched, texts, fp, num_rows)
        else:
            probe = MatchedParams(lm.model, expand_specs(probe_specs, cfg.get("sketch")))
            fp_probe = release_fingerprint(lm.fingerprint, cfg.dataset.name, task, probe.names, cfg.match_loss)
            rel, prel = build_joint_release(cfg, lm.model, task, matched, probe, texts, (fp, fp_probe), num_rows)
            matched.activate()
            prel.save(release_dir.parent / PROBE_DIR)  # before the generator's: its release.json marks both complete
        rel.save(release_dir)
    return rel, False
