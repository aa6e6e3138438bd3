"""Which parameters' gradients tell the classes apart? A nearest-target probe per parameter set.

python experiments/probe_params.py [--heldout 200] [--json out.json] [SPEC ...]
  (SPEC: a comma-separated matched_params list, e.g. "final_norm,last_blocks:1" or "re:layers\\.(1[0-9])\\.")

For each parameter set: class targets = exact mean gradients (verbalizer loss) of the same
50-per-class real train examples a rt_main_cpu release uses (seed 0); then every held-out
train text (random, disjoint from those) is classified by the label-fit margin
(gmtext/matching/rescore.py): the label under which its gradient matches that label's target
best. The accuracy says how much class information matching that set's targets can carry:
it bounds what gradient matching or margin selection with it can teach. Also printed:
cos(T_neg, T_pos), the share of the targets' direction that the classes have in common.
Uses train data only (never validation/test). Embedded SmolLM2-135M, CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPECS = [
    "final_norm,last_blocks:1",
    "lm_head",
    "final_norm",
    "last_blocks:4",
    r"re:layers\.(1[0-9])\.",
    r"re:layers\.[0-4]\.",
]


def main(argv=None) -> int:
    from hydra import compose, initialize_config_module

    from gmtext.config import register_configs
    from gmtext.gradients import MatchedParams, class_target_gradients
    from gmtext.matching.rescore import cosine_distance, label_fit
    from gmtext.runtime import build_task, dataset_split, load_generator_model
    from gmtext.runtime import select_real_examples

    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "rotten_tomatoes"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not (Path(args.data) / "train.jsonl").exists():
        print(f"probe_params: {args.data}/train.jsonl not found (see ../shared/data/README)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
        cfg = compose(
            "release", ["dataset=rotten_tomatoes", f"dataset.path={args.data}", "real_per_class=50", "seed=0"]
        )
    ds = cfg.dataset
    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    used, _ = select_real_examples(ds, task.num_classes, cfg.real_per_class, cfg.seed)
    seen = {t for c in used for t in c}
    split = dataset_split(ds, ds.train_split)
    pool = [e for e in split.examples if e.text not in seen]
    random.Random(1).shuffle(pool)
    held = pool[: args.heldout]
    texts, y = [e.text for e in held], torch.tensor([e.label for e in held])
    rows = []
    print(f"{'matched parameters':42s} {'numel':>11s} {'probe acc':>9s} {'cos(T0,T1)':>10s} {'s':>5s}")
    for spec in args.specs:
        t0 = time.perf_counter()
        matched = MatchedParams(lm.model, spec.split(","))
        tg = class_target_gradients(lm.model, task, matched, used, 16, ds.max_text_tokens, "verbalizer")
        fit = label_fit(lm.model, task, matched, tg.grads, texts, "verbalizer", ds.max_text_tokens)
        # predicted label: the one whose target the text's gradient fits best (own-label margin > 0)
        acc = (fit.argmin(1) == y).float().mean().item()
        cos01 = 1 - cosine_distance([g[None] for g in tg.grads[0]], tg.grads[1]).item()
        rows.append(
            {
                "matched_params": spec,
                "numel": matched.numel(),
                "probe_accuracy": acc,
                "cos_targets": cos01,
                "heldout": len(y),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{spec:42s} {matched.numel():>11d} {acc:>9.3f} {cos01:>10.3f} {rows[-1]['seconds']:>5.0f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"config": OmegaConf.to_container(cfg.dataset, resolve=True), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
