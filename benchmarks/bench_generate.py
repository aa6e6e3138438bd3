"""Benchmark gmtext's generation fast paths against the straightforward reference paths.

    python benchmarks/bench_generate.py [--quick] [--device cpu|cuda|auto] [--threads 2]
                                        [--model embedded:smollm2-135m|tiny-llama] [--out PATH]

Every row times a fast path and the reference path it replaces *in the same run*, after a
warm-up, as the median of repeats. Full runs write benchmarks/results/<machine>-<timestamp>.json
and benchmarks/results/latest.json; --quick (or a tiny model) writes benchmarks/results/smoke.json
unless --out is given. Anything extrapolated is said so in its row ("extrapolated").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reference import ReferenceADMM, per_class_objectives, reference_inner_step, reference_init  # noqa: E402

from gmtext.data import Task, load_split  # noqa: E402
from gmtext.gradients import MatchedParams, class_target_gradients, class_target_gradients_loop  # noqa: E402
from gmtext.matching.admm import ADMMMatcher, _clip_per_class  # noqa: E402
from gmtext.matching.objective import MatchingObjective  # noqa: E402
from gmtext.matching.projectors import LMTopKProjector, ProjectionContext, lm_topk_reference  # noqa: E402
from gmtext.matching.vocab import allowed_token_ids  # noqa: E402
from gmtext.models import load_model  # noqa: E402

RT = HERE.parent.parent / "shared" / "data" / "rotten_tomatoes"
TARGETS = {"projection": 20.0, "target_gradients": 3.0, "inner_step": 1.5, "end_to_end": 8.0}
DEMO_RSS_TARGET_GIB = 3.0
LAST_BLOCK = ["final_norm", "last_blocks:1"]
HEAD = ["lm_head"]


# ----------------------------------------------------------------------------- helpers
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, warmup: int, repeats: int, warm_fn=None) -> tuple[float, list[float], object]:
    """Median of `repeats` timed calls after `warmup` untimed ones (`warm_fn`, when given, is a
    smaller call of the same code used as warm-up for slow reference paths)."""
    out = None
    for _ in range(warmup):
        out = (warm_fn or fn)()
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def rss_gib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux: KiB


def machine_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return socket.gethostname().split(".")[0] or platform.node()


def machine_description(dev, threads) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {threads}, torch {torch.__version__}"
    if dev.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(dev)}"
    return desc


def real_texts(n_per_class: int) -> tuple[list[list[str]], str]:
    names = ["negative", "positive"]
    if (RT / "train.jsonl").exists():
        split, src = load_split("train", names, path=str(RT)), f"rotten_tomatoes train ({RT})"
    else:
        split, src = load_split("train", names, builtin="demo"), "builtin demo set (repeated)"
    out = []
    for exs in split.by_class(2):
        t = [e.text for e in exs]
        while len(t) < n_per_class:
            t = t + t
        out.append(t[:n_per_class])
    return out, src


class Bench:
    def __init__(self, args, dev):
        self.args, self.dev, self.rows = args, dev, []
        self.rf = args.repeats
        self.rr = args.ref_repeats

    def row(self, key, name, fast_s, ref_s, fast_desc, ref_desc, target=None, extrapolated=None, **extra):
        sp = ref_s / fast_s if fast_s > 0 else float("inf")
        r = {
            "key": key,
            "name": name,
            "fast_s": fast_s,
            "ref_s": ref_s,
            "speedup": sp,
            "fast": fast_desc,
            "ref": ref_desc,
            "target": target,
            "met": (sp >= target) if target else None,
            "extrapolated": extrapolated,
            **extra,
        }
        self.rows.append(r)
        flag = "" if target is None else ("  ok" if sp >= target else f"  BELOW {target}x")
        print(f"  {name:<46} fast {fast_s:9.3f} s | ref {ref_s:9.3f} s | {sp:7.1f}x{flag}", flush=True)
        return r


# ----------------------------------------------------------------------------- sections
def bench_targets(b: Bench, model, task, texts, mtt):
    out = {}
    for label, specs in (("last block + final norm", LAST_BLOCK), ("LM head only", HEAD)):
        mp = MatchedParams(model, specs)
        tf, _, fast = timeit(
            lambda: class_target_gradients(model, task, mp, texts, batch_size=16, max_text_tokens=mtt), b.dev, 1, b.rf
        )
        tr, _, ref = timeit(
            lambda: class_target_gradients_loop(model, task, mp, texts, max_text_tokens=mtt),
            b.dev,
            1,
            b.rr,
            warm_fn=lambda: class_target_gradients_loop(model, task, mp, [t[:2] for t in texts], max_text_tokens=mtt),
        )
        err = max(
            ((x - y).norm() / y.norm().clamp_min(1e-20)).item()
            for gf, gr in zip(fast.grads, ref.grads)
            for x, y in zip(gf, gr)
        )
        key = "target_gradients" if specs is LAST_BLOCK else "target_gradients_head"
        b.row(
            key,
            f"target gradients ({label})",
            tf,
            tr,
            "class_target_gradients (batched, 16/chunk)",
            "class_target_gradients_loop (one example at a time)",
            TARGETS["target_gradients"] if key == "target_gradients" else None,
            max_rel_diff=err,
        )
        out[key] = (tf, tr)
    return out


def bench_dp(b: Bench, model, task, texts, mtt):
    try:
        from gmtext.privacy.mechanism import clipped_sum
    except Exception as e:  # colleague's module not ready
        print(f"  DP per-example clipping skipped: {e!r}")
        return {"skipped": repr(e)}
    for label, specs, fast_method in (
        ("last block + final norm", LAST_BLOCK, "vmap"),
        ("LM head only", HEAD, "closed_form"),
    ):
        mp = MatchedParams(model, specs)
        txt = texts[0]
        lid = task.label_token_ids[0]
        try:
            tf, _, f = timeit(lambda: clipped_sum(model, task, mp, txt, lid, 1.0, mtt, 16, fast_method), b.dev, 1, b.rf)
            tr, _, r = timeit(
                lambda: clipped_sum(model, task, mp, txt, lid, 1.0, mtt, 16, "loop"),
                b.dev,
                1,
                b.rr,
                warm_fn=lambda: clipped_sum(model, task, mp, txt[:2], lid, 1.0, mtt, 16, "loop"),
            )
        except Exception as e:
            print(f"  DP ({label}) skipped: {e!r}")
            b.rows.append({"key": f"dp_{fast_method}", "name": f"DP clipped per-example ({label})", "skipped": repr(e)})
            continue
        err = max(((x - y).norm() / y.norm().clamp_min(1e-20)).item() for x, y in zip(f.sums, r.sums))
        b.row(
            f"dp_clipped_{fast_method}",
            f"DP clipped per-example, 1 class ({label})",
            tf,
            tr,
            f"clipped_sum method={fast_method}",
            "clipped_sum method=loop",
            None,
            max_rel_diff=err,
            examples=len(txt),
        )
    return {}


def make_x(model, ctx, c, bsz, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = ctx.allowed_ids[torch.randint(len(ctx.allowed_ids), (c, bsz, length), generator=g).to(ctx.allowed_ids.device)]
    with torch.no_grad():
        x = model.get_input_embeddings()(ids).float()
        x = x + 0.3 * x.std() * torch.randn(x.shape, generator=g).to(x.device)
    return x


def inner_step_diff(fast_obj, refs, x0) -> float:
    """Largest relative difference, over classes, between the fast and the reference path's
    matching loss and x-gradient at the same x: the row times two ways of computing one thing."""
    xf = x0.clone().requires_grad_(True)
    d, _, _ = fast_obj.losses(xf)
    d.sum().backward(inputs=[xf])
    errs = []
    for k, obj in enumerate(refs):
        xk = x0[k].clone().requires_grad_(True)
        dk, _, _ = obj.losses(xk[None])
        dk.sum().backward()
        errs.append(((xf.grad[k] - xk.grad).norm() / xk.grad.norm().clamp_min(1e-20)).item())
        errs.append(abs(d[k].item() - dk.item()) / max(abs(dk.item()), 1e-20))
    return max(errs)


def bench_inner(b: Bench, model, task, targets_by_specs, ctx, c, bsz, length):
    res = {}
    for label, specs in (("LM head", HEAD), ("last block + final norm", LAST_BLOCK)):
        mp = MatchedParams(model, specs)
        tg = targets_by_specs[tuple(specs)]
        fast_obj = MatchingObjective(
            model, mp, tg, task.label_token_ids, task.prefix_ids, task.suffix_ids, closed_form=True
        )
        refs = per_class_objectives(model, mp, tg, task)
        x0 = make_x(model, ctx, c, bsz, length, 1)
        err = inner_step_diff(fast_obj, refs, x0)
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.008)

        def fast():
            opt.zero_grad()
            d, _, _ = fast_obj.losses(x)
            d.sum().backward(inputs=[x])  # as ADMMMatcher.run does
            _clip_per_class(x.grad, 1.0)
            opt.step()

        xs = [x0[k].clone().requires_grad_(True) for k in range(c)]
        opts = [torch.optim.Adam([xk], lr=0.008) for xk in xs]
        tf, _, _ = timeit(fast, b.dev, 1, b.rf)
        tr, _, _ = timeit(lambda: reference_inner_step(refs, xs, opts), b.dev, 1, b.rr)
        if specs is HEAD:
            b.row(
                "inner_step",
                f"ADMM inner step, {label} (C={c}, B={bsz}, L={length})",
                tf,
                tr,
                "closed-form head objective, classes batched",
                "autograd double backward, one class at a time",
                TARGETS["inner_step"],
                closed_form=fast_obj.closed_form,
                max_rel_diff=err,
            )
        else:
            b.row(
                "inner_step_last_block",
                f"ADMM inner step, {label} (C={c}, B={bsz}, L={length})",
                tf,
                tr,
                "autograd double backward, classes batched",
                "autograd double backward, one class at a time",
                None,
                max_rel_diff=err,
            )
        res[tuple(specs)] = (tf, tr)
    return res


def bench_projection(b: Bench, model, ctx, n, length, topk):
    x = make_x(model, ctx, 1, n, length, 2)[0]
    proj = LMTopKProjector(topk=topk)
    tf, _, fast = timeit(lambda: proj(x, ctx), b.dev, 1, b.rf)
    tr, _, ref = timeit(
        lambda: lm_topk_reference(x, ctx, topk), b.dev, 1, b.rr, warm_fn=lambda: lm_topk_reference(x[:1], ctx, topk)
    )
    same = bool(torch.equal(fast, ref))
    b.row(
        "projection",
        f"LM top-{topk} projection (N={n}, L={length})",
        tf,
        tr,
        "LMTopKProjector (KV cache, batched rows)",
        "lm_topk_reference (per row, re-encode prefix per position)",
        TARGETS["projection"],
        identical_tokens=same,
    )
    if not same and b.args.dtype == "float32" and b.args.autocast == "none":
        # in fp32 the two paths must agree exactly; in bf16 near-ties may flip (recorded, not fatal)
        raise AssertionError("cached projection differs from the reference projection")
    # what projector.beam=4 costs: not a speed-up, the price of the joint search (no target)
    proj4 = LMTopKProjector(topk=topk, sim_weight=5.0, beam=4)
    proj1 = LMTopKProjector(topk=topk, sim_weight=5.0)
    t1, _, _ = timeit(lambda: proj1(x, ctx), b.dev, 1, b.rf)
    t4, _, _ = timeit(lambda: proj4(x, ctx), b.dev, 1, b.rf)
    b.row(
        "projection_beam",
        f"beam-4 projection, cost (N={n}, L={length})",
        t1,
        t4,
        "one token at a time (sim_weight 5)",
        "projector.beam=4 (sim_weight 5): ratio = beam's cost, not a speed-up",
    )
    return same


def bench_init(b: Bench, model, task, tg_head, ctx, c, bsz, length, ref_measured, ref_total):
    mp = MatchedParams(model, HEAD)
    obj = MatchingObjective(
        model, mp, tg_head, task.label_token_ids, task.prefix_ids, task.suffix_ids, closed_form=True
    )
    refs = per_class_objectives(model, mp, tg_head, task)
    m = ADMMMatcher(init_candidates=4)
    tf, _, _ = timeit(
        lambda: m.initial_tokens(obj, ctx, c, bsz, length, torch.Generator().manual_seed(0)), b.dev, 1, b.rf
    )
    reference_init(refs, ctx, bsz, length, 2, torch.Generator().manual_seed(0))  # warm-up
    sync(b.dev)
    t = time.perf_counter()
    reference_init(refs, ctx, bsz, length, ref_measured, torch.Generator().manual_seed(0))
    sync(b.dev)
    measured = time.perf_counter() - t
    tr = measured * ref_total / ref_measured
    ex = (
        None
        if ref_measured == ref_total
        else f"timed {ref_measured} candidate batches per class ({measured:.2f} s), scaled linearly to {ref_total}"
    )
    b.row(
        "init",
        f"initialisation (C={c}, B={bsz}, L={length})",
        tf,
        tr,
        "4 LM samples per row, batched closed-form scoring",
        f"{ref_total} random candidate batches per class, each scored by an autograd gradient",
        None,
        extrapolated=ex,
        ref_measured_s=measured,
        ref_candidates_measured=ref_measured,
        ref_candidates_total=ref_total,
    )
    return tf, tr, measured


def bench_end_to_end(
    b: Bench, model, task, texts, mtt, ctx, c, bsz, length, outer, inner, topk, init_ref_s, ref_outer_measured
):
    n_syn = c * bsz
    mp = MatchedParams(model, HEAD)
    # ---- gmtext: batched targets + ADMMMatcher.run (closed form, cached projection once per outer step)
    sync(b.dev)
    t0 = time.perf_counter()
    tg = class_target_gradients(model, task, mp, texts, batch_size=16, max_text_tokens=mtt).grads
    t_tg = time.perf_counter() - t0
    obj = MatchingObjective(model, mp, tg, task.label_token_ids, task.prefix_ids, task.suffix_ids, closed_form=True)
    k_fast = min(outer, b.args.e2e_outer_measured or outer)
    m = ADMMMatcher(outer_steps=k_fast, inner_steps=inner, init_candidates=4, closed_form=True)
    res = m.run(obj, LMTopKProjector(topk=topk), ctx, c, bsz, length, torch.Generator().manual_seed(0))
    sync(b.dev)
    fast_total = time.perf_counter() - t0
    fast_parts = {"target_gradients": t_tg, **{k: v for k, v in res.timings.items()}}
    fast_ex = None
    if k_fast < outer:  # scale everything after init (conservative: the final evaluation is scaled too)
        fast_total = t_tg + res.timings["init"] + (res.timings["total"] - res.timings["init"]) * outer / k_fast
        fast_ex = f"gmtext ran {k_fast} of {outer} outer steps; time after init scaled x{outer / k_fast:g}"
    # ---- reference structure
    sync(b.dev)
    t0 = time.perf_counter()
    tg_r = class_target_gradients_loop(model, task, mp, texts, max_text_tokens=mtt).grads
    t_tg_r = time.perf_counter() - t0
    refs = per_class_objectives(model, mp, tg_r, task)
    tok0 = ADMMMatcher(init="random", init_candidates=1).initial_tokens(
        obj, ctx, c, bsz, length, torch.Generator().manual_seed(0)
    )
    state = ReferenceADMM(refs, ctx, tok0, topk)
    per_outer = []
    parts = {"project": 0.0, "x_step": 0.0, "evaluate": 0.0}
    for _ in range(ref_outer_measured):
        sync(b.dev)
        t = time.perf_counter()
        p = state.outer_step(inner)
        sync(b.dev)
        per_outer.append(time.perf_counter() - t)
        for k in parts:
            parts[k] += p[k]
    t_outer = statistics.mean(per_outer)
    ref_total = t_tg_r + init_ref_s + outer * t_outer
    ex = fast_ex
    if ref_outer_measured < outer:
        ex = (
            f"reference ran {ref_outer_measured} of {outer} outer steps (mean {t_outer:.2f} s each, scaled x{outer}); "
            f"its init is the init row's reference time ({init_ref_s:.1f} s, itself "
            f"{'extrapolated' if b.args.init_ref_measured < 500 else 'measured'}); "
            f"target gradients measured in full ({t_tg_r:.1f} s)"
        ) + (f"; {fast_ex}" if fast_ex else "")
    b.row(
        "end_to_end",
        f"end to end per synthetic example ({outer}x{inner}, C={c}, B={bsz}, L={length})",
        fast_total / n_syn,
        ref_total / n_syn,
        "batched targets + ADMMMatcher.run (closed form, cached projection x1/outer)",
        "loop targets + 500-candidate init + per-class autograd ADMM + reference projection x2/outer",
        TARGETS["end_to_end"],
        extrapolated=ex,
        fast_total_s=fast_total,
        ref_total_s=ref_total,
        fast_parts=fast_parts,
        ref_parts={
            "target_gradients": t_tg_r,
            "init": init_ref_s,
            "outer_step_mean": t_outer,
            **{k: v / ref_outer_measured for k, v in parts.items()},
        },
        synthetic_examples=n_syn,
        fast_final_class_loss=[float(v) for v in res.class_loss],
    )


# The demo runs in a fresh interpreter that reports its own VmHWM (peak RSS of its own address
# space). RUSAGE_CHILDREN is not usable here: exec records the pre-exec high-water mark, and a
# child spawned by this multi-GiB bench process would inherit the bench's RSS.
DEMO_WRAPPER = """
import atexit, resource, sys
def _report():
    kib = None
    try:
        kib = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f'GMTEXT_PEAK_RSS_KIB={kib}', file=sys.stderr, flush=True)
atexit.register(_report)
from gmtext.cli import generate_main
sys.argv = ['gmtext-generate', *sys.argv[1:]]
generate_main()
"""


def demo_rss(args) -> dict:
    """Run a default `gmtext-generate` demo in a child interpreter and read its own peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        overrides = ["logger=none", f"hydra.run.dir={d}", "progress=false"]
        if args.threads:
            overrides.append(f"threads={args.threads}")
        if args.demo_model:
            overrides.append(f"model={args.demo_model}")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", DEMO_WRAPPER, *overrides], capture_output=True, text=True, cwd=d)
        wall = time.perf_counter() - t
    tags = [l for l in p.stderr.splitlines() if l.startswith("GMTEXT_PEAK_RSS_KIB=")]
    peak = int(tags[-1].split("=")[1]) / 2**20 if tags else float("nan")
    out = {
        "command": "gmtext-generate " + " ".join(overrides),
        "returncode": p.returncode,
        "wall_s": wall,
        "peak_rss_gib": peak,
        "peak_rss_source": "child's own /proc/self/status VmHWM",
        "target_gib": DEMO_RSS_TARGET_GIB,
        "met": p.returncode == 0 and peak < DEMO_RSS_TARGET_GIB,
    }
    if p.returncode != 0:
        out["stderr_tail"] = p.stderr[-2000:]
    else:
        out["stdout_tail"] = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else []
    print(
        f"  demo gmtext-generate: rc={p.returncode}, {wall:.1f} s, "
        f"peak RSS {peak:.2f} GiB (target < {DEMO_RSS_TARGET_GIB})",
        flush=True,
    )
    return out


# ----------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--autocast", default="none", choices=["none", "bf16"], help="run everything under torch.autocast (bf16)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke run)")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default: results/<machine>-<ts>.json + latest.json, or results/smoke.json)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of fast paths (default 3; quick 1)")
    ap.add_argument(
        "--e2e-outer-measured",
        type=int,
        default=None,
        help="measure only this many outer steps of the gmtext end-to-end run and scale (default: all)",
    )
    ap.add_argument("--skip-demo", action="store_true", help="do not run the gmtext-generate demo for its peak RSS")
    ap.add_argument("--demo", action="store_true", help="run the demo RSS measurement even in a smoke run")
    ap.add_argument("--demo-model", default=None, help="model= override for the demo run (e.g. tiny_llama)")
    args = ap.parse_args(argv)
    q = args.quick or args.model == "tiny-llama"
    # sizes: the settings for a full run, small ones for smoke runs
    args.real_per_class = 3 if q else 25
    args.batch = 2 if q else 10
    args.length = 5 if q else 24
    args.topk = 10 if q else 200
    args.outer = 2 if q else 10
    args.inner = 2 if q else 10
    args.init_ref_measured = 2 if q else 50
    args.init_ref_total = 500
    args.ref_outer_measured = 1
    args.repeats = args.repeats or (1 if q else 3)
    args.ref_repeats = 1
    args.smoke = q
    if q and not args.demo:
        args.skip_demo = True
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())  # other processes on the machine skew absolute times (ratios less so)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    dev = next(model.parameters()).device
    task = Task(tok, "{text} It was", ["negative", "positive"], [" bad", " great"], start_token="<|endoftext|>")
    texts, src = real_texts(args.real_per_class)
    mtt = 64
    emb = model.get_input_embeddings().weight
    ctx = ProjectionContext(model, emb, allowed_token_ids(tok, emb.shape[0]), task.prefix_ids)
    c = 2
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "device",
            "dtype",
            "autocast",
            "threads",
            "quick",
            "real_per_class",
            "batch",
            "length",
            "topk",
            "outer",
            "inner",
            "init_ref_measured",
            "init_ref_total",
            "ref_outer_measured",
            "repeats",
            "ref_repeats",
        )
    }
    settings.update(
        classes=c,
        real_examples=c * args.real_per_class,
        real_source=src,
        max_text_tokens=mtt,
        template="{text} It was",
        verbalizers=[" bad", " great"],
        warmup="1 call (slow references: the same call on 1-2 rows/examples)",
        statistic="median of repeats",
        resolved_device=str(dev),
        model_fingerprint=lm.fingerprint,
    )
    print(f"gmtext bench: {args.model} on {dev} ({machine_description(dev, torch.get_num_threads())})", flush=True)
    b = Bench(args, dev)
    if args.autocast == "bf16":
        torch.autocast(dev.type, dtype=torch.bfloat16).__enter__()  # for the whole run

    print("target gradients:", flush=True)
    bench_targets(b, model, task, texts, mtt)
    print("DP per-example clipped gradients:", flush=True)
    bench_dp(b, model, task, texts, mtt)
    targets_by_specs = {}
    for specs in (HEAD, LAST_BLOCK):
        mp = MatchedParams(model, specs)
        targets_by_specs[tuple(specs)] = class_target_gradients(model, task, mp, texts, 16, mtt).grads
    print("projection:", flush=True)
    bench_projection(b, model, ctx, args.batch, args.length, args.topk)
    print("inner step:", flush=True)
    bench_inner(b, model, task, targets_by_specs, ctx, c, args.batch, args.length)
    print("initialisation:", flush=True)
    _, init_ref_s, _ = bench_init(
        b,
        model,
        task,
        targets_by_specs[tuple(HEAD)],
        ctx,
        c,
        args.batch,
        args.length,
        args.init_ref_measured,
        args.init_ref_total,
    )
    print("end to end:", flush=True)
    bench_end_to_end(
        b,
        model,
        task,
        texts,
        mtt,
        ctx,
        c,
        args.batch,
        args.length,
        args.outer,
        args.inner,
        args.topk,
        init_ref_s,
        args.ref_outer_measured,
    )
    peak = rss_gib()
    demo = None
    if not args.skip_demo:
        print("demo run:", flush=True)
        demo = demo_rss(args)

    speedups = {r["key"]: r["speedup"] for r in b.rows if "speedup" in r}
    proj = next(r for r in b.rows if r["key"] == "projection")
    result = {
        "speedups": speedups,
        "targets": TARGETS,
        "targets_met": {k: speedups.get(k, 0) >= v for k, v in TARGETS.items()},
        "peak_rss_gib": peak,
        "demo": demo,
        "demo_peak_rss_gib": demo["peak_rss_gib"] if demo else None,
        "projection_identical": proj["identical_tokens"],
        "machine": machine_description(dev, torch.get_num_threads()),
        "machine_name": machine_name(dev),
        "device": str(dev),
        "settings": settings,
        "rows": b.rows,
        "bench_wall_s": time.perf_counter() - t_start,
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write(result, args)
    print_table(result)
    return result


def write(result, args):
    res_dir = HERE / "results"
    if args.out:
        paths = [Path(args.out)]
    elif args.smoke:
        paths = [res_dir / "smoke.json"]
    else:
        ts = time.strftime("%Y%m%d-%H%M%S")
        paths = [res_dir / f"{result['machine_name']}-{ts}.json", res_dir / "latest.json"]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {p}")


def print_table(result):
    print()
    print(f"{'row':<62} {'fast s':>10} {'ref s':>10} {'speedup':>8} {'target':>7}")
    for r in result["rows"]:
        if "speedup" not in r:
            print(f"{r['name']:<62} skipped: {r.get('skipped')}")
            continue
        tgt = f"{r['target']:.1f}x" if r["target"] else ""
        mark = "" if r["met"] is None else (" ok" if r["met"] else " MISS")
        ext = " *" if r.get("extrapolated") else ""
        print(
            f"{r['name'][:62]:<62} {r['fast_s']:>10.3f} {r['ref_s']:>10.3f} {r['speedup']:>7.1f}x {tgt:>7}{mark}{ext}"
        )
    print(f"peak RSS (bench process): {result['peak_rss_gib']:.2f} GiB")
    if result["demo"]:
        print(
            f"peak RSS (gmtext-generate demo): {result['demo_peak_rss_gib']:.2f} GiB "
            f"(target < {DEMO_RSS_TARGET_GIB} GiB)"
        )
    print("* = reference side partly extrapolated (see the row's 'extrapolated' field)")


if __name__ == "__main__":
    main()
