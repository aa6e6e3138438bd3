"""The release artifact and the privacy mechanisms that make it.

A `Release` carries per-class target gradients, counts and public metadata only: no text,
no lengths, no statistics of the real data beyond what its ledger accounts for. A privacy
mechanism (`privacy=<option>`, built from config by `_target_`) turns the texts of the
private split into one: `NoPrivacy` (exact or clipped means, ε = ∞) or `GaussianRelease`
(one Gaussian draw over every class's clipped sum, docs/privacy.md "The release mechanism").

Every mechanism has the same surface, so the release stage never branches on its name:
`name`, `sample_rate`, `publishes_wall_time`, `private`, `check_inclusion(real_per_class)`,
`release(...)`, `release_joint(...)` and `check_reuse(release)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..artifacts import read_json, save_torch, write_json
from ..config import PrivacyDPConfig, PrivacyNoneConfig
from ..data import Task
from ..gradients import MatchedParams, class_target_gradients, label_and_vocab
from .accountant import ADJACENCIES, calibrate_noise_multiplier, check_budget_args, sum_sensitivity, validate_budget
from .ledger import Ledger, LedgerEntry
from .mechanism import _all_sketch, _check_method, clipped_sum, clipped_sums_parts
from .noise import SOURCE as NOISE_SOURCE
from .noise import add_noise

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
            raise FileNotFoundError(
                f"release={str(out)!r}: no {META_FILE} there (not a release directory, or an unfinished one)"
            )
        meta = read_json(out / META_FILE)
        if "counts" in meta:  # releases written before the DP release divided by a public constant
            meta["divisors"] = [float(n) for n in meta.pop("counts")]
        targets = torch.load(out / RELEASE_FILE, map_location="cpu", weights_only=True)["targets"]
        return cls(targets=targets, privacy=read_json(out / PRIVACY_FILE), **meta)

    def check(self, fingerprint: str, names: list[str]) -> None:
        if fingerprint != self.fingerprint:
            raise ReleaseMismatch(
                f"release fingerprint {self.fingerprint} does not match this config ({fingerprint}): "
                "it was made for another model, dataset, template, verbalizers or matched parameters"
            )
        if names != self.param_names:
            raise ReleaseMismatch(
                f"release holds gradients for {self.param_names[:3]}..., this config matches {names[:3]}..."
            )

    @property
    def epsilon(self) -> float:
        return float(self.privacy.get("epsilon", math.inf))


def release_fingerprint(
    model_fingerprint: str, dataset_name: str, task: Task, matched_names: list[str], match_loss: str = "full_vocab"
) -> str:
    """What the targets depend on, public parts only: reusing a release with a different
    model/template/verbalizer/parameter set would match the wrong thing."""
    key = json.dumps(
        [
            model_fingerprint,
            dataset_name,
            task.template,
            task.label_names,
            task.label_token_ids,
            task.prefix_ids,
            task.suffix_ids,
            matched_names,
        ]
        + ([match_loss] if match_loss != "full_vocab" else [])
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class ReleaseInputs:
    """What every mechanism reads besides the texts: public settings and the protected split's
    identity (the ledger names it), gathered once by the caller."""

    fingerprint: str
    max_text_tokens: int
    num_rows: int  # rows of the protected split (public under replace-one)
    batch_size: int = 16
    match_loss: str = "full_vocab"
    split: str = "unknown"
    records: str = ""
    progress: bool = False
    precision: str = "float32"  # of the per-example gradient passes (sketch.PRECISIONS)


def _release_id(targets) -> str:
    """Hash of the released targets (public values): names this artifact in ledgers."""
    h = hashlib.sha256()
    for tc in targets:
        for t in tc:
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _clipped_sums(
    model,
    task: Task,
    matched: MatchedParams,
    texts_by_class,
    clip_norm: float,
    max_text_tokens: int,
    batch_size: int,
    method: str,
    match_loss: str,
    progress: bool = False,
    precision: str = "float32",
):
    """Per class, the sum of per-example gradients clipped to clip_norm (what both the DP
    release and the noiseless clipped release start from), with the same loss as the plain means."""
    dev = next(model.parameters()).device
    bar = tqdm(total=sum(map(len, texts_by_class)), desc="release", unit="ex", disable=not progress)
    for c, texts in enumerate(texts_by_class):
        label, vocab = label_and_vocab(task, c, match_loss, dev)
        yield clipped_sum(
            model,
            task,
            matched,
            texts,
            label,
            clip_norm,
            max_text_tokens,
            batch_size,
            method,
            vocab,
            on_chunk=bar.update,
            precision=precision,
        )
    bar.close()


def _clipped_sums_parts(
    model,
    task: Task,
    parts: list[MatchedParams],
    texts_by_class,
    clip_norm: float,
    max_text_tokens: int,
    batch_size: int,
    match_loss: str,
    progress: bool = False,
    precision: str = "float32",
):
    """`_clipped_sums` of several parameter sets from one pass over the records when every set is
    sketched (mechanism.clipped_sums_parts); None when they are not (the caller makes one pass
    per set). Returns [part][class] ClippedSums."""
    if not all(_all_sketch(mp) for mp in parts):
        return None
    dev = next(model.parameters()).device
    bar = tqdm(
        total=sum(map(len, texts_by_class)), desc="release (one pass, all parts)", unit="ex", disable=not progress
    )
    by_class = []
    for c, texts in enumerate(texts_by_class):
        label, vocab = label_and_vocab(task, c, match_loss, dev)
        by_class.append(
            clipped_sums_parts(
                model,
                task,
                parts,
                texts,
                label,
                clip_norm,
                max_text_tokens,
                batch_size,
                vocab,
                on_chunk=bar.update,
                precision=precision,
            )
        )
    bar.close()
    return [[cs[j] for cs in by_class] for j in range(len(parts))]


# --------------------------------------------------------------------------- privacy=none
def _non_private_privacy(split: str, records: str, name: str, note: str, **extra) -> dict:
    ledger = Ledger(0.0, [LedgerEntry(name=name, kind="non_private", split=split, records=records, note=note)])
    return {"mechanism": "none", "epsilon": math.inf, "delta": 0.0, **extra, "note": note, "ledger": ledger.to_dict()}


class NoPrivacy:
    """Non-private release (ε = ∞): exact per-class mean gradients, or with `clip_norm` the
    means of clipped per-example gradients (the DP release without its noise)."""

    name = "none"
    sample_rate = 1.0  # every record of the split enters
    publishes_wall_time = True  # nothing private to hide in the run time
    private = False  # a run making this release may be tracked like any other

    def __init__(self, clip_norm: Optional[float] = PrivacyNoneConfig.clip_norm):
        if clip_norm is not None and not (
            isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0
        ):
            raise ValueError(
                f"privacy.clip_norm={clip_norm!r}: must be a finite number > 0, or null for unclipped means"
            )
        self.clip_norm = None if clip_norm is None else float(clip_norm)

    def check_inclusion(self, real_per_class: int | None) -> None:
        """Any inclusion rule is fine without a guarantee to keep."""

    def release(
        self,
        model,
        task: Task,
        matched: MatchedParams,
        texts_by_class,
        inp: ReleaseInputs,
        name: str = "release",
        sums=None,
    ) -> Release:
        """`sums`: this set's per-class ClippedSums when the caller computed them (release_joint)."""
        if self.clip_norm is None:
            if inp.precision != "float32":
                raise ValueError(
                    f"target_precision={inp.precision!r} applies to the clipped per-example passes; with "
                    "privacy.clip_norm=null the exact means run in float32 only (set target_precision=float32)"
                )
            tg = class_target_gradients(
                model, task, matched, texts_by_class, inp.batch_size, inp.max_text_tokens, inp.match_loss
            )
            privacy = _non_private_privacy(
                inp.split, inp.records, name, "non-private: targets are exact means of real-example gradients"
            )
            return Release(
                tg.grads, tg.names, list(task.label_names), [float(n) for n in tg.counts], inp.fingerprint, privacy
            )
        # With a C below every per-example norm the clipped mean weights examples equally: the plain
        # mean is dominated by the examples the model gets most wrong (the verbalizer-loss gradient
        # scales with 1 − p(label)), so for a class the model favours it describes its atypical members.
        sums = sums or _clipped_sums(
            model,
            task,
            matched,
            texts_by_class,
            self.clip_norm,
            inp.max_text_tokens,
            inp.batch_size,
            "auto",
            inp.match_loss,
            inp.progress,
            inp.precision,
        )
        targets = [
            [(t / len(texts)).to(p.dtype) for t, p in zip(cs.sums, matched.params)]
            for texts, cs in zip(texts_by_class, sums)
        ]
        privacy = _non_private_privacy(
            inp.split,
            inp.records,
            name,
            "non-private: targets are means of real-example gradients clipped to clip_norm, no noise",
            clip_norm=self.clip_norm,
            match_loss=inp.match_loss,
        )
        return Release(
            targets,
            list(matched.names),
            list(task.label_names),
            [float(len(t)) for t in texts_by_class],
            inp.fingerprint,
            privacy,
        )

    def release_joint(
        self, model, task: Task, parts, texts_by_class, inp: ReleaseInputs, probe_share: float
    ) -> list[Release]:
        """One release per (matched params, fingerprint) in `parts`, from the same records (one pass
        over them when every part is sketched and clipped)."""
        pre = None
        if self.clip_norm is not None:
            pre = _clipped_sums_parts(
                model,
                task,
                [mp for mp, _ in parts],
                texts_by_class,
                self.clip_norm,
                inp.max_text_tokens,
                inp.batch_size,
                inp.match_loss,
                inp.progress,
                inp.precision,
            )
        pre = pre or [None] * len(parts)
        return [
            self.release(
                model,
                task,
                mp.activate(),
                texts_by_class,
                ReleaseInputs(**{**asdict(inp), "fingerprint": fp}),
                sums=sums,
            )
            for (mp, fp), sums in zip(parts, pre)
        ]

    def check_reuse(self, rel: Release) -> None:
        """Refuse a non-private release made with a different clip_norm."""
        have = rel.privacy.get("clip_norm")
        if rel.privacy.get("mechanism") == "none" and self.clip_norm != (None if have is None else float(have)):
            raise ReleaseMismatch(
                f"privacy.clip_norm={self.clip_norm}: the non-private release to reuse was made with clip_norm={have}"
            )


# --------------------------------------------------------------------------- privacy=dp
@dataclass
class DPDetails:
    """What a DP release added, for tests and diagnostics only: never saved, never returned
    by `GaussianRelease.release` (the clipped sums are exactly what the noise hides)."""

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


@functools.lru_cache(maxsize=64)
def _planned_epsilon(mults: tuple[float, ...], adjacency: str, delta: float) -> float:
    """The ledger's ε of Gaussian releases with these multipliers (a PLD composition, about a
    second: cached like _calibrate, since every release of one budget plans the same ones)."""
    entries = [
        LedgerEntry(f"planned_{i}", "gaussian", "", "", noise_multiplier=m, adjacency=adjacency)
        for i, m in enumerate(mults)
    ]
    return Ledger(delta, entries).epsilon()


def split_multipliers(m_total: float, probe_share: float) -> tuple[float, float]:
    """Noise multipliers of the generator and probe releases that together spend exactly what
    one release with m_total would: Gaussian mechanisms compose as μ² = Σ μ_i² (Gaussian DP,
    exact), with μ = 1/m, so the probe gets μ² · share and the generator the rest."""
    if not 0 < probe_share < 1:
        raise ValueError(f"probe.budget_share={probe_share!r}: must be in (0, 1)")
    return m_total / math.sqrt(1.0 - probe_share), m_total / math.sqrt(probe_share)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


class GaussianRelease:
    """DP release: S_c = sum of clipped per-example gradients of class c, for every class at
    once; released T_c = (S_c + N(0, σ² I)) / D with σ = noise_multiplier × Δ (Δ = 2C
    replace-one, C add/remove, over the joint vector) and D a public constant."""

    name = "dp"
    publishes_wall_time = False  # the run time depends on the private records
    private = True  # a run making this release is not watched by a tracker (no console or system metrics)

    def __init__(
        self,
        epsilon: float = PrivacyDPConfig.epsilon,
        delta: float = PrivacyDPConfig.delta,
        clip_norm: float = PrivacyDPConfig.clip_norm,
        accountant: str = PrivacyDPConfig.accountant,
        adjacency: str = PrivacyDPConfig.adjacency,
        sample_rate: float = PrivacyDPConfig.sample_rate,
        divisor: Optional[float] = PrivacyDPConfig.divisor,
    ):
        # one-line errors for impossible settings, before any real data is read
        check_budget_args("privacy", epsilon, delta, accountant)
        if not _finite_positive(clip_norm):
            raise ValueError(f"privacy.clip_norm={clip_norm!r}: must be a finite number > 0")
        if adjacency not in ADJACENCIES:
            raise ValueError(f"privacy.adjacency={adjacency!r}: accepted {list(ADJACENCIES)}")
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(
                f"privacy.sample_rate={sample_rate!r}: must be in (0, 1] "
                "(the share of records kept, each decided on its own)"
            )
        if divisor is not None and not _finite_positive(divisor):
            raise ValueError(f"privacy.divisor={divisor!r}: must be a finite number > 0, or null")
        if divisor is None and adjacency == "add_remove":
            raise ValueError(
                "privacy.adjacency=add_remove: the number of records is private under add/remove, so the divisor "
                "of the released sums cannot come from it; set privacy.divisor (any public constant > 0)"
            )
        self.epsilon, self.delta, self.clip_norm = float(epsilon), float(delta), float(clip_norm)
        self.accountant, self.adjacency = str(accountant), str(adjacency)
        self.sample_rate, self.divisor = float(sample_rate), None if divisor is None else float(divisor)

    def check_inclusion(self, real_per_class: int | None) -> None:
        if real_per_class is not None:
            raise ValueError(
                f"real_per_class={real_per_class}: privacy=dp releases from the whole private split "
                "(real_per_class=null) or a record-by-record subsample (privacy.sample_rate=q); a fixed number per "
                "class would make which records enter depend on the other records"
            )

    @property
    def noise_multiplier(self) -> float:
        """The multiplier of one Gaussian spending (ε, δ) under the calibration accountant."""
        return _calibrate(self.epsilon, self.delta, self.accountant)

    def public_divisor(self, num_rows: int, num_classes: int) -> float:
        """The constant the noisy sums are divided by (scale only: the matching distance is a cosine).
        Under replace-one adjacency the number of rows is the same for every neighbour, so
        rows × sample_rate / classes is public; under add/remove it must come from the config."""
        if self.divisor is not None:
            return self.divisor
        return max(1.0, num_rows * self.sample_rate / num_classes)

    def release(
        self, model, task: Task, matched: MatchedParams, texts_by_class, inp: ReleaseInputs, name: str = "release"
    ) -> Release:
        return self.release_with_details(model, task, matched, texts_by_class, inp, name=name)[0]

    def release_with_details(
        self,
        model,
        task: Task,
        matched: MatchedParams,
        texts_by_class,
        inp: ReleaseInputs,
        *,
        name: str = "release",
        method: str = "auto",
        noise_multiplier: float | None = None,
        sums=None,
    ) -> tuple[Release, DPDetails]:
        """The release and what it added (tests only). `noise_multiplier` given: a share of a
        budget split by the caller (the ledger composes it); `sums`: this set's per-class
        ClippedSums when the caller computed them (release_joint's one pass)."""
        num_classes = task.num_classes
        if len(texts_by_class) != num_classes:
            raise ValueError(f"DP release: got texts for {len(texts_by_class)} classes, the task has {num_classes}")
        method = _check_method(method, matched)
        if noise_multiplier is None:
            self.check_spend([self.noise_multiplier])
        mult = noise_multiplier or self.noise_multiplier
        sens = sum_sensitivity(self.clip_norm, self.adjacency)
        sigma = mult * sens
        divisor = self.public_divisor(inp.num_rows, num_classes)
        sums = sums or list(
            _clipped_sums(
                model,
                task,
                matched,
                texts_by_class,
                self.clip_norm,
                inp.max_text_tokens,
                inp.batch_size,
                method,
                inp.match_loss,
                inp.progress,
                inp.precision,
            )
        )
        flat = [t for cs in sums for t in cs.sums]
        noisy, noise_flat = add_noise(flat, sigma)  # one draw per coordinate of the joint vector
        k = len(matched.params)
        targets = [
            [(noisy[c * k + j] / divisor).to(p.dtype) for j, p in enumerate(matched.params)] for c in range(num_classes)
        ]
        # the row count is the same for every replace-one neighbour, so it is public; under add/remove it is not
        public_rows = inp.num_rows if self.adjacency == "replace_one" else None
        entry = LedgerEntry(
            name=name,
            kind="gaussian",
            split=inp.split,
            records=inp.records,
            noise_multiplier=mult,
            sensitivity=sens,
            sigma=sigma,
            adjacency=self.adjacency,
            release_id=_release_id(targets),
            noise_source=NOISE_SOURCE,
            num_records=public_rows,
        )
        warns = validate_budget(self.epsilon, self.delta, public_rows)
        for w in warns:
            warnings.warn(f"privacy: {w}", stacklevel=2)
        ledger_dict = Ledger(self.delta, [entry]).to_dict()  # composes once (the PLD accountant is the slow part)
        privacy = {
            "mechanism": "gaussian",
            "epsilon": ledger_dict["epsilon"],
            "delta": self.delta,
            "unit": "one record (row) of the protected split",
            "adjacency": self.adjacency,
            "clip_norm": self.clip_norm,
            "sensitivity": sens,
            "noise_multiplier": mult,
            "sigma": sigma,
            "divisor": divisor,
            "sample_rate": self.sample_rate,
            "num_records": public_rows if public_rows is not None else "withheld (private under add_remove)",
            "calibration_accountant": self.accountant,
            "per_example_gradients": method,
            # absent: float32 (every release made before the key existed)
            **({"gradient_precision": inp.precision} if inp.precision != "float32" else {}),
            "match_loss": inp.match_loss,
            "noise_source": NOISE_SOURCE,
            "warnings": warns,
            "ledger": ledger_dict,
        }
        rel = Release(
            targets, list(matched.names), list(task.label_names), [divisor] * num_classes, inp.fingerprint, privacy
        )
        means_noise = [noise_flat[c * k : (c + 1) * k] for c in range(num_classes)]
        return rel, DPDetails(
            [cs.sums for cs in sums], means_noise, [cs.norms for cs in sums], sigma, mult, sens, divisor
        )

    def release_joint(
        self, model, task: Task, parts, texts_by_class, inp: ReleaseInputs, probe_share: float
    ) -> list[Release]:
        """Generator and probe releases ((matched params, fingerprint) in `parts`) from the same
        records under one budget: each gets its share of one (ε, δ) (split_multipliers) and both
        carry the joint ledger, so the pool, the probe and a selection that uses both all report
        the same ε, at the same δ."""
        mults = split_multipliers(self.noise_multiplier, probe_share)
        self.check_spend(list(mults))
        pre = _clipped_sums_parts(
            model,
            task,
            [mp for mp, _ in parts],
            texts_by_class,
            self.clip_norm,
            inp.max_text_tokens,
            inp.batch_size,
            inp.match_loss,
            inp.progress,
            inp.precision,
        ) or [None] * len(parts)
        rels = []
        for name, (mp, fp), mult, sums in zip(("release", "probe"), parts, mults, pre):
            mp.activate()
            rels.append(
                self.release_with_details(
                    model,
                    task,
                    mp,
                    texts_by_class,
                    ReleaseInputs(**{**asdict(inp), "fingerprint": fp}),
                    name=name,
                    noise_multiplier=mult,
                    sums=sums,
                )[0]
            )
        joint = Ledger(self.delta, [e for r in rels for e in Ledger.from_dict(r.privacy["ledger"]).entries]).to_dict()
        for r in rels:
            r.privacy.update(epsilon=joint["epsilon"], ledger=joint, probe_budget_share=float(probe_share))
        return rels

    def check_spend(self, mults: list[float]) -> None:
        """Before any record is read: the ledger (dp_accounting's PLD, the accountant every
        artifact reports) composes the planned Gaussians to at most the configured ε. The
        multiplier comes from another accountant (the analytic curve), so this is the check
        that the two agree, not a formality."""
        spent = _planned_epsilon(tuple(mults), self.adjacency, self.delta)
        if spent > self.epsilon * (1 + 1e-6):
            raise RuntimeError(
                f"privacy: noise multipliers {[round(m, 4) for m in mults]} compose to epsilon={spent:.6g} under the "
                f"ledger's accountant, over privacy.epsilon={self.epsilon:g}; set privacy.accountant to another "
                "calibration accountant"
            )

    def check_reuse(self, rel: Release) -> None:
        """Refuse to reuse a release that is non-private, spends more ε than configured, or was
        made under another adjacency."""
        if rel.privacy.get("mechanism") != "gaussian":
            raise ReleaseMismatch(
                "privacy=dp but the release to reuse is non-private (epsilon=inf); make a DP release first"
            )
        if rel.epsilon > self.epsilon * (1 + 1e-6) or float(rel.privacy.get("delta", 1.0)) > self.delta:
            raise ReleaseMismatch(
                f"privacy.epsilon={self.epsilon:g} / delta={self.delta:g}: the release to reuse spent "
                f"epsilon={rel.epsilon:.4g}, delta={rel.privacy.get('delta')}"
            )
        if rel.privacy.get("adjacency") != self.adjacency:
            raise ReleaseMismatch(
                f"privacy.adjacency={self.adjacency}: the release to reuse was made under "
                f"adjacency={rel.privacy.get('adjacency')}, a different guarantee"
            )
