"""Readability of a text set, as every accuracy row reports it.

Two measures, because the first is the generator's own judge:
* the LM perplexity distribution of the kept texts (median and 90th percentile: a mean hides a
  long tail of word salad), under the generator LM that also proposed the tokens;
* the known-word rate: the share of the set's words that an English spelling dictionary knows
  (pyspellchecker's, about 160k words from a public corpus, no model). It does not share the LM's
  blind spots: projected text the LM finds likely can still be built of half-words
  ("brokeaking", "craimble"). Names and slang count as unknown, so compare a set with the real
  data's rate (`python -m gmtext.readability <data>/validation.jsonl`), not with 1.

numpy and a word list only, so `gmtext-report` reads both without loading torch.
    python -m gmtext.readability FILE.jsonl [...]   # known-word rate and perplexity of each file's texts
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# a word: letters with inner apostrophes ("don't"); digits and punctuation are no words
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
# clitics that tokenized corpora (rotten tomatoes) detach, "do n't", "it 's": joined back before
# splitting, else "ll" and "ve" would count as misspelt words of the real data
_DETACHED = re.compile(r"\b([A-Za-z]+) (n't|'(?:s|ll|re|ve|d|m))\b")
# what readability() returns (each only where it has a value); the pipeline and the report list these
KEYS = ("median_perplexity", "p90_perplexity", "known_word_rate")


def perplexity_quantiles(rows: Sequence[dict]) -> dict:
    """{"median_perplexity", "p90_perplexity"} over the rows that carry a perplexity; {} if none."""
    vals = [float(r["perplexity"]) for r in rows if r.get("perplexity") is not None]
    if not vals:
        return {}
    median, p90 = np.percentile(vals, [50, 90])
    return {"median_perplexity": float(median), "p90_perplexity": float(p90)}


@functools.lru_cache(maxsize=1)
def _dictionary() -> frozenset:
    from spellchecker import SpellChecker  # loaded on first use: 0.1 s, and only where a rate is asked for

    return frozenset(SpellChecker(language="en").word_frequency.dictionary)


def known_word_rate(texts: Iterable[str]) -> float | None:
    """Known words / words over all texts (pooled, so a one-word text weighs one word); None
    when the texts hold no word. Case-folded: sentence-initial capitals are no spelling error."""
    words = [w.lower() for t in texts for w in _WORD.findall(_DETACHED.sub(r"\1\2", t))]
    if not words:
        return None
    known = _dictionary()
    # a possessive of a known word is known; the dictionary lists only some ("film's")
    return sum(w in known or (w.endswith("'s") and w[:-2] in known) for w in words) / len(words)


def readability(rows: Sequence[dict]) -> dict:
    """perplexity_quantiles plus {"known_word_rate"} of the rows' texts (keys with no value left out)."""
    out = perplexity_quantiles(rows)
    rate = known_word_rate(r["text"] for r in rows if isinstance(r.get("text"), str))
    if rate is not None:
        out["known_word_rate"] = rate
    return out


def _read_jsonl(path: Path) -> list[dict]:
    # split on newlines only: str.splitlines also splits at U+2028 and U+0085 inside a JSON string
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def kept_readability(run_dir: str | Path) -> dict:
    """readability of a run dir's selected.jsonl, the set it fine-tuned on ({} when it has none)."""
    path = Path(run_dir) / "selected.jsonl"
    return readability(_read_jsonl(path)) if path.exists() else {}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gmtext.readability", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="JSON-lines files with a 'text' field per row")
    args = ap.parse_args(argv)
    for f in args.files:
        if not f.is_file():
            print(f"{f}: no such file (expected a JSON-lines file with a 'text' field per row)", file=sys.stderr)
            return 2
    for f in args.files:
        try:
            rows = _read_jsonl(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"{f}: not a JSON-lines file ({e})", file=sys.stderr)
            return 2
        r = readability(rows)
        rate, med = r.get("known_word_rate"), r.get("median_perplexity")
        print(
            f"{f}\ttexts {len(rows)}\tknown-word rate {'-' if rate is None else f'{rate:.3f}'}"
            f"\tmedian perplexity {'-' if med is None else f'{med:.1f}'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
