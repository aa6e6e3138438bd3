"""gmtext-audit: the memorisation audit (gmtext/privacy/audit.py) of a synthetic set against the
real train split, and the canary audit, which plants canaries into the private set and runs
the release and the generate stage on it.

Like pipeline.py it chains stages (release, then generate), which is why both live in
workflows/, one layer above the stages, and no stage imports another.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from ..artifacts import read_jsonl, write_json, write_text
from ..config import build
from ..privacy.audit import audit_texts, canary_exposure, longest_common_ngrams, make_canaries, plant_canaries, words
from ..runtime import (
    build_task,
    dataset_split,
    load_generator_model,
    load_or_make_release,
    matched_params,
    privacy_mechanism,
)
from ..stages.generate import SYNTHETIC_FILE, run_generate


def canary_test(
    cfg, run_dir, k: int | None = None, num_words: int | None = None, references: int | None = None
) -> dict:
    """Plant k canaries into the private set, run the configured release (privacy=none or dp)
    and generation on it, and report leakage: canary n-grams in the output and exposure under
    the generator model. The generator's weights never change during GRADMM, so its exposure
    is the no-leak baseline (≈1 bit); score a model fine-tuned on the output with
    `canary_exposure` to measure leakage through training."""
    gen = cfg.get("generator") if hasattr(cfg, "get") else None
    if gen is not None and not getattr(build(gen, drop=("name",)), "uses_release", True):
        raise ValueError(
            f"generator={gen.get('name')}: the canary audit plants its canaries into a gradient release; a "
            "generator without one (pe) would be audited on unplanted data; accepted: generator=gradmm"
        )
    can_cfg = cfg.get("canaries", {}) if hasattr(cfg, "get") else {}
    k = k if k is not None else int(can_cfg.get("k", 4))
    num_words = num_words if num_words is not None else int(can_cfg.get("words", 8))
    references = references if references is not None else int(can_cfg.get("references", 200))
    n = int(cfg.get("ngram", 8))
    run_dir = Path(run_dir) / "canary"
    t0 = time.perf_counter()
    canaries = make_canaries(k, num_words, cfg.seed)
    refs = make_canaries(references + k, num_words, cfg.seed + 1)
    refs = [r for r in refs if r not in canaries][:references]
    rel_dir = run_dir / "release"
    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    matched = matched_params(cfg, lm.model)
    load_or_make_release(cfg, rel_dir, lm, task, matched, edit_texts=lambda texts: plant_canaries(texts, canaries)[0])
    gen_cfg = OmegaConf.merge(cfg, {"release": str(rel_dir)})
    # no tracker run: this generation exists to measure leakage of planted private records, and
    # what the audit computes from them is for the data owner, never for a dashboard
    OmegaConf.update(gen_cfg, "logger", {"_target_": "gmtext.tracking.Tracker"}, merge=False)
    run_generate(gen_cfg, run_dir / "generate")
    synth = [r["text"] for r in read_jsonl(run_dir / "generate" / SYNTHETIC_FILE)]
    st = [words(t) for t in synth]
    per = []
    exp = canary_exposure(
        lm.model, lm.tokenizer, canaries, refs, task.prefix_ids[:1] or [lm.tokenizer.bos_token_id or 0]
    )
    for can, e in zip(canaries, exp):
        cw = words(can)
        lcn = longest_common_ngrams([cw], st)[0] if st else 0
        per.append({**e, "longest_common_ngram_with_output": lcn, "ngram_in_output": lcn >= n})
    return {
        "k": k,
        "ngram": n,
        "privacy": privacy_mechanism(cfg).name,
        "any_canary_ngram_in_output": any(p["ngram_in_output"] for p in per),
        "max_exposure_bits": max(p["exposure_bits"] for p in per),
        "canaries": per,
        "num_synthetic": len(synth),
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- entry point
def _read_synthetic(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        p = p / "synthetic.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"synthetic={path!r}: no such file (give synthetic.jsonl or a generate run dir)")
    return [r["text"] for r in read_jsonl(p)]


def _markdown(res: dict) -> str:
    a = res["overlap"]
    nr = a["nearest_real_cosine"]
    lines = [
        "# Memorisation audit",
        "",
        (
            f"Synthetic: `{res['synthetic']}` ({a['num_synthetic']} texts) "
            f"vs real `{res['dataset']}` train split ({a['num_real']} texts)."
        ),
        "Computed from private data without noise: for the data owner, not for publication.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| longest common word n-gram | {a['longest_common_ngram']} |",
        f"| synthetic texts sharing a real {a['ngram']}-gram | {a['share_with_real_ngram']:.2%} |",
        (
            "| nearest-real TF-IDF cosine: mean / median / p90 / p99 / max | "
            f"{nr['mean']:.3f} / {nr['median']:.3f} / {nr['p90']:.3f} / {nr['p99']:.3f} / {nr['max']:.3f} |"
        ),
        "",
        "Most similar synthetic texts (real example by index only):",
        "",
        "| cosine | common n-gram | real index | synthetic |",
        "|---:|---:|---:|---|",
    ]
    lines += [
        f"| {m['cosine']:.3f} | {m['longest_common_ngram']} | {m['real_index']} | {m['synthetic'].replace('|', '/')} |"
        for m in a["most_similar"]
    ]
    if res.get("canaries"):
        c = res["canaries"]
        lines += [
            "",
            f"## Canaries ({c['k']}, privacy={c['privacy']})",
            "",
            (
                f"Any canary {c['ngram']}-gram in the output: **{c['any_canary_ngram_in_output']}**; "
                f"max exposure {c['max_exposure_bits']:.2f} bits."
            ),
            "",
            "| canary | longest n-gram in output | rank | exposure (bits) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            (
                f"| {p['canary']} | {p['longest_common_ngram_with_output']} | "
                f"{p['rank']}/{p['references'] + 1} | {p['exposure_bits']:.2f} |"
            )
            for p in c["canaries"]
        ]
    return "\n".join(lines) + "\n"


def run_audit(cfg, run_dir) -> dict:
    """gmtext-audit: overlap audit of cfg.synthetic against the real train split (+ canaries).
    Never tracked (no `logger`): every number here is computed from private data without noise."""
    run_dir = Path(run_dir)
    if cfg.ngram < 1:
        raise ValueError(f"ngram={cfg.ngram}: must be >= 1")
    synth = _read_synthetic(cfg.synthetic)
    ds = cfg.dataset
    split = dataset_split(ds, ds.train_split)
    real = [e.text for e in split.examples]
    if cfg.max_real:
        real = real[: cfg.max_real]
    t0 = time.perf_counter()
    overlap = audit_texts(synth, real, cfg.ngram)
    res = {"synthetic": str(cfg.synthetic), "dataset": ds.name, "overlap": overlap, "seconds": time.perf_counter() - t0}
    if cfg.canaries.enabled:
        res["canaries"] = canary_test(cfg, run_dir)
    write_json(run_dir / "audit.json", res)
    write_text(run_dir / "audit.md", _markdown(res))
    return {
        "ngram": overlap["ngram"],
        "longest_common_ngram": overlap["longest_common_ngram"],
        "share_with_real_ngram": overlap["share_with_real_ngram"],
        "nearest_real_cosine": overlap["nearest_real_cosine"],
        "canaries": res.get("canaries"),
    }
