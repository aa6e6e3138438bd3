"""Benchmark DP-SGD's cost per fine-tuner: LoRA, last_layers through the whole model, and
last_layers on the cached frozen prefix (train.cache_prefix, gmtext/finetune/prefix.py).

    python benchmarks/bench_dpsgd.py [--quick] [--threads 2] [--model embedded:smollm2-135m|tiny-llama]
                                     [--n 64] [--steps 2] [--microbatch 8] [--num-layers 2] [--stride 1] [--out PATH]

Every row calls gmtext.finetune.dpsgd.dpsgd_fit on the same --n texts (rotten tomatoes train,
every --stride-th review, when ../shared/data has it) with q = 1, so each of the --steps steps
clips, sums and noises the per-example gradients of all --n texts: the same work per step in
every row. One warm-up fit on --microbatch texts precedes each row. The cached row's time is
split into the prefix pass (once per text) and the steps.

Each row gives seconds per record-step and the wall time of the rotten tomatoes recipe
(conf/train/dpsgd.yaml on 8,530 rows: 102 steps at q = 1/34 over the 7,695 non-dev records, about
226 records each, and one prefix pass over them), *extrapolated* linearly from what it timed (said so in the row).
Writes benchmarks/results/dpsgd-<machine>-<timestamp>.json (or --out; --quick / tiny-llama →
dpsgd-smoke.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import FALLBACK, RT, save  # noqa: E402

# rotten tomatoes under conf/train/dpsgd.yaml: 102 steps at q = 1/34 over the 7,695 non-dev records
# (about 226 per step; the divisor q·R ≈ 251 counts all 8,530 rows), one prefix pass over them
RECIPE = {"steps": 102, "records_per_step": 7695 / 34, "prefix_records": 7695}


def main(argv=None) -> dict:
    from gmtext.data import Example, Task, load_split
    from gmtext.finetune import dpsgd as D
    from gmtext.finetune.trainer import LastLayersFineTuner, LoRAFineTuner
    from gmtext.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=64, help="texts per logical step (q = 1)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--microbatch", type=int, default=8)
    ap.add_argument("--num-layers", type=int, default=2, help="finetuner=last_layers' trained blocks")
    ap.add_argument("--stride", type=int, default=1, help="time every S-th train review")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.steps, a.microbatch = 8, 1, 4
    if min(a.n, a.steps, a.microbatch, a.num_layers, a.stride, a.threads) < 1:
        raise SystemExit(
            f"bench_dpsgd: --n {a.n}, --steps {a.steps}, --microbatch {a.microbatch}, --num-layers {a.num_layers}, "
            f"--stride {a.stride} and --threads {a.threads} must be >= 1"
        )
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    task = Task(
        lm.tokenizer, "{text} It was", ["neg", "pos"], [" bad", " great"], start_token="<|endoftext|>"
    )  # conf/dataset/rotten_tomatoes.yaml
    if (RT / "train.jsonl").exists():
        exs = load_split("train", ["neg", "pos"], path=str(RT)).examples[:: a.stride][: a.n]
        src = f"rotten_tomatoes train, every {a.stride}. review" if a.stride > 1 else "rotten_tomatoes train"
    else:
        exs, src = [Example(t, i % 2) for i, t in enumerate(FALLBACK[: a.n])], "built-in sentences"

    # inside dpsgd_fit, time the prefix pass and the accounting (calibration before, ε after),
    # so that the steps' time is what remains
    spent = {"prefix": 0.0, "accounting": 0.0}
    real = {f: getattr(D, f) for f in ("prefix_states", "subsampled_noise_multiplier", "subsampled_epsilon")}

    def timed(fn, key):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    for f, fn in real.items():
        setattr(D, f, timed(fn, "prefix" if f == "prefix_states" else "accounting"))
    rows = []
    finetuners = {
        "lora": lambda: LoRAFineTuner(r=8, alpha=16, max_steps=a.steps, batch_size=len(exs)),
        "last_layers (whole model)": lambda: LastLayersFineTuner(
            num_layers=a.num_layers, max_steps=a.steps, batch_size=len(exs)
        ),
        "last_layers (cached prefix)": lambda: LastLayersFineTuner(
            num_layers=a.num_layers, max_steps=a.steps, batch_size=len(exs)
        ),
    }
    for name, make in finetuners.items():
        cache = name.endswith("(cached prefix)")
        ft = make()
        model = ft.prepare(copy.deepcopy(lm.model))

        def fit(records, ft=ft, model=model, cache=cache):
            return D.dpsgd_fit(ft, model, task, records, 8.0, 1e-5, 0.1, microbatch=a.microbatch, cache_prefix=cache)

        fit(exs[: a.microbatch])  # warm-up: imports, opacus' functorch fallback
        spent.update(prefix=0.0, accounting=0.0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = fit(exs)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        pre = spent["prefix"]
        per_record_step = (dt - pre - spent["accounting"]) / (res.steps * len(exs))
        per_prefix_record = pre / len(exs)
        minutes = (
            RECIPE["steps"] * RECIPE["records_per_step"] * per_record_step
            + RECIPE["prefix_records"] * per_prefix_record
        ) / 60
        rows.append(
            {
                "finetuner": name,
                "trainable_params": res.trainable_params,
                "frozen_prefix_blocks": res.extra["frozen_prefix_blocks"],
                "texts_timed": len(exs),
                "steps_timed": res.steps,
                "seconds": dt,
                "cpu_seconds": cpu,
                "prefix_seconds": pre,
                "accounting_seconds": spent["accounting"],
                "ms_per_record_step": 1e3 * per_record_step,
                "ms_per_prefix_record": 1e3 * per_prefix_record,
                "recipe_minutes_extrapolated": minutes,
            }
        )
        print(
            f"{name:30s} trainable {res.trainable_params:>10,d}  {1e3 * per_record_step:>7.1f} ms per record-step"
            f"  prefix {1e3 * per_prefix_record:>6.1f} ms/record  recipe ≈ {minutes:6.1f} min "
            f"(extrapolated from {len(exs)} texts × {res.steps} steps)",
            flush=True,
        )
        del model
    for f, fn in real.items():
        setattr(D, f, fn)
    whole = next(r for r in rows if r["finetuner"] == "last_layers (whole model)")
    cached = next(r for r in rows if r["finetuner"] == "last_layers (cached prefix)")
    cached["step_speedup_vs_whole_model"] = whole["ms_per_record_step"] / cached["ms_per_record_step"]
    cached["recipe_speedup_vs_whole_model"] = (
        whole["recipe_minutes_extrapolated"] / cached["recipe_minutes_extrapolated"]
    )
    print(
        f"cached prefix: steps {cached['step_speedup_vs_whole_model']:.1f}× faster, "
        f"the recipe {cached['recipe_speedup_vs_whole_model']:.1f}× faster (extrapolated)"
    )
    return save("dpsgd_step", "dpsgd", a, src, rows, microbatch=a.microbatch, recipe=RECIPE)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
