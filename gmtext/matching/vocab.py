"""Which vocabulary tokens the projection may emit.

Readable output needs a clean candidate set: no special/control tokens, no byte
fragments that decode to U+FFFD, no whitespace-only pieces, and only ids the
tokenizer really defines (some models pad the embedding matrix past the vocab).
"""

from __future__ import annotations

import unicodedata

import torch


def allowed_token_ids(tokenizer, embedding_rows: int, ascii_only: bool = True, min_alpha: int = 1) -> torch.Tensor:
    """Sorted ids of tokens that decode to printable text with at least `min_alpha` letters/digits
    (punctuation-only tokens allowed when min_alpha=0)."""
    n = min(len(tokenizer), embedding_rows)
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    keep = []
    for i, s in enumerate(pieces):
        if i in special or not s or not s.strip():
            continue
        if "\ufffd" in s or any(unicodedata.category(ch)[0] == "C" for ch in s):
            continue  # control characters, partial UTF-8 bytes
        if "\n" in s or "\t" in s or "  " in s:
            continue
        if ascii_only and not s.isascii():
            continue
        if s.strip().startswith("<") and s.strip().endswith(">"):
            continue  # markup-looking pieces such as <br> or <|...|>
        if sum(ch.isalnum() for ch in s) < min_alpha and not (min_alpha == 0):
            if not _is_punct(s):
                continue
        keep.append(i)
    if not keep:
        raise ValueError("the vocabulary filter left no allowed token; check the tokenizer")
    return torch.tensor(keep, dtype=torch.long)


_PUNCT = set(".,!?;:'\"-()")


def _is_punct(s: str) -> bool:
    # Allow plain sentence punctuation so sentences can end properly.
    t = s.strip()
    return 0 < len(t) <= 2 and all(ch in _PUNCT for ch in t)
