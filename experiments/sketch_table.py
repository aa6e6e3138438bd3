"""Markdown table from sketch_release.py's separability_noise.json (and bench_release JSONs).

python experiments/sketch_table.py experiments/results/sketch/separability_noise.json [bench.json ...] > table.md
"""

from __future__ import annotations

import json
import math
import sys


def noise_table(path: str) -> str:
    d = json.load(open(path))
    n = d["split_per_class"]
    out = [
        f"Targets from {d['per_class']} train reviews per class, label-fit accuracy on {d['heldout']} held-out train "
        f"reviews; noisy targets: the clipped sum of all {n} reviews per class (estimated as {n} × the clipped mean of "
        f"the sample, C = 1 with every example clipped) + N(0, (z·2C)² I), mean of the noise draws.",
        "",
        (
            "| layers | matrices | k per matrix | k | clean acc | α (neg/pos) | "
            "ε=1: cos(noisy, clean) | ε=1: acc | ε=4: cos(noisy, clean) | ε=4: acc |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        e1, e4 = r["eps1"], r["eps4"]
        c = lambda e: "/".join(f"{v:.3f}" for v in e["cos_joint"])
        out.append(
            f"| {r['layers']} | {r['matrices']} | {r['k_per_matrix']} | {r['k']:,} | {r['clean_accuracy']:.3f} | "
            f"{r['alpha'][0]:.3f}/{r['alpha'][1]:.3f} | {c(e1)} | {e1['accuracy']:.3f} | "
            f"{c(e4)} | {e4['accuracy']:.3f} |"
        )
    return "\n".join(out)


def bench_table(paths) -> str:
    out = [
        (
            "| path | k | texts timed | wall ms/text | all 8,530: wall, extrapolated | "
            "all 8,530: CPU time / 2 threads | load avg (1 min) at end |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in paths:
        d = json.load(open(p))
        for r in d["rows"]:
            out.append(
                f"| {r['path']} | {r['k']:,} | {r['texts_timed']} | {r['ms_per_example']:.0f} | "
                f"{r['split_minutes_extrapolated']:.0f} min | {r.get('split_minutes_from_cpu', math.nan):.0f} min | "
                f"{d['load_average_end'][0]:.1f} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    print(noise_table(sys.argv[1]))
    if len(sys.argv) > 2:
        print()
        print(bench_table(sys.argv[2:]))
