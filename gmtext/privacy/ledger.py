"""The privacy ledger: every use of a protected split, composed by one accountant.

An artifact (a release, a synthetic pool, a selected set, a fine-tuned model's metrics)
carries the ledger of everything it depends on. Each entry is one mechanism applied to one
protected split:

* ``gaussian``: a full-batch Gaussian mechanism (the release), ``count`` times;
* ``subsampled_gaussian``: Poisson-subsampled Gaussian steps (DP-SGD);
* ``non_private``: a use without noise (a real dev set, real training examples): ε = ∞.

Composition is by Google's ``dp_accounting`` privacy-loss distributions (PLDs), sequentially
over *all* entries, whatever split they name: conservative when two entries protect different
data, and exactly right when one person can appear in both.

One ledger states one neighbouring relation (``Ledger.relation``): replace-one as soon as any
entry was made under it (GRADMM's and PE's default), else add/remove (opacus' DP-SGD). Each
entry's ``noise_multiplier`` is σ over its sensitivity under its *own* adjacency. An add/remove
entry read under replace-one is converted, not relabelled: replacing a record is removing it and
adding another, so its output moves up to twice as far; for Poisson-subsampled steps the PLD of
the subsampled Gaussian under substitution is used (``pld``). A replace-one entry has no
add/remove reading (its divisor is the public row count, which add/remove changes), so a
ledger holding one reports replace-one. ``epsilon_replace_one`` in ``to_dict`` puts every
artifact, DP-SGD included, on the same relation, so their ε compare.

Merging two ledgers (a pool and the probe that scored it) concatenates their entries and adds
their δ: the result is the ε of the joint composition at δ1 + δ2, never more than ε1 + ε2
(basic composition) and usually much less.

The protected split is named by its public identity (``split_id``: dataset name, where the
file lives, which split, which inclusion rule), never by a hash of its content: a content hash
is a deterministic function of the private records and would itself be an un-noised release.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

KINDS = ("gaussian", "subsampled_gaussian", "non_private")
ADJACENCIES = ("replace_one", "add_remove")  # the neighbour relations (privacy.accountant re-exports them)
ACCOUNTANT = "dp_accounting.pld (privacy-loss distributions)"
PLD_INTERVAL = 1e-4  # the PLD's value discretisation: PLDAccountant's default


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism over one protected split. `noise_multiplier` = σ / sensitivity."""

    name: str
    kind: str
    split: str  # split_id of the protected split
    records: str = ""  # which of its records the mechanism read (the inclusion rule, public)
    num_records: int | None = None  # rows of the split, where public (replace-one: the same for every neighbour)
    noise_source: str | None = None
    noise_multiplier: float | None = None
    sensitivity: float | None = None
    sigma: float | None = None
    count: int = 1
    sample_rate: float = 1.0
    adjacency: str | None = None
    release_id: str | None = None  # hash of the released (noisy) targets: public, identifies the artifact
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ledger entry {self.name!r}: kind={self.kind!r}; accepted: {KINDS}")
        if not (isinstance(self.count, int) and self.count >= 1):
            raise ValueError(f"ledger entry {self.name!r}: count={self.count!r} must be an integer >= 1")
        if self.kind == "non_private":
            return
        m = self.noise_multiplier
        if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
            raise ValueError(f"ledger entry {self.name!r}: noise_multiplier={m!r} must be a finite number > 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"ledger entry {self.name!r}: sample_rate={self.sample_rate!r} must be in (0, 1]")
        if self.adjacency not in (None, *ADJACENCIES):
            raise ValueError(f"ledger entry {self.name!r}: adjacency={self.adjacency!r}; accepted: {ADJACENCIES}")
        if self.kind == "subsampled_gaussian" and self.adjacency == "replace_one":
            raise ValueError(
                f"ledger entry {self.name!r}: a subsampled entry states its multiplier under add_remove "
                "(σ / per-record clip); the ledger converts it to replace_one"
            )
        if self.kind == "gaussian" and self.sample_rate != 1.0:
            raise ValueError(f"ledger entry {self.name!r}: a full-batch gaussian entry has sample_rate 1")
        if (
            self.sigma is not None
            and self.sensitivity is not None
            and not math.isclose(self.sigma, m * self.sensitivity, rel_tol=1e-9)
        ):
            raise ValueError(
                f"ledger entry {self.name!r}: sigma={self.sigma!r} "
                f"!= noise_multiplier*sensitivity={m * self.sensitivity!r}"
            )

    def pld(self, relation: str):
        """This entry's PLD under `relation`, composed `count` times. Under its own adjacency
        (or an unstated one: records made before the field) the multiplier is already σ over
        the full distance between neighbouring outputs. An add/remove entry under replace_one
        uses dp_accounting's substitution PLD, shifts ±sensitivity (distance 2 × sensitivity),
        for full-batch and Poisson-subsampled Gaussians alike."""
        from dp_accounting import NeighboringRelation
        from dp_accounting.pld import privacy_loss_distribution as pld

        if self.adjacency == "replace_one" and relation == "add_remove":
            raise ValueError(f"ledger entry {self.name!r} was made under replace_one: it has no add_remove epsilon")
        convert = relation == "replace_one" and self.adjacency == "add_remove"
        m, q = float(self.noise_multiplier), float(self.sample_rate)
        full = q == 1.0  # k full-batch Gaussians are exactly one with m / sqrt(k) (as PLDAccountant does)
        out = pld.from_gaussian_mechanism(
            m / math.sqrt(self.count) if full else m,
            sampling_prob=q,
            value_discretization_interval=PLD_INTERVAL,
            neighboring_relation=NeighboringRelation.REPLACE_ONE if convert else NeighboringRelation.ADD_OR_REMOVE_ONE,
        )
        return out if full else out.self_compose(self.count)


@dataclass
class Ledger:
    """Entries plus the δ (and the neighbouring relation) their composition is reported at."""

    delta: float = 0.0
    entries: list[LedgerEntry] = field(default_factory=list)
    adjacency: str | None = None  # the relation ε is stated under; None: inferred from the entries (`relation`)

    def __post_init__(self) -> None:
        if self.adjacency not in (None, *ADJACENCIES):
            raise ValueError(f"ledger adjacency={self.adjacency!r}; accepted: {ADJACENCIES}")

    @property
    def relation(self) -> str:
        """replace_one when stated, or when any entry was made under it; else add_remove."""
        if self.adjacency == "replace_one" or any(e.adjacency == "replace_one" for e in self.entries):
            return "replace_one"
        return "add_remove"

    def add(self, entry: LedgerEntry) -> "Ledger":
        self.entries.append(entry)
        return self

    @property
    def private(self) -> bool:
        return not any(e.kind == "non_private" for e in self.entries)

    def epsilon(self, relation: str | None = None) -> float:
        """ε of the composition of every entry at this ledger's δ, under `relation` (default:
        the ledger's own); 0 with no entry, ∞ with a non-private one or δ = 0."""
        relation = relation or self.relation
        if relation not in ADJACENCIES:
            raise ValueError(f"relation={relation!r}; accepted: {ADJACENCIES}")
        if not self.entries:
            return 0.0
        if not self.private or not self.delta > 0:
            return math.inf
        from dp_accounting.pld import privacy_loss_distribution as pld

        total = pld.identity(value_discretization_interval=PLD_INTERVAL)  # as PLDAccountant composes
        for e in self.entries:
            total = total.compose(e.pld(relation))
        return float(total.get_epsilon_for_delta(self.delta))

    def merged(self, other: "Ledger") -> "Ledger":
        """Both ledgers' entries at δ1 + δ2. An entry for the same release artifact
        (`release_id`) reached through both is kept once: re-reading a release is
        post-processing, not a second use of the data."""
        ids = {e.release_id for e in self.entries if e.release_id}
        extra = [e for e in other.entries if not (e.release_id and e.release_id in ids)]
        stated = {self.adjacency, other.adjacency} - {None}
        adjacency = None
        if stated:  # a stated relation survives the merge; replace_one wins (the other has no add_remove reading)
            adjacency = "replace_one" if "replace_one" in stated | {self.relation, other.relation} else "add_remove"
        if not extra:
            return Ledger(max(self.delta, other.delta) if self.entries else other.delta, list(self.entries), adjacency)
        return Ledger(self.delta + other.delta, self.entries + extra, adjacency)

    def splits(self) -> list[str]:
        return sorted({e.split for e in self.entries})

    def to_dict(self) -> dict[str, Any]:
        eps = self.epsilon()
        out = {
            "epsilon": eps,
            "delta": self.delta,
            "adjacency": self.relation,
        }
        if self.relation == "add_remove":  # the same promise as a replace-one artifact's ε, for comparison
            out["epsilon_replace_one"] = self.epsilon("replace_one") if math.isfinite(eps) and eps > 0 else eps
        return {
            **out,
            "accountant": ACCOUNTANT if self.private and self.entries else None,
            "composition": "sequential over all entries",
            "protected_splits": self.splits(),
            "entries": [{k: v for k, v in asdict(e).items() if v not in (None, "")} for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Ledger":
        if not d:
            return cls()
        led = cls(float(d.get("delta", 0.0)), [LedgerEntry(**e) for e in d.get("entries", [])])
        if d.get("adjacency") and d["adjacency"] != led.relation:  # stated, not inferred: keep it
            led.adjacency = d["adjacency"]
        return led


def merge_all(ledgers: Iterable[Ledger]) -> Ledger:
    out = Ledger()
    for led in ledgers:
        out = out.merged(led)
    return out


def split_id(ds_cfg, split: str) -> str:
    """Public identity of a protected split: '<dataset>/<split>@<where>#<hash>'. Every use of
    the same file and split gets the same id, so a ledger shows when two mechanisms read the
    same records. Built from config only, never from the records."""
    if getattr(ds_cfg, "path", None):
        where = str(Path(ds_cfg.path).expanduser().resolve())
    elif getattr(ds_cfg, "builtin", None):
        where = f"builtin:{ds_cfg.builtin}"
    else:
        where = f"hub:{ds_cfg.hub_name}/{ds_cfg.hub_config or ''}"
    key = json.dumps([ds_cfg.name, where, split, ds_cfg.text_field, ds_cfg.label_field, list(ds_cfg.label_names)])
    return f"{ds_cfg.name}/{split}@{where}#{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ledger_of(privacy: dict | None) -> Ledger | None:
    """The ledger inside a privacy record (privacy.json, generate.json["privacy"], select.json
    ["privacy"], metrics.json["privacy"]); None for records written before ledgers existed."""
    if not privacy:
        return None
    if "entries" in privacy:
        return Ledger.from_dict(privacy)
    if isinstance(privacy.get("ledger"), dict):
        return Ledger.from_dict(privacy["ledger"])
    return None


def compose_records(parts: list[dict]) -> dict:
    """Privacy of an artifact built from several parts, each {"epsilon", "delta", "ledger"}:
    the merged ledger when every part has one, else basic composition (ε and δ added, a valid
    but loose bound) with a note saying so."""
    if all(p.get("ledger") is not None for p in parts):
        return merge_all(p["ledger"] for p in parts).to_dict()  # has epsilon and delta
    return {
        "epsilon": sum(float(p["epsilon"]) for p in parts),
        "delta": sum(float(p.get("delta") or 0.0) for p in parts),
        "note": "basic composition (no ledger): a part was made before ledgers existed",
    }


def subsampled_epsilon(noise_multiplier: float, delta: float, sample_rate: float, steps: int, relation: str) -> float:
    """ε at δ, under `relation`, of `steps` Poisson-subsampled Gaussian steps whose multiplier is
    σ over the per-record clip (a DP-SGD entry, read by this ledger's PLD)."""
    kw = dict(noise_multiplier=noise_multiplier, count=steps, sample_rate=sample_rate, adjacency="add_remove")
    return Ledger(delta, [LedgerEntry("dpsgd", "subsampled_gaussian", "-", **kw)], relation).epsilon()


def subsampled_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, relation: str) -> float:
    """The smallest noise multiplier (σ / per-record clip, to 0.1 %) whose `steps` Poisson-
    subsampled Gaussian steps spend at most ε at δ under `relation`, read by this ledger's own
    PLD, so the ε a DP-SGD artifact reports is the one it was calibrated for. opacus calibrates
    under add/remove only; this is how DP-SGD runs at a replace-one budget."""

    def spent(m: float) -> float:
        return subsampled_epsilon(m, delta, sample_rate, steps, relation)

    lo, hi = 0.5, 1.0  # bracket from 1 outwards: the PLD of a small multiplier is wide and slow
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"epsilon={epsilon!r}: needs a noise multiplier above 1e4 (delta={delta!r})")
    while spent(lo) <= epsilon:
        lo, hi = lo / 2, lo
        if lo < 0.1:
            raise ValueError(f"epsilon={epsilon!r}: reached with a noise multiplier below 0.1: too large a budget")
    while hi / lo > 1.001:  # spent() falls as m grows; keep spent(hi) <= epsilon < spent(lo)
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi
