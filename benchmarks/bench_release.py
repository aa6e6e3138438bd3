"""Benchmark the release's per-example clipped sums: sketch hooks vs vmap (sketch and raw params).

    python benchmarks/bench_release.py [--quick] [--threads 2] [--model embedded:smollm2-135m|tiny-llama]
                                       [--layers REGEX] [--k 16] [--n 64] [--stride 1] [--vmap-n 8] [--out PATH]

Rows (same texts, same run, after one warm-up chunk):
* sketch_hooks: clipped_sum(method="sketch_hooks") on sketch:KxK:0:<layers>, --n texts;
* vmap (sketch): the same parameters through the generic vmap path, --vmap-n texts;
* vmap (raw): final_norm + last block raw parameters (what releases matched before), --vmap-n texts;
* loop (sketch): one backward per example on the sketch parameters, --loop-n texts;
* generator + probe, two passes vs one pass: the private recipe's two sketched releases
  (--gen-layers, --layers) made one after the other, then from one hook pass
  (mechanism.clipped_sums_parts), --n texts each;
* the same one pass under bf16 autocast (target_precision=bfloat16): its speed-up over the
  float32 pass and the cosine of its clipped sums to float32's, per part;
* the one pass again with the previous chunk layout (one length-sorted list cut every --chunk
  records, so a neighbouring dataset shifts every chunk after the changed record), in float32
  and bf16: what grouping chunks by each record's own width (mechanism.chunk_plan) costs (under
  bf16 both layouts pad to the 24-token minimum, so the row measures the grouping alone);
* chunk-mate dependence (--invariance R records): how much one record's computed gradient
  changes when the other records of its chunk change, or when it runs alone, in float32 and bf16
  (exact math: 0). --invariance-only skips the timed rows.
--stride S times every S-th train review (then the first --n of those): the release sorts
records by length, so a stride covers short and long reviews alike where the first --n do not.
--vmap-n 0 / --loop-n 0 skip those rows.
Each row gives ms per example and the wall time for all 8,530 rotten-tomatoes train reviews,
*extrapolated* linearly from the texts it timed (said so in the row). The sketch rows also
check that hooks and vmap give the same clipped sum on their common texts.
Writes benchmarks/results/release-<machine>-<timestamp>.json (or --out; --quick → release-smoke.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import FALLBACK, RT, save  # noqa: E402

SPLIT = 8530


def sorted_plan(task, texts, max_text_tokens, chunk, min_width=0):
    """The layout before mechanism.chunk_plan, timed against it: one length-sorted list cut every
    `chunk` (chunks then depend on the whole split)."""
    order = sorted(range(len(texts)), key=lambda j: len(task.encode_text(texts[j])))
    return [order[i : i + chunk] for i in range(0, len(texts), chunk)]


def chunk_mates(model, task, vocab, order, specs, chunk, records) -> dict:
    """Does a record's computed gradient depend on the other records of its chunk? Exact math
    says no; what the kernels do is measured here per precision (docs/privacy.md): for `records`
    texts of `order` (sorted by length), the largest relative change of the record's gradient,
    against similar-length chunk-mates, with other mates, with the longest texts (more padding)
    and alone."""
    from gmtext import sketch as S
    from gmtext.gradients import MatchedParams

    both = MatchedParams(model, specs)
    dep = {}
    for prec in ("float32", "bfloat16"):
        worst = {"other_mates": 0.0, "longest_mates": 0.0, "alone": 0.0}
        for j in range(1, len(order) - 1, max(1, len(order) // max(records, 1)))[:records]:
            ctx = {
                "similar": [t for t in order[j - 1 : j + chunk] if t is not order[j]][: chunk - 1],
                "other_mates": [t for t in order[:: max(1, len(order) // chunk)] if t is not order[j]][: chunk - 1],
                "longest_mates": [t for t in order[-chunk:] if t is not order[j]][: chunk - 1],
                "alone": [],  # no padding at all, the narrowest chunk
            }
            g = {
                c: torch.cat(
                    [
                        x[0].flatten()
                        for x in S.per_example_grads_hooks(model, task, both, [order[j]] + m, 0, 64, vocab, prec)
                    ]
                )
                for c, m in ctx.items()
            }
            for c in worst:
                worst[c] = max(worst[c], float((g[c] - g["similar"]).norm() / g["similar"].norm()))
        dep[prec] = worst
        print(f"one record's gradient, {prec}: worst relative change vs similar-length chunk-mates {worst}", flush=True)
    return dep


def main(argv=None) -> dict:
    from gmtext import sketch as S
    from gmtext.data import Task, load_split
    from gmtext.gradients import MatchedParams
    from gmtext.models import load_model
    from gmtext.privacy import mechanism as M

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--layers",
        default="middle_blocks",
        help="regex over nn.Linear names to sketch (or middle_blocks, last_blocks:K)",
    )
    ap.add_argument("--k", type=int, default=16, help="k_in = k_out per matrix")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--vmap-n", type=int, default=8)
    ap.add_argument("--loop-n", type=int, default=4)
    ap.add_argument(
        "--gen-layers", default="last_blocks:1", help="the generator's sketched blocks (the probe's: --layers)"
    )
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--stride", type=int, default=1, help="time every S-th train review")
    ap.add_argument("--invariance", type=int, default=6, help="records checked for chunk-mate dependence (0: skip)")
    ap.add_argument("--invariance-only", action="store_true", help="only the chunk-mate check, no timed rows")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.vmap_n, a.loop_n, a.chunk, a.invariance = 8, 4, 2, 4, 2
    if min(a.n, a.vmap_n, a.loop_n, a.chunk) < 0 or min(a.n, a.chunk, a.stride) < 1:
        raise SystemExit(
            f"bench_release: --n {a.n}, --chunk {a.chunk} and --stride {a.stride} must be >= 1, "
            f"--vmap-n {a.vmap_n} and --loop-n {a.loop_n} >= 0"
        )
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    model = lm.model
    task = Task(
        lm.tokenizer, "{text} It was", ["neg", "pos"], [" bad", " great"], start_token="<|endoftext|>"
    )  # conf/dataset/rotten_tomatoes.yaml
    if (RT / "train.jsonl").exists():
        texts = [e.text for e in load_split("train", ["neg", "pos"], path=str(RT)).examples[:: a.stride][: a.n]]
        src = f"rotten_tomatoes train, every {a.stride}. review" if a.stride > 1 else "rotten_tomatoes train"
    else:
        texts, src = FALLBACK[: a.n], "built-in sentences"
    vocab = torch.tensor(task.label_token_ids)
    rows = []

    def timing(path, method, k, n, dt, cpu, **extra):
        # cpu_seconds / threads: what the wall time would be with the cores to ourselves (shared machines)
        return {
            "path": path,
            "method": method,
            "k": k,
            "texts_timed": n,
            "seconds": dt,
            "cpu_seconds": cpu,
            "split_minutes_from_cpu": cpu / max(a.threads, 1) / n * SPLIT / 60,
            "ms_per_example": 1e3 * dt / n,
            "split_minutes_extrapolated": dt / n * SPLIT / 60,
            **extra,
        }

    def row(name, mp, method, tx):
        M.clipped_sum(
            model, task, mp, tx[: a.chunk if method != "vmap" else 2], 0, 1.0, 64, a.chunk, method, vocab
        )  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        cs = M.clipped_sum(model, task, mp, tx, 0, 1.0, 64, a.chunk, method, vocab)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        r = timing(name, method, mp.numel(), len(tx), dt, cpu)
        rows.append(r)
        print(
            f"{name:44s} k={r['k']:>9d} {r['ms_per_example']:>8.0f} ms/ex  "
            f"all {SPLIT}: {r['split_minutes_extrapolated']:>7.1f} min "
            f"(extrapolated from {len(tx)}; from CPU time/threads: {r['split_minutes_from_cpu']:.1f} min)",
            flush=True,
        )
        return cs

    order = sorted(texts, key=lambda t: len(task.encode_text(t)))
    spec = f"sketch:{a.k}x{a.k}:0:{a.layers}"
    if a.invariance_only:
        dep = chunk_mates(
            model, task, vocab, order, [f"sketch:{a.k}x{a.k}:0:{a.gen_layers}", spec], a.chunk, a.invariance
        )
        S.detach(model)
        return _write(a, src, rows, dep)
    # the floor: a no-grad forward of the same texts (every per-example path needs at least this)
    from gmtext.gradients import last_token_loss_fast

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(order), a.chunk):
            ids, mask, last = task.batch(order[i : i + a.chunk], 64)
            last_token_loss_fast(model, ids, mask, last, torch.zeros(len(ids), dtype=torch.long), vocab)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows.append(timing("forward only (no grad), the floor", "none", 0, len(texts), dt, cpu))
    print(
        f"{'forward only (no grad)':44s} {rows[-1]['ms_per_example']:>8.0f} ms/ex  "
        f"all {SPLIT}: {rows[-1]['split_minutes_extrapolated']:.1f} min "
        f"(from CPU time/threads: {rows[-1]['split_minutes_from_cpu']:.1f} min)",
        flush=True,
    )
    mp = MatchedParams(model, [spec])
    row(f"sketch_hooks {a.k}x{a.k} {a.layers}", mp, "sketch_hooks", texts)
    for method, n in (("vmap", a.vmap_n), ("loop", a.loop_n)):
        if n:
            slow = row(f"{method} (sketch) {a.k}x{a.k} {a.layers}", mp, method, texts[:n])
            fast = M.clipped_sum(model, task, mp, texts[:n], 0, 1.0, 64, a.chunk, "sketch_hooks", vocab)
            rows[-1]["max_rel_err_vs_hooks"] = max(
                ((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(fast.sums, slow.sums)
            )
            print(f"  hooks vs {method} clipped sums, max relative error: {rows[-1]['max_rel_err_vs_hooks']:.2e}")
    # the private recipe's two releases: one after the other, then from one pass
    gen = MatchedParams(model, [f"sketch:{a.k}x{a.k}:0:{a.gen_layers}"])
    row(f"generator alone: sketch_hooks {a.gen_layers}", gen, "sketch_hooks", texts)
    mp.activate()
    t0, c0 = time.perf_counter(), time.process_time()
    ref = M.clipped_sums_parts(model, task, [gen, mp], texts, 0, 1.0, 64, a.chunk, vocab)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    probe_alone = next(r for r in rows if r["path"] == f"sketch_hooks {a.k}x{a.k} {a.layers}")
    two = rows[-1]["seconds"] + probe_alone["seconds"]
    k_both = gen.numel() + mp.numel()
    path = f"generator + probe, one pass ({a.gen_layers} + {a.layers})"
    rows.append(
        timing(
            path,
            "sketch_hooks (parts)",
            k_both,
            len(texts),
            dt,
            cpu,
            two_passes_seconds=two,
            speedup_vs_two_passes=two / dt,
        )
    )
    print(
        f"{rows[-1]['path']:44s} {rows[-1]['ms_per_example']:>8.0f} ms/ex  "
        f"all {SPLIT}: {rows[-1]['split_minutes_extrapolated']:.1f} min "
        f"(two passes: {two / len(texts) * SPLIT / 60:.1f} min; {two / dt:.2f}x)",
        flush=True,
    )
    # target_precision=bfloat16: the same one pass under bf16 autocast, right after the float32 one
    t0, c0 = time.perf_counter(), time.process_time()
    low = M.clipped_sums_parts(model, task, [gen, mp], texts, 0, 1.0, 64, a.chunk, vocab, precision="bfloat16")
    dt16, cpu16 = time.perf_counter() - t0, time.process_time() - c0
    flat = lambda cs: torch.cat([t.flatten() for t in cs.sums])
    rows.append(
        timing(
            f"generator + probe, one pass, bf16 autocast ({a.gen_layers} + {a.layers})",
            "sketch_hooks (parts, target_precision=bfloat16)",
            k_both,
            len(texts),
            dt16,
            cpu16,
            speedup_vs_float32_one_pass=dt / dt16,
            # per part (generator, probe): how far bf16's clipped sums are from float32's
            cosine_to_float32=[float(F.cosine_similarity(flat(x), flat(y), 0)) for x, y in zip(low, ref)],
            rel_err_to_float32=[float((flat(x) - flat(y)).norm() / flat(y).norm()) for x, y in zip(low, ref)],
        )
    )
    print(
        f"{rows[-1]['path']:44s} {rows[-1]['ms_per_example']:>8.0f} ms/ex  "
        f"all {SPLIT}: {rows[-1]['split_minutes_extrapolated']:.1f} min ({dt / dt16:.2f}x float32's one pass; "
        f"cosine to it {min(rows[-1]['cosine_to_float32']):.5f})",
        flush=True,
    )
    # the previous chunk layout, same texts, both precisions: what the record-stable plan costs.
    # A sample of --n texts spreads over nearly as many widths as the split, so it has far more
    # partly filled chunks than the split; the split's own chunk counts scale the cost up.
    plan = M.chunk_plan
    split = None
    if (RT / "train.jsonl").exists():
        ex = load_split("train", ["neg", "pos"], path=str(RT)).examples
        split = [[e.text for e in ex if e.label == c] for c in (0, 1)]  # the release chunks each class apart
    for prec, t_new, same in (("float32", dt, ref), ("bfloat16", dt16, low)):
        M.chunk_plan = sorted_plan  # swapped for this timing only (the mechanism looks it up per call)
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            prev = M.clipped_sums_parts(model, task, [gen, mp], texts, 0, 1.0, 64, a.chunk, vocab, precision=prec)
            dto, cpuo = time.perf_counter() - t0, time.process_time() - c0
        finally:
            M.chunk_plan = plan
        rows.append(
            timing(
                f"generator + probe, one pass, {prec}, length-sorted chunks (previous layout)",
                f"sketch_hooks (parts, {prec}, sorted_plan)",
                k_both,
                len(texts),
                dto,
                cpuo,
                chunks=(n_old := len(sorted_plan(task, texts, 64, a.chunk))),
                chunks_width_plan=(n_new := len(plan(task, texts, 64, a.chunk, M.min_width_for(prec)))),
                width_plan_seconds=t_new,
                width_plan_cost=t_new / dto,
                **_split_cost(task, split, a.chunk, M.min_width_for(prec), plan, t_new, dto, n_new - n_old),
                # the same sums either way, up to summation order and (bf16) the padding to min width
                max_rel_err_vs_width_plan=max(
                    float((flat(x) - flat(y)).norm() / flat(y).norm()) for x, y in zip(prev, same)
                ),
            )
        )
        print(
            f"{rows[-1]['path']:44s} {rows[-1]['ms_per_example']:>8.0f} ms/ex; chunks by own width take "
            f"{t_new / dto:.2f}x as long ({rows[-1]['chunks_width_plan']} vs {rows[-1]['chunks']} chunks)"
            + (
                f"; whole split: {rows[-1]['split_chunks_width_plan']} vs {rows[-1]['split_chunks_previous']} "
                f"chunks, about {rows[-1]['split_extra_minutes_modelled']:+.2f} min (modelled)"
                if "split_chunks_previous" in rows[-1]
                else ""
            ),
            flush=True,
        )
    dep = chunk_mates(model, task, vocab, order, [f"sketch:{a.k}x{a.k}:0:{a.gen_layers}", spec], a.chunk, a.invariance)
    S.detach(model)
    if a.vmap_n:
        row(
            "vmap (raw) final_norm + last block",
            MatchedParams(model, ["final_norm", "last_blocks:1"]),
            "vmap",
            texts[: a.vmap_n],
        )
    return _write(a, src, rows, dep)


def _split_cost(task, split, chunk, min_width, plan, t_new, t_old, extra) -> dict:
    """Whole-split chunk counts of both layouts, and the extra minutes the width plan costs
    there if each of the sample's `extra` chunks costs what it cost (a linear model: said so)."""
    if split is None:
        return {}
    new = sum(len(plan(task, t, 64, chunk, min_width)) for t in split)
    old = sum(len(sorted_plan(task, t, 64, chunk)) for t in split)
    per_chunk = (t_new - t_old) / extra if extra > 0 else 0.0
    return {
        "split_chunks_width_plan": new,
        "split_chunks_previous": old,
        "seconds_per_extra_chunk": per_chunk,
        "split_extra_minutes_modelled": per_chunk * (new - old) / 60,
    }


def _write(a, src, rows, dep) -> dict:
    # record_gradient_vs_chunk_mates: per precision, over --invariance records, the largest relative change
    # of one record's per-example gradient when its chunk-mates change (other, longest = more padding, none)
    return save("release_clipped_sums", "release", a, src, rows, split_size=SPLIT, record_gradient_vs_chunk_mates=dep)


if __name__ == "__main__":
    main(sys.argv[1:])
