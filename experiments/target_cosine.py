"""Research only: cosine between a DP release's noisy targets and the noiseless ones.

    python experiments/target_cosine.py --clean RUN_EPSINF RUN_DP [RUN_DP ...] [--out JSON]

RUN_EPSINF is a run dir of experiment=rt_private_n100_epsinf (the same records, sketched
spaces and clip norm, no noise; records are seed-independent, so one serves every seed).
For each DP run dir and each of its releases (release/, probe/), prints per class the cosine
between the noisy and the clean target over all matched coordinates. The clean targets are
computed from the private data without noise: they and this measurement never ship with a
private release (docs/results.md reports them as a diagnostic of the mechanism).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gmtext.privacy.release import Release  # noqa: E402


def cosines(noisy: Release, clean: Release) -> list[float]:
    if noisy.param_names != clean.param_names:
        raise SystemExit(
            "target_cosine: the releases match different parameters "
            f"({noisy.param_names[:1]} vs {clean.param_names[:1]})"
        )
    flat = lambda tc: torch.cat([t.reshape(-1).double() for t in tc])  # noqa: E731
    return [
        torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0).item()
        for a, b in zip(noisy.targets, clean.targets)
    ]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="DP run dirs (each with release/ and, with a probe, probe/)")
    ap.add_argument("--clean", required=True, help="the noiseless run dir (experiment=rt_private_n100_epsinf)")
    ap.add_argument("--out", default=None, help="JSON output path")
    a = ap.parse_args(argv)
    rows = []
    for run in a.runs:
        for part in ("release", "probe"):
            if not (Path(run) / part / "release.json").exists():
                continue
            noisy, clean = Release.load(Path(run) / part), Release.load(Path(a.clean) / part)
            cos = cosines(noisy, clean)
            k = sum(t.numel() for t in noisy.targets[0])
            rows.append(
                {
                    "run": str(run),
                    "part": part,
                    "epsilon": noisy.epsilon,
                    "k": k,
                    "noise_multiplier": next(
                        e["noise_multiplier"] for e in noisy.privacy["ledger"]["entries"] if e["name"] == part
                    ),
                    "cosine_per_class": dict(zip(noisy.label_names, cos)),
                }
            )
            print(f"{run:55s} {part:8s} k={k:>7,d} ε={noisy.epsilon:.3g}  cos " + " / ".join(f"{c:.3f}" for c in cos))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
