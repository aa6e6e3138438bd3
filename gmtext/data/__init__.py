"""Labeled text datasets and the classification-as-next-token task built on them.

`Task` is the one place that turns text into token ids, so generation, fine-tuning
and evaluation share the template and the verbalizer's first token exactly (the
reference implementation differs by a space between the two: a silent bug).
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

DEMO_DIR = Path(__file__).parent / "demo"


class DataError(ValueError):
    """Bad or missing input data; the message names the file, field or value."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class LabeledSplit:
    examples: list[Example]
    skipped_empty: int = 0

    def by_class(self, num_classes: int) -> list[list[Example]]:
        out: list[list[Example]] = [[] for _ in range(num_classes)]
        for ex in self.examples:
            out[ex.label].append(ex)
        return out


def read_utf8(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8") from None


def _read_rows(file: Path) -> list[dict]:
    raw = read_utf8(file)
    if file.suffix == ".csv":
        return list(csv.DictReader(raw.splitlines()))
    rows = []
    for i, line in enumerate(raw.split("\n"), 1):  # JSON text may hold U+2028 and other line breaks splitlines() splits on
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{i}: invalid JSON ({e.msg})") from None
    return rows


def load_split(
    split: str,
    label_names: Sequence[str],
    path: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    builtin: str | None = None,
) -> LabeledSplit:
    """Load one split from a local folder (`{split}.jsonl` or `.csv`), the builtin demo set,
    or the Hugging Face hub. Empty/whitespace texts are skipped and counted, not fatal."""
    if path:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"dataset.path={path!r} does not exist or is not a directory")
        files = [folder / f"{split}.jsonl", folder / f"{split}.csv"]
        file = next((f for f in files if f.exists()), None)
        if file is None:
            have = sorted(p.stem for p in folder.glob("*.jsonl")) + sorted(p.stem for p in folder.glob("*.csv"))
            raise DataError(f"split {split!r} not found in {path} (expected {split}.jsonl or {split}.csv; found: {have or 'none'})")
        rows = _read_rows(file)
        where = str(file)
    elif builtin:
        file = DEMO_DIR / f"{split}.jsonl"
        if not file.exists():
            raise DataError(f"split {split!r} not in the builtin {builtin!r} dataset (has: train, validation)")
        rows = _read_rows(file)
        where = f"builtin:{builtin}/{split}"
    elif hub_name:
        import datasets

        rows = list(datasets.load_dataset(hub_name, hub_config, split=split))
        where = f"hub:{hub_name}/{split}"
    else:
        raise DataError("dataset has neither path, builtin nor hub_name set")
    if not rows:
        raise DataError(f"{where}: no rows")
    return _to_examples(rows, where, label_names, text_field, label_field)


def _to_examples(rows, where, label_names, text_field, label_field) -> LabeledSplit:
    names = list(label_names)
    examples, skipped = [], 0
    for i, r in enumerate(rows):
        missing = [f for f in (text_field, label_field) if f not in r]
        if missing:
            raise DataError(f"{where} row {i}: field {missing[0]!r} missing (row has: {sorted(r)}); set dataset.text_field / dataset.label_field")
        text, lab = r.get(text_field), r.get(label_field)
        if isinstance(lab, str) and lab in names:
            lab = names.index(lab)
        elif isinstance(lab, str) and lab.lstrip("-").isdigit():
            lab = int(lab)
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(names):
            raise DataError(f"{where} row {i}: label {lab!r} outside the declared labels {names} (ids 0..{len(names) - 1})")
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        examples.append(Example(text=text.strip(), label=lab))
    counts = [0] * len(names)
    for ex in examples:
        counts[ex.label] += 1
    empty = [names[c] for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{where}: class(es) {empty} have zero examples; every declared label needs at least one")
    # `skipped` is kept on the split (the row count of the protected split needs it) but never
    # logged: the job log is an output, and a count of the private file is a statistic of it.
    return LabeledSplit(examples, skipped)


def is_dev(text: str, buckets: int = 10) -> bool:
    """Dev examples are a fixed hash bucket of the train split: disjoint from every release
    sample by construction, independent of seeds, stable when the file grows."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % buckets == 0


def dev_examples(split: LabeledSplit, size: int) -> list[Example]:
    """Up to `size` dev examples, class-balanced where possible, in file order."""
    pool = [e for e in split.examples if is_dev(e.text)]
    labels = sorted({e.label for e in pool})
    per = max(1, size // max(1, len(labels)))
    out = []
    for c in labels:
        out += [e for e in pool if e.label == c][:per]
    return out


def _keyed_uniform(text: str, key: int) -> float:
    """A uniform in [0, 1) that depends on this record's text and a public key only."""
    h = hashlib.sha256(f"{key}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def release_records(split: LabeledSplit, num_classes: int, sample_rate: float = 1.0, key: int = 0) -> list[list[str]]:
    """Texts per class that enter a release, each record decided on its own.

    A record enters iff it is not in the dev hash bucket and (with sample_rate < 1) its keyed
    hash falls under the rate. Nothing looks at the other records (no ranking, no sampling from
    a pool, no per-class count), so adding, removing or replacing one record changes the
    release's input in that record alone: the premise of the sensitivity in docs/privacy.md."""
    out: list[list[str]] = [[] for _ in range(num_classes)]
    for e in split.examples:
        if is_dev(e.text) or (sample_rate < 1.0 and _keyed_uniform(e.text, key) >= sample_rate):
            continue
        out[e.label].append(e.text)
    return out


def sample_per_class(split: LabeledSplit, num_classes: int, n: int, seed: int, exclude: set[str] | None = None) -> list[Example]:
    """A seeded, class-balanced random subset (n per class, fewer if a class is smaller).

    Which records it picks depends on all the others (random.sample over the pool): fine for
    non-private uses (real-N baselines, demonstrations), never used by a DP release."""
    rng = random.Random(seed)
    out = []
    for exs in split.by_class(num_classes):
        pool = [e for e in exs if not is_dev(e.text) and (not exclude or e.text not in exclude)]
        out += rng.sample(pool, min(n, len(pool)))
    return out


@dataclass
class Task:
    """Classification as next-token prediction: `template.format(text=...)` → verbalizer's first token.

    Token ids are built from separately tokenized pieces (bos, template prefix, text,
    template suffix) so that the synthetic token slot and the pinned suffix have the
    same ids in generation and in fine-tuning.
    """

    tokenizer: object
    template: str
    label_names: list[str]
    verbalizers: list[str]
    start_token: str | None = None
    prefix_ids: list[int] = field(init=False)
    suffix_ids: list[int] = field(init=False)
    label_token_ids: list[int] = field(init=False)

    def __post_init__(self):
        if self.template.count("{text}") != 1:
            raise ValueError(f"dataset.template={self.template!r} must contain '{{text}}' exactly once")
        if len(self.verbalizers) != len(self.label_names):
            raise ValueError(f"dataset.verbalizers has {len(self.verbalizers)} words for {len(self.label_names)} labels {self.label_names}")
        if len(self.label_names) < 2:
            raise ValueError(f"dataset.label_names={self.label_names}: need at least 2 classes")
        tok = self.tokenizer
        pre, suf = self.template.split("{text}")
        if self.start_token:
            if self.start_token not in tok.get_vocab():
                raise ValueError(f"model.start_token={self.start_token!r} is not a token of this tokenizer")
            start = [tok.convert_tokens_to_ids(self.start_token)]
        else:
            start = [tok.bos_token_id] if _adds_bos(tok) else []
        # A non-empty prefix gives the LM a context to score the first synthetic token.
        self.start_ids = start
        self.prefix_ids = start + tok(pre, add_special_tokens=False).input_ids
        if not self.prefix_ids:
            raise ValueError("the template has no prefix and the tokenizer adds no BOS; set model.start_token (e.g. '<|endoftext|>')")
        self.suffix_ids = tok(suf, add_special_tokens=False).input_ids
        ids = []
        for word in self.verbalizers:
            t = tok(word, add_special_tokens=False).input_ids
            if not t:
                raise ValueError(f"verbalizer {word!r} tokenizes to nothing; choose a non-empty word")
            ids.append(t[0])
        if len(set(ids)) != len(ids):
            dup = [w for w, i in zip(self.verbalizers, ids) if ids.count(i) > 1]
            raise ValueError(f"verbalizers {dup} share their first token; each class needs a distinct first token")
        self.label_token_ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def lm_context_ids(self, context: str = "") -> list[int]:
        """What the LM conditions on when it proposes or scores synthetic tokens: the input
        prefix, optionally preceded by a public task description (never real data)."""
        if not context:
            return list(self.prefix_ids)
        ctx = self.tokenizer(context, add_special_tokens=False).input_ids
        return self.start_ids + ctx + self.prefix_ids[len(self.start_ids):]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode(self, text: str, max_text_tokens: int | None = None) -> list[int]:
        t = self.encode_text(text)
        if max_text_tokens is not None:
            t = t[:max_text_tokens]
        return self.prefix_ids + t + self.suffix_ids

    def batch(self, texts: Sequence[str], max_text_tokens: int | None = None, pad_id: int | None = None):
        """Right-padded ids, attention mask and the index of the last real token per row."""
        seqs = [self.encode(t, max_text_tokens) for t in texts]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if pad_id is None else pad_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        last = mask.sum(1) - 1
        return ids, mask, last


def _adds_bos(tok) -> bool:
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id
