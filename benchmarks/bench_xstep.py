"""Benchmark one x-step iteration of the per-sequence objective: which parameters are matched,
the contrastive rival (matcher.contrastive) and per-sequence chunks (matcher.seq_chunk).

    python benchmarks/bench_xstep.py [--quick] [--threads 2] [--model embedded:smollm2-135m|tiny-llama]
                                     [--batch 10] [--length 24] [--mem-limit-gib 12] [--out PATH]
                                     [--rows SPEC/BETA/CHUNK ...]

A row is one iteration of what ADMMMatcher's x-step repeats (outer × inner times per batch):
the per-sequence matching distance of C × B sequences (objective=sequence, autograd path) and
its backward to the embeddings x. Its seconds are the median of 3 after a warm-up. Every row
runs in its own process, so its peak RSS is its own; a row that needs more than
--mem-limit-gib stops with a MemoryError and reads "over the limit". Targets are random
tensors of the matched shapes: the cost does not depend on their values. Spec `+` joins
several matched_params entries. Writes benchmarks/results/xstep-<machine>-<timestamp>.json
(or --out; --quick or the tiny model → xstep-smoke.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import save  # noqa: E402

LAST = "final_norm+last_blocks:1"  # what the non-private recipe matches
SK_LAST = "sketch:16x16:0:last_blocks:1"  # the private recipe's generator space
SK_MID = "sketch:16x16:0:middle_blocks"  # the margin probe's space (where the classes separate)
ROWS = [
    f"{LAST}/0/0",
    f"{LAST}/0/2",
    f"{SK_LAST}/0/0",
    f"{SK_LAST}/0/2",
    f"{SK_LAST}/1/2",
    f"{SK_MID}/0/0",
    f"{SK_MID}/0/2",
    f"{SK_MID}/0/1",
    f"{SK_MID}/1/2",
]
QUICK = [f"{SK_LAST}/0/0", f"{SK_LAST}/0/2", f"{SK_LAST}/1/2"]


def one_row(a) -> dict:
    """The child process: time the row a.one = SPEC/BETA/CHUNK."""
    import torch

    from gmtext.data import Task
    from gmtext.gradients import MatchedParams
    from gmtext.matching.objective import MatchingObjective
    from gmtext.models import load_model

    spec, beta, chunk = a.one.rsplit("/", 2)
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    task = Task(lm.tokenizer, "{text} It was", ["neg", "pos"], [" bad", " great"], start_token="<|endoftext|>")
    mp = MatchedParams(lm.model, spec.split("+"))
    g = torch.Generator().manual_seed(0)
    targets = [[torch.randn(p.shape, generator=g) for p in mp.params] for _ in range(2)]
    obj = MatchingObjective(
        lm.model,
        mp,
        targets,
        task.label_token_ids,
        task.prefix_ids,
        task.suffix_ids,
        closed_form=False,
        match_loss="verbalizer",
        contrastive=float(beta),
        seq_chunk=int(chunk),
    )
    x0 = 0.02 * torch.randn(2, a.batch, a.length, lm.model.config.hidden_size, generator=g)

    def step():
        x = x0.clone().requires_grad_(True)
        d, _, _ = obj.losses(x, objective="sequence")
        d.sum().backward(inputs=[x])
        return d.detach(), x.grad

    times, out = [], None
    for i in range(4):  # one warm-up, then 3 timed
        t = time.perf_counter()
        out = step()
        if i:
            times.append(time.perf_counter() - t)
    return {
        "spec": spec,
        "contrastive": float(beta),
        "seq_chunk": int(chunk),
        "matched_numel": sum(p.numel() for p in mp.params),
        "seconds": statistics.median(times),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "distance": out[0].tolist(),
        "grad": out[1].flatten()[:: max(1, out[1].numel() // 4096)].tolist(),  # a sample, to compare chunked rows
    }


def run_row(a, row: str) -> dict:
    cmd = [sys.executable, __file__, "--one", row, "--model", a.model, "--threads", str(a.threads)]
    cmd += ["--batch", str(a.batch), "--length", str(a.length), "--mem-limit-gib", str(a.mem_limit_gib)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        over = "MemoryError" in p.stderr or "DefaultCPUAllocator" in p.stderr
        spec, beta, chunk = row.rsplit("/", 2)
        if not over:
            raise RuntimeError(f"row {row} failed:\n{p.stderr[-3000:]}")
        return {"spec": spec, "contrastive": float(beta), "seq_chunk": int(chunk), "over_memory_limit": True}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=10, help="sequences per class (the recipe's batch_size)")
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--mem-limit-gib", type=float, default=12.0)
    ap.add_argument("--rows", nargs="*", default=None, help="SPEC/BETA/CHUNK, e.g. sketch:16x16:0:last_blocks:1/0/2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        lim = int(a.mem_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        print(json.dumps(one_row(a)))
        return {}
    rows = [run_row(a, r) for r in (a.rows or (QUICK if a.quick else ROWS))]
    # chunks must not change the numbers: compare every chunked row with its unchunked twin
    ref = {(r["spec"], r["contrastive"]): r for r in rows if r["seq_chunk"] == 0 and "seconds" in r}
    print(f"{'matched':<34} {'numel':>9} {'β':>4} {'chunk':>5} {'s / iteration':>14} {'peak RSS GiB':>13}")
    for r in rows:
        base = ref.get((r["spec"], r["contrastive"]))
        if base is not None and r is not base and "seconds" in r:
            import torch

            d = (torch.tensor(r["distance"]) - torch.tensor(base["distance"])).abs().max().item()
            g0, g1 = torch.tensor(base["grad"]), torch.tensor(r["grad"])
            r["max_abs_diff_distance"] = d
            r["rel_diff_grad"] = ((g1 - g0).norm() / g0.norm()).item()
            r["speedup_vs_unchunked"] = base["seconds"] / r["seconds"]
        secs = f"{r['seconds']:.2f}" if "seconds" in r else f"> {a.mem_limit_gib:g} GiB"
        rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "over limit"
        numel = r.get("matched_numel", "")
        print(f"{r['spec']:<34} {numel:>9} {r['contrastive']:>4g} {r['seq_chunk']:>5} {secs:>14} {rss:>13}")
    for r in rows:
        r.pop("grad", None)
    settings = {"batch_per_class": a.batch, "classes": 2, "length": a.length, "mem_limit_gib": a.mem_limit_gib}
    return save("xstep", "xstep", a, "random embeddings and random targets", rows, settings=settings)


if __name__ == "__main__":
    main()
