"""Memorisation audit: does the synthetic text copy real text?

Empirical checks, complementary to the formal (ε, δ) guarantee (they can show leakage,
never prove its absence):

* longest common token n-gram between any synthetic and any real text;
* share of synthetic texts that contain an n-gram (default 8) of some real text;
* nearest-real-neighbour similarity: TF-IDF cosine (word unigrams, idf fitted on the
  real texts, smooth idf as in scikit-learn) of every synthetic text to its most similar
  real text; reported as a distribution (mean, median, p90, p99, max);
* canaries: k unique random sentences are planted into the private set, release +
  generate run on it, and we report whether any canary n-gram reaches the output and the
  canaries' exposure (Carlini et al. 2019): rank of each canary's perplexity among R random
  reference sentences of the same format, exposure = log2(R + 1) - log2(rank).

Tokens here are lower-cased words and punctuation (regex ``\\w+|[^\\w\\s]``), not model
sub-words: an 8-word overlap is a meaningful copy whatever the tokenizer.

audit.json / audit.md are computed from private data without noise: they are for the data
owner, not for publication next to the synthetic set (they name real-example indices, not
real text).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from typing import Sequence

import numpy as np
import torch


_TOKEN = re.compile(r"\w+|[^\w\s]")

# Canary vocabulary: common, unrelated words (sentences that never occur in review data).
CANARY_WORDS = (
    "apple river window seven orange pencil garden silver rocket mountain basket cloud tiger "
    "lemon violin castle engine forest harbor island jacket kettle ladder magnet needle ocean "
    "pepper quartz saddle tunnel umbrella valley walnut yellow zebra anchor bridge candle desert "
    "falcon glacier hammer igloo jungle koala lantern marble nickel oyster parrot quilt rabbit "
    "salmon tomato unicorn vessel wizard xylophone yogurt zipper acorn bamboo cactus dolphin "
    "emerald feather ginger helmet iron jasmine kitten lobster mango nutmeg olive pumpkin radish "
    "spider turnip velvet whistle copper meadow cobalt sparrow granite thimble compass biscuit"
).split()
CANARY_PREFIX = "the secret code of agent"


def words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(toks: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def longest_common_ngrams(synth: Sequence[Sequence[str]], real: Sequence[Sequence[str]]) -> list[int]:
    """For each synthetic token list, the length of its longest n-gram that occurs in some real
    text. Grows n while any synthetic text still matches (no match at n ⇒ none at n + 1)."""
    best = [0] * len(synth)
    alive = list(range(len(synth)))
    n = 1
    while alive:
        real_set: set = set()
        for r in real:
            real_set |= _ngrams(r, n)
        nxt = [i for i in alive if _ngrams(synth[i], n) & real_set]
        for i in nxt:
            best[i] = n
        alive, n = nxt, n + 1
    return best


def _tfidf(docs: Sequence[Sequence[str]], vocab: dict, idf: np.ndarray):
    from scipy import sparse

    rows, cols, vals = [], [], []
    for i, d in enumerate(docs):
        for w, c in Counter(d).items():
            j = vocab.get(w)
            if j is not None:
                rows.append(i)
                cols.append(j)
                vals.append(c * idf[j])
    m = sparse.csr_matrix((vals, (rows, cols)), shape=(len(docs), len(vocab)), dtype=np.float64)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    return sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ m


def nearest_real_cosine(synth: Sequence[Sequence[str]], real: Sequence[Sequence[str]], block: int = 512):
    """(max TF-IDF cosine to any real text, index of that real text) per synthetic text."""
    df: Counter = Counter()
    for r in real:
        df.update(set(r))
    vocab = {w: j for j, w in enumerate(sorted(df))}
    n = len(real)
    idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(df)])
    r_m = _tfidf(real, vocab, idf).T.tocsc()
    best, arg = [], []
    for i in range(0, len(synth), block):
        s = (_tfidf(synth[i : i + block], vocab, idf) @ r_m).toarray()
        if s.shape[1] == 0:
            s = np.zeros((s.shape[0], 1))
        best.append(s.max(1))
        arg.append(s.argmax(1))
    return np.concatenate(best), np.concatenate(arg)


def _dist(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p90": float(np.quantile(x, 0.9)),
        "p99": float(np.quantile(x, 0.99)),
        "max": float(x.max()),
    }


def audit_texts(synthetic: Sequence[str], real: Sequence[str], n: int = 8, top: int = 5) -> dict:
    """Overlap statistics of synthetic vs real texts (see module docstring)."""
    if not synthetic:
        raise ValueError("audit: the synthetic set is empty")
    if not real:
        raise ValueError("audit: no real texts to compare with")
    st = [words(t) for t in synthetic]
    rt = [words(t) for t in real]
    lcn = longest_common_ngrams(st, rt)
    cos, idx = nearest_real_cosine(st, rt)
    order = np.argsort(-cos)[:top]
    return {
        "num_synthetic": len(synthetic),
        "num_real": len(real),
        "ngram": n,
        "longest_common_ngram": max(lcn),
        "longest_common_ngram_distribution": _dist(np.array(lcn, dtype=float)),
        "share_with_real_ngram": sum(v >= n for v in lcn) / len(lcn),
        "similarity": "tfidf_cosine (word unigrams, smooth idf fitted on the real texts)",
        "nearest_real_cosine": _dist(cos),
        "most_similar": [
            {
                "synthetic": synthetic[i],
                "real_index": int(idx[i]),
                "cosine": float(cos[i]),
                "longest_common_ngram": lcn[i],
            }
            for i in order
        ],
    }


# --------------------------------------------------------------------------- canaries
def make_canaries(k: int, num_words: int, seed: int, prefix: str = CANARY_PREFIX) -> list[str]:
    """k distinct sentences `prefix w1 ... wm.` with random words (seeded: tests reproduce)."""
    rng = random.Random(f"canary:{seed}")
    out: list[str] = []
    while len(out) < k:
        s = f"{prefix} " + " ".join(rng.choice(CANARY_WORDS) for _ in range(num_words)) + "."
        if s not in out:
            out.append(s)
    return out


def plant_canaries(
    texts_by_class: Sequence[Sequence[str]], canaries: Sequence[str]
) -> tuple[list[list[str]], list[int]]:
    """Replace real examples by canaries, round robin over classes (counts unchanged: n stays the
    public constant). Returns the new texts and each canary's class."""
    out = [list(t) for t in texts_by_class]
    labels = []
    for j, can in enumerate(canaries):
        c = j % len(out)
        slot = j // len(out)
        if slot >= len(out[c]):
            raise ValueError(f"cannot plant {len(canaries)} canaries: class {c} has only {len(out[c])} examples")
        out[c][slot] = can
        labels.append(c)
    return out, labels


@torch.no_grad()
def sentence_log_ppl(model, tokenizer, texts: Sequence[str], start_ids: Sequence[int], batch: int = 32) -> list[float]:
    """Mean token negative log-likelihood of each text after `start_ids` (log perplexity)."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        seqs = [list(start_ids) + tokenizer(t, add_special_tokens=False).input_ids for t in texts[i : i + batch]]
        w = max(map(len, seqs))
        ids = torch.full((len(seqs), w), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(dev), reduction="none")
        m = mask[:, 1:].to(dev).float()
        m[:, : max(0, len(start_ids) - 1)] = 0  # score the sentence only
        out += ((nll * m).sum(1) / m.sum(1)).tolist()
    return out


def canary_exposure(
    model, tokenizer, canaries: Sequence[str], references: Sequence[str], start_ids: Sequence[int]
) -> list[dict]:
    """Exposure of each canary among `references` (same format, never planted): rank 1 = the
    canary is the most likely sentence; exposure = log2(R + 1) - log2(rank), ~1 bit on average
    for a model that has not seen the canaries, log2(R + 1) when it is ranked first."""
    lc = sentence_log_ppl(model, tokenizer, canaries, start_ids)
    lr = np.array(sentence_log_ppl(model, tokenizer, references, start_ids))
    res = []
    for can, v in zip(canaries, lc):
        rank = 1 + int((lr < v).sum())
        res.append(
            {
                "canary": can,
                "log_perplexity": v,
                "rank": rank,
                "references": len(references),
                "exposure_bits": math.log2(len(references) + 1) - math.log2(rank),
            }
        )
    return res
