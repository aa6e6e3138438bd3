"""Which sketched gradient space (layers, k) should the DP release use? Separability, noise, time.

python experiments/sketch_release.py [--per-class 200] [--heldout 400] [--out experiments/results/sketch]

One pass over real train examples (rotten tomatoes, embedded SmolLM2-135M, verbalizer loss,
2 threads) with a 32x32 sketch branch (gmtext/sketch.py) on every nn.Linear of every block
records per-example ∂L/∂G for each of the 210 matrices. Smaller k per matrix are read off the
same pass: the first k columns of a Gaussian P with N(0, 1/32) entries, rescaled by √(32/k),
are a Gaussian P with N(0, 1/k) entries, i.e. exactly a k-sketch drawn from another seed
(statistically the construction the code builds for sketch:KxK; not bit-identical to it).
Layer sets are subsets of the matrices.

For every (layer set, k):
* separability: class targets = clipped (here: normalised, every example clipped) sums of
  `--per-class` examples per class; held-out train texts are classified by the label-fit rule
  of gmtext/matching/rescore.py (the label j whose target cos(g_i under j, T_j) is largest;
  with the verbalizer loss on two classes, g_i under label 1 = −(p0/p1)·g_i under label 0, so
  one gradient per text suffices). Reported for the tensor-averaged cosine the matcher uses.
* noisy-vs-clean: the whole-split release sums N_c ≈ 4,265 clipped gradients per class; its
  clean sum is estimated as N_c × (the clipped mean of our sample), and the release adds
  N(0, σ² I) with σ = z·2C (replace-one, one joint Gaussian over all classes' sums, z from
  calibrate_noise_multiplier(ε, 1e-5, 1, "analytic")), noise drawn with privacy.noise.
  Reported: cos(S_c + noise, S_c) per class (joint over the layer set, and averaged per
  tensor), and the label-fit accuracy with the noisy targets (mean over --draws draws).
* time: separate runs of the actual release path (clipped_sum method sketch_hooks, k=16x16)
  per layer set over `--time-n` texts, extrapolated to the 8,530 train reviews; and the raw
  per-example path (vmap) on the last block's raw parameters over a few texts.
Uses train data only.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYER_SETS = {"last block (29)": r"layers\.29\.", "blocks 10-19": r"layers\.1[0-9]\.", "all blocks": r"layers\."}
KS = (8, 16, 32)
KMAX = 32
SPLIT_PER_CLASS = 4265  # rotten tomatoes train: 8,530 reviews, balanced


def label_fit_acc(g0: list[torch.Tensor], y: torch.Tensor, targets: list[list[torch.Tensor]]) -> float:
    """g0: per tensor [N, D] gradients under label 0; targets[c][t] [D]. Tensor-averaged cosine."""
    cos = []
    for c, tc in enumerate(targets):
        s = torch.stack([torch.nn.functional.cosine_similarity(g, t[None], dim=1) for g, t in zip(g0, tc)]).mean(0)
        cos.append(s if c == 0 else -s)  # under label 1 the gradient is a negative multiple of g0
    return (torch.stack(cos, 1).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    from hydra import compose, initialize_config_module

    from gmtext.config import register_configs
    from gmtext.gradients import MatchedParams
    from gmtext.privacy import mechanism as M
    from gmtext.privacy.accountant import calibrate_noise_multiplier
    from gmtext.privacy.noise import standard_normal
    from gmtext import sketch as S
    from gmtext.runtime import build_task, dataset_split, load_generator_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--time-n", type=int, default=48)
    ap.add_argument("--vmap-n", type=int, default=8)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "rotten_tomatoes"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "sketch"))
    ap.add_argument("--skip-time", action="store_true")
    args = ap.parse_args(argv)
    if not (Path(args.data) / "train.jsonl").exists():
        print(f"sketch_release: {args.data}/train.jsonl not found", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
        cfg = compose("release", ["dataset=rotten_tomatoes", f"dataset.path={args.data}", "match_loss=verbalizer"])
    ds = cfg.dataset
    lm = load_generator_model(cfg)
    model, task = lm.model, build_task(cfg, lm.tokenizer)
    split = dataset_split(ds, ds.train_split)
    exs = list(split.examples)
    random.Random(0).shuffle(exs)
    by_c = [[e.text for e in exs if e.label == c][: args.per_class] for c in range(2)]
    used = {t for c in by_c for t in c}
    held = [e for e in exs if e.text not in used][: args.heldout]
    vocab = torch.tensor(task.label_token_ids)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- one pass: per-example 32x32 sketches of all 210 block matrices
    t0 = time.perf_counter()
    mp = MatchedParams(model, [f"sketch:{KMAX}x{KMAX}:0:{LAYER_SETS['all blocks']}"])
    names = [n.split(".gm_sketch.")[0] for n in mp.names]

    def grads(texts, label):
        order = sorted(range(len(texts)), key=lambda i: len(task.encode_text(texts[i])))
        parts = [None] * len(texts)
        for s in range(0, len(texts), args.chunk):
            idx = order[s : s + args.chunk]
            g = S.per_example_grads_hooks(model, task, mp, [texts[i] for i in idx], label, ds.max_text_tokens, vocab)
            for j, i in enumerate(idx):
                parts[i] = torch.stack([x[j] for x in g])  # [210, 32, 32]
        return torch.stack(parts)  # [N, 210, 32, 32]

    tg = [grads(by_c[c], c) for c in range(2)]
    hg = grads([e.text for e in held], 0)
    y = torch.tensor([e.label for e in held])
    pass_s = time.perf_counter() - t0
    print(f"pass: {sum(len(c) for c in by_c) + len(held)} texts in {pass_s:.0f} s", flush=True)

    rows = []
    for set_name, pat in LAYER_SETS.items():
        li = [i for i, n in enumerate(names) if re.search(pat, n)]
        for k in KS:
            scale = KMAX / k

            def view(g):  # [N, 210, 32, 32] → per tensor [N, k*k] of the chosen layers
                return [g[:, i, :k, :k].reshape(g.shape[0], -1) * scale for i in li]

            t_views = [view(g) for g in tg]
            h_view = view(hg)
            dim = len(li) * k * k
            # clipped (normalised) sums: every example clipped to norm 1 jointly over the layer set
            targets, alphas = [], []
            for tv in t_views:
                nrm = torch.sqrt(sum(v.pow(2).sum(1) for v in tv)).clamp_min(1e-30)
                mean = [(v / nrm[:, None]).mean(0) for v in tv]
                targets.append(mean)
                alphas.append(torch.sqrt(sum(m.pow(2).sum() for m in mean)).item())  # ‖clipped mean‖ / C
            acc_clean = label_fit_acc(h_view, y, targets)
            row = {
                "layers": set_name,
                "regex": pat,
                "matrices": len(li),
                "k_per_matrix": k * k,
                "k": dim,
                "clean_accuracy": acc_clean,
                "alpha": alphas,
            }
            for eps in (1.0, 4.0):
                z = calibrate_noise_multiplier(eps, 1e-5, 1, "analytic")
                sigma = z * 2.0  # C = 1 (normalised gradients), replace-one: Δ = 2C
                cj, ct, accs = [[], []], [[], []], []
                for _ in range(args.draws):
                    noisy = []
                    for c, mean in enumerate(targets):
                        s = [m * SPLIT_PER_CLASS for m in mean]
                        nz = [
                            sn + torch.from_numpy(standard_normal(sn.numel())).float().view_as(sn) * sigma for sn in s
                        ]
                        num = sum((a * b).sum() for a, b in zip(nz, s))
                        den = torch.sqrt(sum(a.pow(2).sum() for a in nz) * sum(b.pow(2).sum() for b in s))
                        cj[c].append((num / den).item())
                        ct[c].append(
                            torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in zip(nz, s)])
                            .mean()
                            .item()
                        )
                        noisy.append(nz)
                    accs.append(label_fit_acc(h_view, y, noisy))
                row[f"eps{eps:g}"] = {
                    "noise_multiplier": z,
                    "cos_joint": [sum(v) / len(v) for v in cj],
                    "cos_tensor_mean": [sum(v) / len(v) for v in ct],
                    "accuracy": sum(accs) / len(accs),
                    "accuracy_draws": accs,
                }
            rows.append(row)
            e1, e4 = row["eps1"], row["eps4"]
            print(
                f"{set_name:16s} k/mat {k * k:5d} k {dim:7d} | clean acc {acc_clean:.3f} | "
                f"alpha {alphas[0]:.3f}/{alphas[1]:.3f} | "
                f"eps1 cos {e1['cos_joint'][0]:.3f}/{e1['cos_joint'][1]:.3f} acc {e1['accuracy']:.3f} | "
                f"eps4 cos {e4['cos_joint'][0]:.3f}/{e4['cos_joint'][1]:.3f} acc {e4['accuracy']:.3f}",
                flush=True,
            )
    res = {
        "per_class": args.per_class,
        "heldout": len(held),
        "pass_seconds": pass_s,
        "threads": args.threads,
        "split_per_class": SPLIT_PER_CLASS,
        "match_loss": "verbalizer",
        "rows": rows,
    }
    (out / "separability_noise.json").write_text(json.dumps(res, indent=2))
    del tg, hg
    S.detach(model)

    # ---- time: the real release path per layer set (16x16), and raw vmap on the last block
    if not args.skip_time:
        texts = [e.text for e in exs[: args.time_n]]
        timing = []
        for set_name, pat in LAYER_SETS.items():
            S.detach(model)
            mps = MatchedParams(model, [f"sketch:16x16:0:{pat}"])
            t0 = time.perf_counter()
            M.clipped_sum(model, task, mps, texts, 0, 1.0, ds.max_text_tokens, args.chunk, "sketch_hooks", vocab)
            dt = time.perf_counter() - t0
            timing.append(
                {
                    "path": f"sketch_hooks 16x16, {set_name}",
                    "k": mps.numel(),
                    "n": len(texts),
                    "seconds": dt,
                    "per_example_ms": 1e3 * dt / len(texts),
                    "full_split_minutes": dt / len(texts) * 2 * SPLIT_PER_CLASS / 60,
                }
            )
            print(timing[-1], flush=True)
        S.detach(model)
        mpr = MatchedParams(model, ["final_norm", "last_blocks:1"])
        vt = texts[: args.vmap_n]
        t0 = time.perf_counter()
        M.clipped_sum(model, task, mpr, vt, 0, 1.0, ds.max_text_tokens, args.vmap_n, "vmap", vocab)
        dt = time.perf_counter() - t0
        timing.append(
            {
                "path": "vmap, raw final_norm + last block",
                "k": mpr.numel(),
                "n": len(vt),
                "seconds": dt,
                "per_example_ms": 1e3 * dt / len(vt),
                "full_split_minutes": dt / len(vt) * 2 * SPLIT_PER_CLASS / 60,
            }
        )
        print(timing[-1], flush=True)
        (out / "timing.json").write_text(json.dumps({"threads": args.threads, "rows": timing}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
