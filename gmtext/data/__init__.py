"""Labeled text datasets and the classification-as-next-token task built on them.

`Task` is the one place that turns text into token ids, so generation, fine-tuning
and evaluation share the template and the verbalizer's first token exactly (the
reference implementation differs by a space between the two: a silent bug).
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import logging
import random
import shutil
import tempfile
from contextlib import contextmanager
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


_LOAD_CACHE: str | None = None


def _datasets_cache_dir() -> str:
    """load_dataset takes lock files in its cache dir even when streaming: a per-process temp
    dir keeps them (and anything else it writes) out of the user's HF cache and the repo."""
    global _LOAD_CACHE
    if _LOAD_CACHE is None:
        _LOAD_CACHE = tempfile.mkdtemp(prefix="gmtext-datasets-")
        atexit.register(shutil.rmtree, _LOAD_CACHE, True)
    return _LOAD_CACHE


def _csv_header(file: Path) -> list[str]:
    with open(file, encoding="utf-8-sig", newline="") as f:  # pandas drops a BOM too: the names must match its
        return next(csv.reader(f), [])


# Parsed files by identity and version: tests and multi-stage runs read the same small files
# many times, and a parse through `datasets` costs ~10 ms even for a few rows. A rewritten file
# has a new ctime (ns), so it is parsed again.
_ROWS: dict[tuple, list[dict]] = {}


def _read_rows(file: Path) -> list[dict]:
    st = file.stat()
    key = (str(file.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _ROWS:
        rows = _parse_rows(file)
        if len(_ROWS) >= 8:
            _ROWS.pop(next(iter(_ROWS)))
        _ROWS[key] = rows
    return _ROWS[key]


def _parse_rows(file: Path) -> list[dict]:
    """The records of a JSON Lines or CSV file, parsed by `datasets` (quoted multi-line CSV
    fields and U+2028 inside JSON strings survive, as they do in other tools).

    Streamed, so no Arrow copy of a private file lands on disk; the packaged json/csv builders
    never contact the network. CSV values stay strings, as csv.DictReader gave them: "007" or
    "NA" is text, not a number or a missing value. Parse failures become one-line DataErrors."""
    is_csv = file.suffix == ".csv"
    if is_csv:
        try:
            header = _csv_header(file)
        except UnicodeDecodeError:
            read_utf8(file)  # raises the message naming the byte
            raise
        if not header:
            return []
        kwargs = {"converters": {c: str for c in header}, "na_filter": False}
    else:
        kwargs = {}
    with _quiet_datasets() as datasets:
        from datasets.packaged_modules.json.json import JsonConfig

        if not is_csv and "parse_agent_traces" in JsonConfig.__dataclass_fields__:
            kwargs["parse_agent_traces"] = False  # else columns named type/message are read as agent traces
        try:
            ds = datasets.load_dataset(
                "csv" if is_csv else "json",
                data_files=str(file),
                split="train",
                streaming=True,
                cache_dir=_datasets_cache_dir(),
                **kwargs,
            )
            rows = []
            for batch in ds.iter(batch_size=1 << 16):  # columns of python values: 3-4x faster than row by row
                names = list(batch)
                rows += [dict(zip(names, values)) for values in zip(*batch.values())]
            return rows
        except Exception as e:
            raise _parse_error(file, is_csv, e) from None


_LIBRARY_LOGGERS = ("datasets", "filelock", "fsspec")


@contextmanager
def _quiet_datasets():
    """`datasets`, imported and run without its side effects: no download-count ping to the
    network (it does one per load_dataset call, even for a local file, unless offline), and
    nothing in the job log (it logs a parse error before raising it, the DataError says it
    once; and its debug records of cache locks are noise there)."""
    import datasets  # first: its import sets its logger's level (DATASETS_VERBOSITY), which would undo ours

    loggers = [logging.getLogger(n) for n in _LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        try:
            yield datasets
        finally:
            datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _parse_error(file: Path, is_csv: bool, e: Exception) -> DataError:
    """The one-line error for a file `datasets` could not parse: found again by hand (only on
    this path), so it names the line as an editor numbers it."""
    raw = read_utf8(file)  # raises for bad UTF-8
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if is_csv:
        return DataError(f"{file}: invalid CSV ({why})")
    for i, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as je:
            return DataError(f"{file}:{i}: invalid JSON ({je.msg})")
        if not isinstance(rec, dict):
            return DataError(f"{file}:{i}: not a JSON object (JSON Lines: one {{...}} record a line)")
    return DataError(f"{file}: cannot read as JSON Lines ({why})")


def _json_keys(file: Path):
    """keys(row): the keys of JSON Lines record `row` (0-based; blank lines skipped, as the
    parser skips them). The parsed table fills a key a record lacks with null, so a missing
    field and an explicit null (an empty text: skipped) are told apart here, on the rare rows
    that need it; the file is read once, on the first such row."""
    lines: list[str] = []

    def keys(row: int) -> list[str] | None:
        if not lines:
            lines.extend(ln for ln in read_utf8(file).split("\n") if ln.strip())
        try:
            rec = json.loads(lines[row])
        except (IndexError, json.JSONDecodeError):
            return None
        return sorted(rec) if isinstance(rec, dict) else None

    return keys


def load_split(
    split: str,
    label_names: Sequence[str],
    path: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    builtin: str | None = None,
    every_class: bool = True,
) -> LabeledSplit:
    """Load one split from a local folder (`{split}.jsonl` or `.csv`), the builtin demo set,
    or the Hugging Face hub. Empty/whitespace texts are skipped and counted, not fatal.

    `every_class=False`: a declared class with no record is not an error. A DP mechanism
    reading its private split passes it: whether a class is empty is a fact about the records,
    and a run that stops on it where its neighbour (one record replaced by one of that class)
    runs would tell the two apart."""
    if path:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"dataset.path={path!r} does not exist or is not a directory")
        files = [folder / f"{split}.jsonl", folder / f"{split}.csv"]
        file = next((f for f in files if f.exists()), None)
        if file is None:
            have = sorted(p.stem for p in folder.glob("*.jsonl")) + sorted(p.stem for p in folder.glob("*.csv"))
            hint = (
                "; to carve evaluation records out of one file set dataset.carve.eval_fraction (e.g. 0.1)"
                if have
                else ""
            )
            raise DataError(
                f"split {split!r} not found in {path} "
                f"(expected {split}.jsonl or {split}.csv; found: {have or 'none'}){hint}"
            )
        rows = _read_rows(file)
        where = str(file)
        keys_of = None if file.suffix == ".csv" else _json_keys(file)
    elif builtin:
        file = DEMO_DIR / f"{split}.jsonl"
        if not file.exists():
            raise DataError(f"split {split!r} not in the builtin {builtin!r} dataset (has: train, validation)")
        rows = _read_rows(file)
        where = f"builtin:{builtin}/{split}"
        keys_of = _json_keys(file)
    elif hub_name:
        import datasets

        rows = list(datasets.load_dataset(hub_name, hub_config, split=split))
        where = f"hub:{hub_name}/{split}"
        keys_of = None
    else:
        raise DataError("dataset has neither path, builtin nor hub_name set")
    if not rows:
        raise DataError(f"{where}: no rows")
    return _to_examples(rows, where, label_names, text_field, label_field, keys_of, every_class)


# ------------------------------------------------------------------ evaluation split carved from train
CARVE_HASH = "sha256('gmtext-carve-eval' NUL text), first 8 bytes big-endian / 2**64 < eval_fraction"


def in_carved_eval(text: str, fraction: float) -> bool:
    """Whether a train-file record is carved into the evaluation split: a function of its own
    (stripped) text and the public fraction only, so adding, removing or reordering other
    records never moves it, and duplicates land on the same side. The hash is keyed apart
    from the dev bucket's (is_dev), so the two are independent."""
    if fraction <= 0:
        return False
    h = hashlib.sha256(b"gmtext-carve-eval\x00" + text.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def carve_fraction(ds) -> float:
    """dataset.carve.eval_fraction, checked (0 when the config has no carve group)."""
    carve = getattr(ds, "carve", None)
    f = getattr(carve, "eval_fraction", 0.0) if carve is not None else 0.0
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
        raise DataError(
            f"dataset.carve.eval_fraction={f!r}: must be in [0, 1) (the share of train records carved into "
            "the evaluation split; 0 = off, read dataset.eval_split)"
        )
    return float(f)


def load_configured(ds, split: str, every_class: bool = True) -> LabeledSplit:
    """load_split for a `dataset` config, carve included.

    With dataset.carve.eval_fraction = f > 0, dataset.eval_split names the records of
    dataset.train_split's file with in_carved_eval(text, f), and dataset.train_split names the
    rest (its empty-text count stays with it): the two never share a record, so what a release
    reads from train never includes an evaluation record. A local folder or the builtin set
    that also has an {eval_split} file is refused: which one is evaluated on would be a guess."""
    kw = dict(
        path=ds.path,
        hub_name=ds.hub_name,
        hub_config=ds.hub_config,
        text_field=ds.text_field,
        label_field=ds.label_field,
        builtin=ds.builtin,
        every_class=every_class,
    )
    f = carve_fraction(ds)
    if not f or split not in (ds.train_split, ds.eval_split):
        return load_split(split, ds.label_names, **kw)
    if ds.eval_split == ds.train_split:
        raise DataError(
            f"dataset.carve.eval_fraction={f}: dataset.eval_split and dataset.train_split are both "
            f"{split!r}; carving needs two names"
        )
    folder = Path(ds.path) if ds.path else DEMO_DIR if ds.builtin else None
    clash = (
        [p for p in ((folder / f"{ds.eval_split}.jsonl"), (folder / f"{ds.eval_split}.csv")) if p.exists()]
        if folder
        else []
    )
    if clash:
        raise DataError(
            f"dataset.carve.eval_fraction={f}: {clash[0]} exists, and carving would leave it unread; "
            f"set dataset.carve.eval_fraction=0 to evaluate on it, or carve from a folder without it"
        )
    whole = load_split(ds.train_split, ds.label_names, **kw)
    want_eval = split == ds.eval_split
    part = LabeledSplit(
        [e for e in whole.examples if in_carved_eval(e.text, f) == want_eval], 0 if want_eval else whole.skipped_empty
    )
    counts = [0] * len(ds.label_names)
    for e in part.examples:
        counts[e.label] += 1
    empty = [ds.label_names[c] for c, n in enumerate(counts) if n == 0]
    if empty and (want_eval or every_class):
        side = "carved evaluation split" if want_eval else "train split left after carving"
        raise DataError(
            f"dataset.carve.eval_fraction={f}: the {side} of {ds.train_split!r} has no example of class(es) "
            f"{empty}; choose another fraction or add records"
        )
    return part


def carve_summary(ds, n_eval: int) -> dict | None:
    """What metrics.json records about a carve (None: no carve). The evaluation count is
    public like any evaluation split's size (accuracy is published on it). The train count is
    left out: under add/remove adjacency the size of the private split is itself a statistic of
    it, and metrics.json is read by every consumer, DP or not (the DP release publishes its row
    count only under replace_one, where every neighbour has the same)."""
    f = carve_fraction(ds)
    if not f:
        return None
    return {
        "eval_fraction": f,
        "hash": CARVE_HASH,
        "from_split": ds.train_split,
        "n_eval": int(n_eval),
        "n_train": "withheld (private: the train split's size)",
    }


def _to_examples(rows, where, label_names, text_field, label_field, keys_of=None, every_class=True) -> LabeledSplit:
    names = list(label_names)
    examples, skipped = [], 0
    for i, r in enumerate(rows):
        text, lab = r.get(text_field), r.get(label_field)
        have = sorted(r)
        if keys_of is not None and (text is None or lab is None):
            have = keys_of(i) or have
        missing = [f for f in (text_field, label_field) if f not in have]
        if missing:
            raise DataError(
                f"{where} row {i}: field {missing[0]!r} missing (row has: {have}); "
                "set dataset.text_field / dataset.label_field"
            )
        if isinstance(lab, float) and lab.is_integer():
            lab = int(lab)  # one float label makes the parser read the whole column as floats
        if isinstance(lab, str) and lab in names:
            lab = names.index(lab)
        elif isinstance(lab, str) and lab.lstrip("-").isdigit():
            lab = int(lab)
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(names):
            raise DataError(
                f"{where} row {i}: label {lab!r} outside the declared labels {names} (ids 0..{len(names) - 1})"
            )
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        examples.append(Example(text=text.strip(), label=lab))
    counts = [0] * len(names)
    for ex in examples:
        counts[ex.label] += 1
    empty = [names[c] for c, n in enumerate(counts) if n == 0]
    if empty and every_class:
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
    return int.from_bytes(h[:8], "big") / 2.0**64


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


def sample_per_class(
    split: LabeledSplit, num_classes: int, n: int, seed: int, exclude: set[str] | None = None
) -> list[Example]:
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
            raise ValueError(
                f"dataset.verbalizers has {len(self.verbalizers)} words "
                f"for {len(self.label_names)} labels {self.label_names}"
            )
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
            raise ValueError(
                "the template has no prefix and the tokenizer adds no BOS; set model.start_token (e.g. '<|endoftext|>')"
            )
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
        return self.start_ids + ctx + self.prefix_ids[len(self.start_ids) :]

    def class_prompt_ids(self, prompt: str, context: str, descriptions: Sequence[str]) -> list[list[int]]:
        """Per class, the ids the LM writes after: `prompt` formatted with the public task
        description (dataset.lm_context) and the class description (dataset.label_descriptions,
        else the label name), as lm_context_ids places a context."""
        descs = list(descriptions) if descriptions else list(self.label_names)
        if len(descs) != self.num_classes:
            raise ValueError(
                f"dataset.label_descriptions has {len(descs)} entries for {self.num_classes} classes; "
                "accepted: one per label, or none (the label names are used)"
            )
        try:
            texts = [prompt.format(context=context, description=d).strip() for d in descs]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"class prompt {prompt!r} does not format ({e!r}); accepted placeholders: {{context}}, {{description}}"
            ) from None
        return [self.lm_context_ids(t) for t in texts]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode(self, text: str, max_text_tokens: int | None = None) -> list[int]:
        t = self.encode_text(text)
        if max_text_tokens is not None:
            t = t[:max_text_tokens]
        return self.prefix_ids + t + self.suffix_ids

    def batch(
        self, texts: Sequence[str], max_text_tokens: int | None = None, pad_id: int | None = None, min_width: int = 0
    ):
        """Right-padded ids, attention mask and the index of the last real token per row; the
        batch is at least `min_width` wide (see mechanism.chunk_plan)."""
        seqs = [self.encode(t, max_text_tokens) for t in texts]
        width = max(max(len(s) for s in seqs), min_width)
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
