"""Report: tables (md/csv) and plots (png) across run dirs.

    gmtext-report DIR... [-o OUT] [--ignore KEY ...] [--group-by KEY ...] [--plot-ignore KEY ...] [--paired GROUPS]

Each DIR may be a run dir or any folder above run dirs (a multirun sweep, outputs/, …):
every folder holding `metrics.json` (fine-tune) and/or `generate.json` (generate) is one
run. Its config comes from the artifact (both store the resolved config) or from
`.hydra/config.yaml`. Runs are grouped by the config keys whose values differ between
runs — except the seed and per-run bookkeeping (IGNORED) — and every metric is
aggregated as mean ± std (sample std, ddof=1; 0 for one run) over the group's seeds.

Outputs in OUT (default ./report): report.md, report.csv and, when there is data for
them, accuracy_vs_examples.png, accuracy_vs_epsilon.png, admm_curves.png.
A run without an epsilon (non-private) counts as epsilon = inf.

Paired by seed (`--paired GROUPS`, default `matcher,projector`: the projection is the matcher's
z-step, and a twin never projects): conditions of one stage that differ only in keys under those
groups are compared seed by seed against a reference condition, the
no-matching twin (`matcher=none`) when there is one: the table gives the mean ± std of the
per-seed differences. Seeds vary the real sample, the LM starts and the fine-tuning together,
so the paired difference is much less noisy than the difference of two means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..artifacts import LEGACY_DEFAULTS
from ..config import ADMMConfig, LMSamplesConfig, LMTopKConfig
from ..privacy.ledger import ledger_of
from ..readability import KEYS as READABILITY_KEYS, kept_readability

RUN_FILES = ("metrics.json", "generate.json")
SKIP_DIRS = {"wandb", ".hydra", "release", "batches", "__pycache__", ".submitit"}
# Keys that differ between runs without defining an experimental condition.
IGNORED = (
    "seed",
    "finetuner.seed",
    "train.path",
    "release",
    "progress",
    "threads",
    "matcher.seq_chunk",  # like threads: the same math, another float rounding
    "stage_dir",
    "shard.index",
)
IGNORED_PREFIXES = ("logger.", "hydra.")
METRICS = (
    "accuracy",
    "macro_f1",
    "dev_accuracy",
    "n_train",
    "epsilon",
    "epsilon_replace_one",  # only for add/remove ledgers (DP-SGD calibrated by opacus): the ε that compares
    "mean_match_loss",
    "mean_perplexity",
    *(f"kept_{k}" for k in READABILITY_KEYS),  # the fine-tuned set's readability (gmtext/readability.py)
    "examples",
)
PLOTS = ("accuracy_vs_examples.png", "accuracy_vs_epsilon.png", "admm_curves.png")
X_EXAMPLE_KEYS = ("num_per_class", "train.size", "n_train")
PAIRED_METRICS = ("accuracy", "macro_f1", "mean_perplexity", "kept_median_perplexity", "kept_known_word_rate")
TWIN_TARGET = "gmtext.matching.lm_samples.LMSampleMatcher"  # matcher=none: the reference of a paired comparison


@dataclass
class Run:
    path: Path
    config: dict  # flattened: dotted key → value
    metrics: dict
    steps: list = field(default_factory=list)  # metrics.jsonl kind=step records (generate)

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Group:
    key: tuple  # ((config key, value), ...) over the varying keys
    runs: list  # ordered by (seed, path)
    stats: dict = field(default_factory=dict)  # metric → (mean, std, n) over the runs that have it

    def stat(self, metric: str):
        return self.stats.get(metric)


# ---------------------------------------------------------------- collection
def find_run_dirs(paths) -> list[Path]:
    found = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run dir or folder")
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            if any(f in files for f in RUN_FILES):
                found.append(Path(root))
    return sorted(set(found))


# a run dir's matcher and projector read the later-added keys their schemas have at their legacy values
_SCHEMAS = {c._target_: {f.name for f in fields(c)} for c in (ADMMConfig, LMSamplesConfig, LMTopKConfig)}


def load_run(d: Path) -> Run:
    cfg, metrics, privacy, withheld = None, {}, None, False
    gen = d / "generate.json"
    if gen.exists():
        g = json.loads(gen.read_text())
        cfg = g.get("config")
        metrics.update({k: v for k, v in g.get("summary", {}).items() if k in METRICS})
    fin = d / "metrics.json"
    if fin.exists():
        m = json.loads(fin.read_text())
        cfg, privacy = m.get("config") or cfg, m.get("privacy")
        metrics.update({k: v for k, v in m.items() if k in METRICS and v is not None})
        withheld = "n_train" in m and m["n_train"] is None  # DP-SGD: how many trained is private
    if cfg is None and (d / ".hydra" / "config.yaml").exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "config.yaml"), resolve=False)
    if cfg is None:
        raise ValueError(f"{d}: no config found (neither in {'/'.join(RUN_FILES)} nor .hydra/config.yaml)")
    if metrics.get("epsilon") is None:
        priv = d / "release" / "privacy.json"
        metrics["epsilon"] = float(json.loads(priv.read_text()).get("epsilon", math.inf)) if priv.exists() else math.inf
    metrics["epsilon"] = float(metrics["epsilon"])
    led = ledger_of(privacy)
    if led is not None and led.entries and led.private and led.relation == "add_remove":
        metrics["epsilon_replace_one"] = led.epsilon("replace_one")
    metrics.update({f"kept_{k}": v for k, v in kept_readability(d).items()})  # the fine-tuned set's readability
    flat = {k: _run_relative(v, d) for k, v in flatten(cfg).items()}
    if str(flat.get("train._target_", "")).endswith("DPSGDSource"):  # runs made before the key: opacus, add/remove
        flat.setdefault("train.adjacency", LEGACY_DEFAULTS["train.adjacency"])
    for group in ("matcher", "projector"):  # keys added later: what older runs of that component did
        schema = _SCHEMAS.get(flat.get(f"{group}._target_"), ())
        for k, v in LEGACY_DEFAULTS.items():
            if k.startswith(f"{group}.") and k.removeprefix(f"{group}.") in schema:
                flat.setdefault(k, v)
    if "n_train" not in metrics and "accuracy" in metrics and not withheld:
        metrics["n_train"] = examples_of(flat)
    steps = []
    if (d / "metrics.jsonl").exists() and gen.exists():
        for line in (d / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("kind") == "step" and "outer_step" in rec:  # ADMM steps, not a pipeline's fine-tuning steps
                steps.append(rec)
    return Run(d, flat, metrics, steps)


def _run_relative(v, d: Path):
    """A path inside the run's own dir (a pipeline's probe release, its batches) as `{run}/…`:
    it differs between runs without being a condition, while a shared path outside the run
    dirs (one probe release used by several runs) still is one."""
    if not isinstance(v, str) or "/" not in v:
        return v
    try:
        rel = Path(v).resolve().relative_to(d.resolve())
    except (ValueError, OSError):
        return v
    return f"{{run}}/{rel.as_posix()}" if rel.parts else "{run}"


def examples_of(flat: dict):
    """Number of training examples of a fine-tune run from its config (n_train is preferred)."""
    if flat.get("train.size") is not None:
        return flat["train.size"]
    if flat.get("num_per_class") is not None and flat.get("dataset.label_names"):
        return flat["num_per_class"] * len(json.loads(flat["dataset.label_names"]))
    return None


def flatten(d: dict) -> dict:
    """Dotted key → value; lists as JSON text, so that a value is hashable and one csv cell."""
    (flat,) = pd.json_normalize(d, sep=".").to_dict("records")  # to_dict: Python scalars, not numpy ones
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in flat.items()}


# ---------------------------------------------------------------- frames
def _enc(v) -> str:
    return json.dumps(v, sort_keys=True)


def config_frame(runs) -> pd.DataFrame:
    """One row per run, one column per config key; values as JSON text (1 and "1" differ, lists
    compare by content), NaN where a run has no such key."""
    return pd.DataFrame([{k: _enc(v) for k, v in r.config.items()} for r in runs], index=range(len(runs)), dtype=object)


def metric_frame(runs) -> pd.DataFrame:
    """One row per run, one float column per metric in METRICS (NaN: missing or not a number)."""
    return pd.DataFrame(
        [[float(r.metrics[m]) if _isnum(r.metrics.get(m)) else np.nan for m in METRICS] for r in runs],
        columns=list(METRICS),
        index=range(len(runs)),
        dtype=float,
    )


def runs_frame(runs, keys) -> pd.DataFrame:
    """One row per run: `keys` (JSON text; a missing key reads as null, the same condition as
    an explicit None), seed, path and the metrics. The table is this frame grouped by `keys`;
    a paired comparison of two conditions would merge their rows on `seed`."""
    cfg = config_frame(runs).reindex(columns=list(keys)).fillna(_enc(None))
    ident = pd.DataFrame(
        {"seed": [r.seed for r in runs], "path": [str(r.path) for r in runs], "run": range(len(runs))}, dtype=object
    )
    return pd.concat([cfg, ident, metric_frame(runs)], axis=1)


def varying_keys(runs, ignore=(), group_by=()) -> list[str]:
    """Config keys that take at least two different values among the runs that have them.
    A key present in some runs only (train.k exists for few-shot runs alone, a newer config
    field is missing from older runs) is not a condition of its own. `group_by` keeps keys
    that are skipped by default: two synthetic sets from different generators (GRADMM vs an
    ablation) can differ only in `train.path`, and must not be averaged together."""
    cfg = config_frame(runs)
    skip = (set(IGNORED) | set(ignore)) - set(group_by)
    return [
        k
        for k in sorted(cfg.columns)
        if not (k in skip or (k.startswith(IGNORED_PREFIXES) and k not in group_by)) and cfg[k].nunique(dropna=True) > 1
    ]


def stage_sections(runs, ignore=(), group_by=()) -> list[tuple[str, list[str], list["Group"]]]:
    """(stage, keys, groups) per stage: generation and fine-tuning runs have different
    settings, so each stage's table is grouped by what varies among its own runs."""
    stages = pd.Series([str(r.config.get("stage") or "run") for r in runs])
    order = {"finetune": 0, "pipeline": 1, "generate": 2, "select": 3, "audit": 4}
    out = []
    for stage in sorted(stages.unique(), key=lambda st: (order.get(st, 9), st)):
        sruns = [r for r, st in zip(runs, stages) if st == stage]
        keys = varying_keys(sruns, ignore, group_by)
        out.append((stage, keys, group_runs(sruns, keys)))
    return out


def _mean(s: pd.Series) -> float:
    """Mean over the runs that have the metric; ∞ when all are ∞ (non-private ε), NaN for a
    mix of ∞ and finite values (no meaningful mean)."""
    a = s.dropna().to_numpy(dtype=float)
    if not len(a):
        return np.nan
    if np.isfinite(a).all():
        return float(a.mean())
    return math.inf if (a == np.inf).all() else np.nan


def _std(s: pd.Series) -> float:
    """Sample std (ddof=1); 0 for one run or any non-finite value (the mean says ∞ or NaN)."""
    a = s.dropna().to_numpy(dtype=float)
    return float(a.std(ddof=1)) if len(a) > 1 and np.isfinite(a).all() else 0.0


def group_runs(runs, keys) -> list[Group]:
    """Groups of runs with equal values of `keys`, in _order of their key; each with the
    mean ± std of every metric over its runs (ordered by seed, then path)."""
    runs = sorted(runs, key=lambda r: (str(r.seed), str(r.path)))
    df = runs_frame(runs, keys)
    by = list(keys) or (lambda _: 0)  # no varying key: one group of all runs
    aggs = {f"{m}\t{s}": (m, f) for m in METRICS for s, f in (("mean", _mean), ("std", _std), ("n", "count"))}
    table = df.groupby(by, sort=False, dropna=False).agg(run=("run", list), **aggs)
    groups = []
    for enc, row in table.iterrows():
        enc = enc if isinstance(enc, tuple) else (enc,)
        key = tuple((k, json.loads(v)) for k, v in zip(keys, enc))
        stats = {
            m: (float(row[f"{m}\tmean"]), float(row[f"{m}\tstd"]), int(row[f"{m}\tn"]))
            for m in METRICS
            if row[f"{m}\tn"] > 0
        }
        groups.append(Group(key, [runs[i] for i in row["run"]], stats))
    return sorted(groups, key=lambda g: _order(g.key))


def _order(key):  # numbers numerically, then strings; None last
    return tuple((0, v, "") if _isnum(v) else (1, 0, str(v)) if v is not None else (2, 0, "") for _, v in key)


def paired_rows(stage: str, runs, keys, group: str) -> list[dict]:
    """Seed-paired differences between conditions that differ only in keys under the groups of
    `group` (comma-separated, e.g. `matcher,projector`):
    one row per (context, condition ≠ reference) with the seeds both have and, per metric,
    the mean and std of (condition − reference) over them. The reference is a twin
    (TWIN_TARGET) when present, else the first condition in table order. With several twins
    (e.g. one per matcher.contrastive) a GRADMM condition is paired with the twin that shares
    most of its matcher settings (ties: the first), so each variant meets its own control, and
    the other twins with the twin closest to all conditions."""
    inner = [k for k in keys if k.startswith(_prefixes(group))]
    if not inner:
        return []
    context = [k for k in keys if k not in inner]
    df = runs_frame(runs, keys)
    rows = []
    for ctx, part in df.groupby(context, sort=False, dropna=False) if context else [((), df)]:
        ctx = ctx if isinstance(ctx, tuple) else (ctx,)
        conds = sorted(
            {tuple(r) for r in part[inner].itertuples(index=False)},
            key=lambda c: _order(tuple(zip(inner, map(json.loads, c)))),
        )
        if len(conds) < 2:
            continue
        twins = [c for c in conds if _enc(TWIN_TARGET) in c]
        # the twins' own reference: the one sharing most settings with every condition (the plain
        # control the variants depart from), not the first by sort order; ties: the first
        first = max(twins, key=lambda t: sum(a == b for c in conds for a, b in zip(t, c))) if twins else conds[0]

        def ref_of(cond):
            if cond in twins or not twins:
                return first
            return max(twins, key=lambda t: sum(a == b for a, b in zip(t, cond)))  # max: the first of ties

        def of(cond):
            sel = part[(part[inner] == pd.Series(cond, index=inner)).all(axis=1)]
            return sel.drop_duplicates("seed").set_index("seed")

        for cond in conds:
            ref = ref_of(cond)
            if cond == ref:
                continue
            base, other = of(ref), of(cond)
            seeds = [sd for sd in other.index if sd in base.index]
            if not seeds:
                continue
            row = {
                "stage": stage,
                "context": _settings(context, ctx),
                "condition": _settings(inner, cond),
                "reference": _settings(inner, ref),
                "seeds": " ".join(str(sd) for sd in sorted(seeds, key=str)),
                "pairs": len(seeds),
            }
            for m in PAIRED_METRICS:
                d = (other.loc[seeds, m].astype(float) - base.loc[seeds, m].astype(float)).dropna()
                row[f"d_{m}_mean"], row[f"d_{m}_std"] = (_mean(d), _std(d)) if len(d) else (None, None)
            rows.append(row)
    return rows


def _settings(keys, values) -> str:
    """A condition as `key=value, ...`, leaving out keys its runs do not have (a twin has no ADMM ρ)."""
    return ", ".join(f"{k}={_fmt(json.loads(v))}" for k, v in zip(keys, values) if json.loads(v) is not None)


def _prefixes(group: str) -> tuple[str, ...]:
    """`matcher,projector` → ("matcher.", "projector.")."""
    return tuple(g.strip() + "." for g in group.split(",") if g.strip())


def paired_markdown(rows, group: str) -> list[str]:
    if not rows:
        return []
    ms = [m for m in PAIRED_METRICS if any(r[f"d_{m}_mean"] is not None for r in rows)]
    head = ["stage", "context", "condition", "reference", "seeds"] + [f"Δ {m}" for m in ms]
    lines = [
        "",
        f"## Paired by seed (conditions differing in {' / '.join(p + '*' for p in _prefixes(group))}; "
        "condition − reference, mean ± std over paired seeds)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["stage"], r["context"] or "–", r["condition"], r["reference"], r["seeds"]]
        for m in ms:
            mean, std = r[f"d_{m}_mean"], r[f"d_{m}_std"]
            cells.append("" if mean is None else f"{mean:+.4g} ± {std:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------- tables
def table_rows(groups, keys) -> list[dict]:
    """One dict per group: its key values, runs, seeds and {metric}_mean / _std (None where no
    run of the group has the metric)."""
    rows = []
    for g in groups:
        row = {k: v for k, v in g.key}
        row["runs"] = len(g.runs)
        row["seeds"] = " ".join(str(r.seed) for r in g.runs)
        for m in METRICS:
            s = g.stat(m)
            row[f"{m}_mean"], row[f"{m}_std"] = (s[0], s[1]) if s else (None, None)
        rows.append(row)
    return rows


def present_metrics(rows) -> list[str]:
    return [m for m in METRICS if any(r.get(f"{m}_mean") is not None for r in rows)]


def write_csv(path, rows, keys) -> None:
    ms = present_metrics(rows)
    cols = list(keys) + ["runs", "seeds"] + [f"{m}_{s}" for m in ms for s in ("mean", "std")]
    # object dtype: an int column with gaps stays "5", not "5.0"; None and missing cells are empty
    pd.DataFrame(rows, columns=cols, dtype=object).to_csv(path, index=False, na_rep="", encoding="utf-8")


def markdown(sections, plots, sources, paired=(), group="matcher,projector") -> str:
    """One table per stage: `sections` = [(stage, keys, rows)]; then the seed-paired differences."""
    n = sum(r["runs"] for _, _, rows in sections for r in rows)
    lines = [
        "# gmtext report",
        "",
        f"{n} runs from {', '.join(map(str, sources))}; one table per stage, grouped by "
        "the settings that vary within it; mean ± std over seeds.",
    ]
    for stage, keys, rows in sections:
        ms = present_metrics(rows)
        head = list(keys) + ["runs"] + ms
        lines += [
            "",
            (
                f"## {stage} ({sum(r['runs'] for r in rows)} runs; "
                f"grouped by {', '.join(keys) or 'nothing (one condition)'})"
            ),
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for r in rows:
            cells = [_fmt(r.get(k)) for k in keys] + [str(r["runs"])]
            for m in ms:
                mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
                tiny = not std or abs(std) <= 1e-9 * max(1.0, abs(mean))  # float round-off of equal values
                cells.append("" if mean is None else (_fmt(mean) if tiny else f"{_fmt(mean)} ± {_fmt(std)}"))
            lines.append("| " + " | ".join(cells) + " |")
    lines += paired_markdown(paired, group)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.4g}"
    return str(v)


def _isnum(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


# ---------------------------------------------------------------- plots
def _figure(ncols=1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * ncols + 3, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _short(v):
    """A path value (train.path, pool) by its last component: legends stay readable."""
    return Path(v).name if isinstance(v, str) and "/" in v else v


def _cond(key, drop, shorten: bool) -> tuple:
    return tuple((k, _short(v) if shorten else v) for k, v in key if k not in drop and v is not None)


def _cond_label(cond) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in cond)


METHOD_NAMES = {"dpsgd": "DP-SGD", "none": "zero-shot"}  # train.source → legend name, where it differs
METHOD_MATCHERS = {"ADMMMatcher": "GRADMM", "LMSampleMatcher": "LM samples (no matching)"}


def method_of(cfg: dict) -> str:
    """The method a run stands for, as a legend reader names it: a fine-tune run by its training
    source (real, zero-shot, DP-SGD, synthetic), a generating run by its generator (PE) or matcher
    (GRADMM, its matcher=none twin). Derived from config keys, so it never splits a group."""
    src = cfg.get("train.source")
    if cfg.get("stage") == "finetune" or (cfg.get("stage") is None and src is not None):
        return METHOD_NAMES.get(src, str(src))
    if cfg.get("generator.name") not in (None, "gradmm"):
        return "PE" if cfg["generator.name"] == "pe" else str(cfg["generator.name"])
    matcher = str(cfg.get("matcher._target_", "")).rsplit(".", 1)[-1]
    return METHOD_MATCHERS.get(matcher, matcher or "run")


def _brief(v):
    """A class path by its class name (gmtext.matching.admm.ADMMMatcher → ADMMMatcher)."""
    m = re.fullmatch(r"(?:[a-z_]\w*\.)+([A-Z]\w*)", v) if isinstance(v, str) else None
    return m.group(1) if m else v


def _legend_labels(conds: dict, default: str) -> dict:
    """{cond: legend label}. Each series is named by its method and only the settings that tell
    it apart from the other series of the same method, so a legend over GRADMM, PE and DP-SGD
    reads "GRADMM", "PE", "DP-SGD" rather than every config key the three differ in. Falls back
    to the full key=value list if two series would share a name."""
    by_method: dict = {}
    for c, method in conds.items():
        by_method.setdefault(method, []).append(dict(c))
    labels = {}
    for c, method in conds.items():
        mine = by_method[method]
        keys = [k for k, _ in c if len({json.dumps(d.get(k), default=str) for d in mine}) > 1]
        rest = ", ".join(f"{k}={_fmt(_brief(v))}" for k, v in c if k in keys or len(by_method) == 1)
        # one method only: its name tells the series nothing apart (and the metric is the default)
        labels[c] = rest or default if len(by_method) == 1 else f"{method}: {rest}" if rest else method
    if len(set(labels.values())) < len(labels):
        labels = {c: _cond_label(c) or default for c in conds}
    return labels


def _series(groups, metric, xfn, x_keys, plot_ignore=()) -> dict:
    """{series label: [(x, mean, std), ...]}: one point per group; a series is one condition,
    i.e. the group's key without the x-axis keys (and the --plot-ignore keys), labelled by
    _legend_labels.

    Joining groups over a --plot-ignore key only makes sense when they sit at different x:
    two synthetic sets at the same x are two conditions, and one line through both would
    draw a vertical segment. So a series that would get two points at one x is split again
    by the keys it dropped, apart from the x-axis keys themselves."""
    pts = []
    for g in groups:
        s, x = g.stat(metric), xfn(g)
        if s is not None and x is not None:
            pts.append((g, (float(x), s[0], s[1])))
    drop = set(x_keys) | set(plot_ignore)
    by: dict = {}
    for g, p in pts:
        by.setdefault(_cond(g.key, drop, True), []).append((g, p))
    data, method = {}, {}
    for c, members in by.items():
        xs = [p[0] for _, p in members]
        split = len(set(xs)) != len(xs)  # colliding x: every group of this series is its own condition
        for g, p in members:
            cond = _cond(g.key, set(x_keys), True) if split else c
            data.setdefault(cond, []).append(p)
            method[cond] = method_of(g.runs[0].config)
    if any(len({p[0] for p in v}) < len(v) for v in data.values()):  # short path names collided too
        data, method = {}, {}
        for g, p in pts:
            cond = _cond(g.key, set(x_keys), False)
            data.setdefault(cond, []).append(p)
            method[cond] = method_of(g.runs[0].config)
    labels = _legend_labels(method, metric)
    return {labels[c]: sorted(v) for c, v in sorted(data.items(), key=lambda cv: labels[cv[0]])}


def _draw_all(ax, data, log: bool, xmap=lambda x: x):
    """One errorbar series per condition: a series of one point is a marker (no line), of
    several a line through markers. Series sharing an x are spread a little sideways
    (dodged) so their markers and error bars do not hide each other; the returned data
    keeps the true x."""
    at: dict = {}
    for label, pts in data.items():
        for p in pts:
            at.setdefault(xmap(p[0]), []).append(label)
    xs = sorted(at)
    span = (xs[-1] - xs[0]) or max(abs(xs[0]), 1.0)  # one x only: dodge relative to it
    for i, (label, pts) in enumerate(data.items()):
        x, y, e = [], [], []
        for px, py, pe in pts:
            px = xmap(px)
            k, n = at[px].index(label), len(at[px])
            off = 0.025 * (k - (n - 1) / 2)
            x.append(px * (1 + off) if log else px + off * span)
            y.append(py)
            e.append(pe)
        ax.errorbar(
            x, y, yerr=e, marker="o", capsize=3, label=label, color=f"C{i % 10}", ls="-" if len(pts) > 1 else "none"
        )


def _finish(fig, ax, path):
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)  # outside: full labels
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def plot_accuracy_vs_examples(groups, path, plot_ignore=()):
    """Returns (plotted data, Figure), or None when no group has accuracy and n_train."""
    data = _series(groups, "accuracy", lambda g: (g.stat("n_train") or (None,))[0], X_EXAMPLE_KEYS, plot_ignore)
    if not data:
        return None
    fig, (ax,) = _figure()
    xs = sorted({p[0] for v in data.values() for p in v})
    log = xs[0] > 0 and xs[-1] / xs[0] >= 10  # log only where it spreads points (0 examples has no log position)
    if log:
        ax.set_xscale("log")
    _draw_all(ax, data, log)
    ax.set_xticks(xs, [_fmt(int(x) if float(x).is_integer() else x) for x in xs])
    ax.xaxis.set_minor_locator(_null_locator())
    ax.set_xlabel("training examples (synthetic or real)")
    ax.set_ylabel("accuracy")
    _finish(fig, ax, path)
    return data, fig


def plot_accuracy_vs_epsilon(groups, path, plot_ignore=()):
    """Accuracy against ε; non-private groups (ε = ∞) sit at an extra "∞" position right of the
    largest finite ε. Returns (plotted data, Figure), or None when no run is private: with
    only ε = ∞ there is no ε axis to draw (the table and accuracy_vs_examples show them)."""
    eps_keys = ("privacy.epsilon", "train.epsilon", "privacy.name", "privacy.delta", "train.delta")
    data = _series(
        groups,
        "accuracy",
        lambda g: (g.stat("epsilon_replace_one") or g.stat("epsilon") or (None,))[0],
        eps_keys,
        plot_ignore,
    )
    finite = sorted({p[0] for v in data.values() for p in v if math.isfinite(p[0])})
    if not finite:
        return None
    x_inf = finite[-1] * 4 if finite[-1] > 0 else 1.0
    fig, (ax,) = _figure()
    ax.set_xscale("log")
    _draw_all(ax, data, True, lambda x: x if math.isfinite(x) else x_inf)
    # ticks at the nominal budgets: spent ε (0.9917 by DP-SGD, 0.9998 by the release) lies just below
    # of the target: ε within 5 % of each other share one tick
    nominal = []
    for x in finite:
        if nominal and x <= nominal[-1][0] * 1.05:
            nominal[-1].append(x)
        else:
            nominal.append([x])
    nominal = [float(f"{max(c):.2g}") for c in nominal]
    labels = [_fmt(t) for t in nominal]
    if any(not math.isfinite(p[0]) for v in data.values() for p in v):
        nominal, labels = nominal + [x_inf], labels + ["∞"]
    ax.set_xticks(nominal, labels)
    ax.xaxis.set_minor_locator(_null_locator())
    ax.set_xlabel("ε under replace-one (δ per run; ∞ = non-private)")
    ax.set_ylabel("accuracy")
    _finish(fig, ax, path)
    return data, fig


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


ADMM_PANELS = (
    ("best_discrete_loss", "best matching loss so far"),
    ("discrete_loss", "matching loss of the projected text"),
    ("perplexity", "perplexity of the projected text"),
)


def admm_curves(groups) -> dict:
    """{group label: {"outer_step": [...], "best_discrete_loss": [...], "discrete_loss": [...],
    "perplexity": [...]}}: per outer step, the mean over batches and seeds. Only step records
    of the ADMM loop count (a pipeline run's metrics.jsonl also holds fine-tuning steps)."""
    curved = [g for g in groups if any("outer_step" in s for r in g.runs for s in r.steps)]
    labels = _legend_labels({_cond(g.key, (), True): method_of(g.runs[0].config) for g in curved}, "all runs")
    out = {}
    for g in curved:
        recs = [s for r in g.runs for s in r.steps if "outer_step" in s]
        steps = sorted({int(s["outer_step"]) for s in recs})
        cur = {"outer_step": steps}
        for m, _ in ADMM_PANELS:
            vals = []
            for st in steps:
                v = [s[m] for s in recs if s["outer_step"] == st and _isnum(s.get(m))]
                vals.append(float(np.mean(v)) if v else float("nan"))
            cur[m] = vals
        out[labels[_cond(g.key, (), True)]] = cur
    return out


def plot_admm(groups, path):
    """One panel per ADMM quantity, one curve per generate condition. Returns (data, Figure) or None."""
    from matplotlib.ticker import MaxNLocator

    data = admm_curves(groups)
    if not data:
        return None
    fig, axes = _figure(len(ADMM_PANELS))
    for ax, (m, title) in zip(axes, ADMM_PANELS):
        for i, (label, c) in enumerate(data.items()):
            pts = [(x, y) for x, y in zip(c["outer_step"], c[m]) if math.isfinite(y)]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", ls="-" if len(pts) > 1 else "none", color=f"C{i % 10}", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ADMM outer step")
        ax.set_ylabel("perplexity" if m == "perplexity" else "matching loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # one legend for all panels: a curve missing from the last panel (a twin has no perplexity
    # trace) must still be named
    handles = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    labels = [lab for lab in data if lab in handles]
    where = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    axes[-1].legend([handles[lab] for lab in labels], labels, **where)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return data, fig


# ---------------------------------------------------------------- entry
def run_report(paths, out_dir="report", ignore=(), group_by=(), plot_ignore=(), paired="matcher,projector") -> dict:
    """Collect runs under `paths`, write report.md/.csv and plots into out_dir. `plot_ignore`
    keys stay in the tables but not in plot series: e.g. GRADMM pools at several ε, told apart
    in the table by train.path, form one curve of accuracy against ε.

    `paired`: the config groups (comma-separated) whose conditions are compared seed by seed (report.md's
    "Paired by seed" table and paired.csv); None or "" for none.

    Returns {"runs", "keys", "rows", "groups", "paired", "plots": {file: plotted data},
    "figures": {file: matplotlib Figure}, "out_dir"}."""
    dirs = find_run_dirs(paths)
    if not dirs:
        raise FileNotFoundError(
            f"no run dirs (folders with {' or '.join(RUN_FILES)}) under {', '.join(map(str, paths))}"
        )
    runs = [load_run(d) for d in dirs]
    unknown = sorted(set(group_by) - {k for r in runs for k in r.config})
    if unknown:
        raise ValueError(f"--group-by {', '.join(unknown)}: no run has this config key")
    sections, groups, rows, pairs = [], [], [], []
    for stage, skeys, sgroups in stage_sections(runs, ignore, group_by):
        srows = [{"stage": stage, **row} for row in table_rows(sgroups, skeys)]
        sections.append((stage, skeys, srows))
        groups += sgroups
        rows += srows
        if paired:
            pairs += paired_rows(stage, [r for g in sgroups for r in g.runs], skeys, paired)
    keys = (["stage"] if len(sections) > 1 else []) + sorted({k for _, sk, _ in sections for k in sk})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots, figures = {}, {}
    plotters = (
        partial(plot_accuracy_vs_examples, plot_ignore=plot_ignore),
        partial(plot_accuracy_vs_epsilon, plot_ignore=plot_ignore),
        plot_admm,
    )
    for name, fn in zip(PLOTS, plotters):
        drawn = fn(groups, out / name)
        if drawn is not None:
            plots[name], figures[name] = drawn
        elif (out / name).exists():
            (out / name).unlink()  # stale plot from an earlier report into the same dir
    write_csv(out / "report.csv", rows, keys)
    if pairs:
        pd.DataFrame(pairs, dtype=object).to_csv(out / "paired.csv", index=False, na_rep="", encoding="utf-8")
    elif (out / "paired.csv").exists():
        (out / "paired.csv").unlink()  # stale table from an earlier report into the same dir
    (out / "report.md").write_text(markdown(sections, list(plots), paths, pairs, paired), encoding="utf-8")
    return {
        "runs": runs,
        "keys": keys,
        "rows": rows,
        "groups": groups,
        "paired": pairs,
        "plots": plots,
        "figures": figures,
        "out_dir": out,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="gmtext-report", description="Tables and plots across gmtext run dirs and multirun dirs."
    )
    ap.add_argument("dirs", nargs="+", help="run dirs or folders above them (searched recursively)")
    ap.add_argument("-o", "--out", default="report", help="output folder (default ./report)")
    ap.add_argument(
        "--ignore", action="append", default=[], metavar="KEY", help="config key not to group by (repeatable)"
    )
    ap.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="KEY",
        help="also group by a key skipped by default, e.g. train.path (repeatable)",
    )
    ap.add_argument(
        "--plot-ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="keep KEY in the tables but join runs differing in it into one plot curve (repeatable)",
    )
    ap.add_argument(
        "--paired",
        default="matcher,projector",
        metavar="GROUPS",
        help=(
            "compare conditions differing only in keys of these comma-separated groups seed by seed "
            "(default matcher,projector: GRADMM variants vs their matcher=none twin; '' for none)"
        ),
    )
    a = ap.parse_args(argv)
    try:
        r = run_report(a.dirs, a.out, a.ignore, a.group_by, a.plot_ignore, a.paired)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"gmtext-report: error: {e}", file=sys.stderr)
        return 2
    print(
        f"gmtext-report: {len(r['runs'])} runs in {len(r['rows'])} groups (by {', '.join(r['keys']) or 'nothing'}) → "
        f"{r['out_dir']}/report.md, report.csv" + "".join(f", {p}" for p in r["plots"])
    )
    return 0
