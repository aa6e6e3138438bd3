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

from ..artifacts import read_json, save_torch, write_json
from ..data import Task, load_split, sample_per_class
from ..gradients import MatchedParams, class_target_gradients, label_and_vocab
from ..models import check_fits_context

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
    counts: list[int]  # examples per class behind each target (public by design: see docs/privacy.md)
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


def select_real_examples(ds_cfg, num_classes: int, real_per_class: int, seed: int):
    split = load_split(
        ds_cfg.train_split, ds_cfg.label_names, path=ds_cfg.path, hub_name=ds_cfg.hub_name,
        hub_config=ds_cfg.hub_config, text_field=ds_cfg.text_field, label_field=ds_cfg.label_field, builtin=ds_cfg.builtin,
    )
    chosen = sample_per_class(split, num_classes, real_per_class, seed)
    by_class = [[e.text for e in chosen if e.label == c] for c in range(num_classes)]
    return by_class, split.skipped_empty


def make_release(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str, max_text_tokens: int, batch_size: int = 16, match_loss: str = "full_vocab") -> Release:
    """Non-private release: exact per-class mean gradients (ε = ∞)."""
    tg = class_target_gradients(model, task, matched, texts_by_class, batch_size, max_text_tokens, match_loss)
    privacy = {"mechanism": "none", "epsilon": math.inf, "delta": 0.0, "note": "non-private: targets are exact means of real-example gradients"}
    return Release(tg.grads, tg.names, list(task.label_names), tg.counts, fingerprint, privacy)


def _clipped_sums(model, task: Task, matched: MatchedParams, texts_by_class, clip_norm: float, max_text_tokens: int,
                  batch_size: int, method: str, match_loss: str):
    """Per class, the sum of per-example gradients clipped to clip_norm (what both the DP
    release and the noiseless clipped release start from), with the same loss as the plain means."""
    from ..privacy.mechanism import clipped_sum

    dev = next(model.parameters()).device
    for c, texts in enumerate(texts_by_class):
        label, vocab = label_and_vocab(task, c, match_loss, dev)
        yield clipped_sum(model, task, matched, texts, label, clip_norm, max_text_tokens, batch_size, method, vocab)


def make_clipped_release(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str, max_text_tokens: int,
                         clip_norm: float, batch_size: int = 16, match_loss: str = "full_vocab") -> Release:
    """Non-private release of clipped means: the DP release without its noise (ε = ∞).

    Separates what clipping does to the targets from what noise does. With a C below every
    per-example norm it weights examples equally: the plain mean is dominated by the examples
    the model gets most wrong (the verbalizer-loss gradient scales with 1 − p(label)), so for
    a class the model already favours it describes that class's atypical members."""
    targets = [[(t / len(texts)).to(p.dtype) for t, p in zip(cs.sums, matched.params)]
               for texts, cs in zip(texts_by_class, _clipped_sums(model, task, matched, texts_by_class, clip_norm, max_text_tokens,
                                                                 batch_size, "auto", match_loss))]
    privacy = {"mechanism": "none", "epsilon": math.inf, "delta": 0.0, "clip_norm": clip_norm, "match_loss": match_loss,
               "note": "non-private: targets are means of real-example gradients clipped to clip_norm, no noise"}
    return Release(targets, list(matched.names), list(task.label_names), [len(t) for t in texts_by_class], fingerprint, privacy)


def _none_clip_norm(pcfg) -> float | None:
    """privacy=none's optional clip_norm, checked (one-line error) before any real data is read."""
    clip = pcfg.get("clip_norm") if hasattr(pcfg, "get") else getattr(pcfg, "clip_norm", None)
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.clip_norm={clip!r}: must be a finite number > 0, or null for unclipped means")
    return None if clip is None else float(clip)


# --------------------------------------------------------------------------- DP release
# (Gaussian mechanism with an accountant; see docs/privacy.md for the exact guarantee.)
DP_NAME = "dp"


@dataclass
class DPDetails:
    """What a DP release added, for tests and diagnostics only: never saved, never returned
    by `make_dp_release` (the clipped means are exactly what the noise hides)."""

    clipped_means: list[list[torch.Tensor]]
    noise: list[list[torch.Tensor]]
    norms: list[torch.Tensor]
    sigma: float
    noise_multiplier: float
    sensitivity: float


@functools.lru_cache(maxsize=64)
def _calibrate(epsilon: float, delta: float, k: int, accountant: str) -> float:
    from ..privacy.accountant import calibrate_noise_multiplier

    return calibrate_noise_multiplier(epsilon, delta, k, accountant)


def validate_dp_config(pcfg, real_per_class: int, num_classes: int) -> list[str]:
    """One-line ValueErrors for impossible settings; warnings (returned and emitted) for weak ones."""
    from ..privacy.accountant import ACCOUNTANTS, ADJACENCIES, validate_budget

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
    if real_per_class < 1:
        raise ValueError(f"real_per_class={real_per_class!r}: must be >= 1")
    warns = validate_budget(float(eps), float(delta), int(real_per_class) * int(num_classes))
    for w in warns:
        warnings.warn(f"privacy: {w}", stacklevel=2)
    return warns


def make_dp_release_with_details(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str,
                                 max_text_tokens: int, pcfg, real_per_class: int, batch_size: int = 16,
                                 method: str = "auto", match_loss: str = "full_vocab") -> tuple[Release, DPDetails]:
    """DP release: per class, clipped mean of per-example gradients + Gaussian noise, σ calibrated
    so that the composition of all `num_classes` releases is (ε, δ)-DP (see docs/privacy.md)."""
    from ..privacy.accountant import Mechanism, PrivacyLedger, sensitivity
    from ..privacy.mechanism import _check_method, noisy_mean, secure_generator

    num_classes = task.num_classes
    warns = validate_dp_config(pcfg, real_per_class, num_classes)
    if len(texts_by_class) != num_classes:
        raise ValueError(f"DP release: got texts for {len(texts_by_class)} classes, the task has {num_classes}")
    for c, texts in enumerate(texts_by_class):
        if len(texts) != real_per_class:  # the count is not revealed: n must be the public constant
            raise ValueError(f"DP release needs exactly real_per_class={real_per_class} examples of every class; class "
                             f"{task.label_names[c]!r} has a different number available (lower real_per_class; the count stays private)")
    method = _check_method(method, matched)
    mult = _calibrate(float(pcfg.epsilon), float(pcfg.delta), num_classes, pcfg.accountant)
    sens = sensitivity(float(pcfg.clip_norm), real_per_class, pcfg.adjacency)
    ledger = PrivacyLedger(float(pcfg.epsilon), float(pcfg.delta), pcfg.accountant, pcfg.adjacency)
    gen = secure_generator()  # never the experiment seed
    targets, means, noises, norms = [], [], [], []
    sums = _clipped_sums(model, task, matched, texts_by_class, float(pcfg.clip_norm), max_text_tokens, batch_size, method, match_loss)
    for c, cs in enumerate(sums):
        mech = Mechanism.gaussian(f"class_target:{task.label_names[c]}", float(pcfg.clip_norm), real_per_class, pcfg.adjacency, mult)
        noisy, mean, noise = noisy_mean(cs.sums, real_per_class, mech.sigma, gen)
        ledger.add(mech)
        targets.append([t.to(p.dtype) for t, p in zip(noisy, matched.params)])
        means.append(mean)
        noises.append(noise)
        norms.append(cs.norms)
    privacy = ledger.to_dict()
    privacy.update({
        "mechanism": "gaussian",
        "epsilon": ledger.composed_epsilon(),
        "delta": float(pcfg.delta),
        "accountant": pcfg.accountant,
        "adjacency": pcfg.adjacency,
        "noise_multiplier": mult,
        "sensitivity": sens,
        "sigma": mult * sens,
        "clip_norm": float(pcfg.clip_norm),
        "num_examples_per_class": real_per_class,
        "num_releases": num_classes,
        "per_example_gradients": method,
        "match_loss": match_loss,
        "noise_source": "torch.Generator seeded from os.urandom (64 bits), independent of the experiment seed",
        "warnings": warns,
    })
    rel = Release(targets, list(matched.names), list(task.label_names), [real_per_class] * num_classes, fingerprint, privacy)
    return rel, DPDetails(means, noises, norms, mult * sens, mult, sens)


def make_dp_release(model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str, max_text_tokens: int,
                    pcfg, real_per_class: int, batch_size: int = 16, method: str = "auto", match_loss: str = "full_vocab") -> Release:
    """DP release (see make_dp_release_with_details); only the noisy targets leave this function."""
    return make_dp_release_with_details(model, task, matched, texts_by_class, fingerprint, max_text_tokens, pcfg,
                                        real_per_class, batch_size, method, match_loss)[0]


def build_release(cfg, model, task: Task, matched: MatchedParams, texts_by_class, fingerprint: str) -> Release:
    """The configured release (privacy=none → exact means, privacy=dp → Gaussian mechanism)."""
    if cfg.privacy.name == DP_NAME:
        return make_dp_release(model, task, matched, texts_by_class, fingerprint, cfg.dataset.max_text_tokens,
                               cfg.privacy, cfg.real_per_class, cfg.target_batch_size, match_loss=cfg.match_loss)
    clip = _none_clip_norm(cfg.privacy)
    if clip is not None:
        return make_clipped_release(model, task, matched, texts_by_class, fingerprint, cfg.dataset.max_text_tokens, clip,
                                    cfg.target_batch_size, cfg.match_loss)
    return make_release(model, task, matched, texts_by_class, fingerprint, cfg.dataset.max_text_tokens, cfg.target_batch_size, cfg.match_loss)


def check_release_privacy(rel: Release, pcfg) -> None:
    """With privacy=dp, refuse to reuse a release that is non-private or spends more ε than configured;
    with privacy=none, refuse a non-private release made with a different clip_norm."""
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


def run_release(cfg, run_dir) -> dict:
    """gmtext-release: real data → run_dir/release (targets.pt, privacy.json, release.json).

    An existing complete release in run_dir is reused, never redone: a second noisy release
    of the same data would spend the privacy budget again."""
    import time

    from omegaconf import OmegaConf

    from ..artifacts import check_resume, record_config, run_lock
    from .generate import build_task, load_generator_model

    run_dir = Path(run_dir)
    out = run_dir / "release"
    if cfg.privacy.name == DP_NAME:
        validate_dp_config(cfg.privacy, cfg.real_per_class, len(cfg.dataset.label_names))
    config = OmegaConf.to_container(cfg, resolve=True)
    with run_lock(run_dir, "release"):
        check_resume(run_dir, "release", config)  # the release in run_dir is reused: only under the config it was made with
        t0 = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        lm = load_generator_model(cfg)
        task = build_task(cfg, lm.tokenizer)
        matched = MatchedParams(lm.model, list(cfg.matched_params))
        t_load = time.perf_counter() - t0
        rel, reused = load_or_make_release(cfg, out, lm, task, matched)
        record_config(run_dir, "release", config)
        wall = time.perf_counter() - t0
    summary = {"release_dir": str(out), "reused": reused, "epsilon": rel.epsilon, "delta": rel.privacy.get("delta"),
               "mechanism": rel.privacy.get("mechanism"), "sigma": rel.privacy.get("sigma"), "counts": rel.counts,
               "num_params": sum(t.numel() for t in rel.targets[0]), "model_load_seconds": t_load,
               "release_seconds": wall - t_load, "wall_seconds": wall}
    write_json(run_dir / "release_summary.json", summary)
    return summary


def load_or_make_release(cfg, release_dir: Path, lm, task: Task, matched: MatchedParams, existing: str | None = None,
                         edit_texts=None) -> tuple[Release, bool]:
    """The one way a stage obtains a release: load `existing` (a release dir given by the user)
    or a finished release in `release_dir`, checked against this config's fingerprint and
    privacy settings; otherwise read real data, build the configured release and save it
    into `release_dir`. `edit_texts` (texts_by_class → texts_by_class, same counts) lets the
    canary audit plant its canaries into the private set. Returns (release, reused)."""
    fp = release_fingerprint(lm.fingerprint, cfg.dataset.name, task, matched.names, cfg.match_loss)
    for src in (existing, release_dir if (Path(release_dir) / META_FILE).exists() else None):
        if src:
            rel = Release.load(src)
            rel.check(fp, matched.names)
            check_release_privacy(rel, cfg.privacy)
            return rel, True
    if cfg.privacy.name == DP_NAME:  # fail on a bad budget before touching real data
        validate_dp_config(cfg.privacy, cfg.real_per_class, task.num_classes)
    else:
        _none_clip_norm(cfg.privacy)
    check_fits_context(lm.model, "dataset.max_text_tokens", cfg.dataset.max_text_tokens, len(task.prefix_ids) + len(task.suffix_ids))
    texts, _ = select_real_examples(cfg.dataset, task.num_classes, cfg.real_per_class, cfg.seed)
    if edit_texts is not None:
        texts = edit_texts(texts)
    rel = build_release(cfg, lm.model, task, matched, texts, fp)
    rel.save(release_dir)
    return rel, False

