"""The privacy ledger: every use of a protected split, composed by one accountant.

An artifact (a release, a synthetic pool, a selected set, a fine-tuned model's metrics)
carries the ledger of everything it depends on. Each entry is one mechanism applied to one
protected split:

* ``gaussian``: a full-batch Gaussian mechanism (the release), ``count`` times;
* ``subsampled_gaussian``: Poisson-subsampled Gaussian steps (DP-SGD);
* ``non_private``: a use without noise (a real dev set, real training examples): ε = ∞.

Composition is by Google's ``dp_accounting`` privacy-loss-distribution accountant over the
entries' DP events (``to_event``), sequentially over *all* entries, whatever split they name:
conservative when two entries protect different data, and exactly right when one person can
appear in both. Merging two ledgers (a pool and the probe that scored it) concatenates their
entries and adds their δ: the result is the ε of the joint composition at δ1 + δ2, never more
than ε1 + ε2 (basic composition) and usually much less.

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
ACCOUNTANT = "dp_accounting.pld.PLDAccountant"


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

    def to_event(self):
        import dp_accounting as dpa

        if self.kind == "non_private":
            return dpa.NonPrivateDpEvent()
        ev = dpa.GaussianDpEvent(float(self.noise_multiplier))
        if self.kind == "subsampled_gaussian":
            ev = dpa.PoissonSampledDpEvent(float(self.sample_rate), ev)
        return ev if self.count == 1 else dpa.SelfComposedDpEvent(ev, self.count)


@dataclass
class Ledger:
    """Entries plus the δ at which their composition is reported."""

    delta: float = 0.0
    entries: list[LedgerEntry] = field(default_factory=list)

    def add(self, entry: LedgerEntry) -> "Ledger":
        self.entries.append(entry)
        return self

    @property
    def private(self) -> bool:
        return not any(e.kind == "non_private" for e in self.entries)

    def epsilon(self) -> float:
        """ε of the composition of every entry at this ledger's δ (0 with no entry, ∞ with a
        non-private one or δ = 0)."""
        if not self.entries:
            return 0.0
        if not self.private or not self.delta > 0:
            return math.inf
        import dp_accounting as dpa
        from dp_accounting.pld import PLDAccountant

        event = dpa.ComposedDpEvent([e.to_event() for e in self.entries])
        return float(PLDAccountant().compose(event).get_epsilon(self.delta))

    def merged(self, other: "Ledger") -> "Ledger":
        """Both ledgers' entries at δ1 + δ2. An entry for the same release artifact
        (`release_id`) reached through both is kept once: re-reading a release is
        post-processing, not a second use of the data."""
        ids = {e.release_id for e in self.entries if e.release_id}
        extra = [e for e in other.entries if not (e.release_id and e.release_id in ids)]
        if not extra:
            return Ledger(max(self.delta, other.delta) if self.entries else other.delta, list(self.entries))
        return Ledger(self.delta + other.delta, self.entries + extra)

    def splits(self) -> list[str]:
        return sorted({e.split for e in self.entries})

    def to_dict(self) -> dict[str, Any]:
        eps = self.epsilon()
        return {
            "epsilon": eps,
            "delta": self.delta,
            "accountant": ACCOUNTANT if self.private and self.entries else None,
            "composition": "sequential over all entries",
            "protected_splits": self.splits(),
            "entries": [{k: v for k, v in asdict(e).items() if v not in (None, "")} for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Ledger":
        if not d:
            return cls()
        return cls(float(d.get("delta", 0.0)), [LedgerEntry(**e) for e in d.get("entries", [])])


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
