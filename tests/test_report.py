"""gmtext-report on fake run dirs with known metrics plus one real tiny generate run."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from gmtext.readability import known_word_rate
from gmtext.stages.report import main, run_report

FAST_GEN = [
    "debug=tiny",
    "matcher.outer_steps=2",
    "matcher.inner_steps=2",
    "matcher.init_candidates=2",
    "projector.topk=20",
    "num_per_class=2",
    "batch_size=2",
    "real_per_class=4",
    "dataset.length=6",
    "progress=false",
]

ACC = {  # (train.source, num_per_class, train.size, privacy.epsilon) → accuracy per seed
    ("synthetic", 5, None, None): [0.70, 0.72, 0.74],
    ("synthetic", 10, None, None): [0.80, 0.82],
    ("synthetic", 10, None, 1.0): [0.60, 0.64],
    ("synthetic", 10, None, 4.0): [0.75, 0.77],
    ("real", 10, 20, None): [0.90, 0.86],
}


def _cfg(source, npc, size, eps, seed):
    train = (
        {"source": source, "path": f"/runs/gen/{seed}"} if source == "synthetic" else {"source": source, "size": size}
    )
    privacy = {"name": "dp", "epsilon": eps, "delta": 1e-5} if eps else {"name": "none"}
    return {
        "stage": "finetune",
        "seed": seed,
        "num_per_class": npc,
        "train": train,
        "privacy": privacy,
        "dataset": {"name": "demo", "label_names": ["negative", "positive"]},
        "logger": {"name": "none", "group": f"g{seed}"},
        "finetuner": {"lr": 1e-5, "seed": seed},
    }


def make_fake_runs(root):
    i = 0
    for (src, npc, size, eps), accs in ACC.items():
        for seed, acc in enumerate(accs):
            d = root / "multirun" / "sweep" / str(i)
            d.mkdir(parents=True)
            cfg = _cfg(src, npc, size, eps, seed)
            n_train = size if size else 2 * npc
            m = {
                "accuracy": acc,
                "macro_f1": acc - 0.01,
                "seed": seed,
                "epsilon": eps,
                "n_train": n_train,
                "dev_accuracy": None,
            }
            if i % 2:  # config only in .hydra/config.yaml, as a bare Hydra run dir has it
                (d / ".hydra").mkdir()
                (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
            else:
                m["config"] = cfg
            (d / "metrics.json").write_text(json.dumps(m))
            i += 1


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from hydra import compose, initialize_config_module

    from gmtext.config import register_configs
    from gmtext.stages.generate import run_generate

    root = tmp_path_factory.mktemp("runs")
    make_fake_runs(root)
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
        cfg = compose(config_name="generate", overrides=FAST_GEN)
    run_generate(cfg, root / "gen_run")
    out = root / "report"
    return root, out, run_report([root / "multirun", root / "gen_run"], out)


def _row(rows, **keys):
    (r,) = [r for r in rows if all(r.get(k) == v for k, v in keys.items())]
    return r


def test_table_mean_std(report):
    root, out, r = report
    assert len(r["runs"]) == 11 + 1
    assert "seed" not in r["keys"] and "train.path" not in r["keys"] and "finetuner.seed" not in r["keys"]
    assert {"train.source", "num_per_class", "privacy.epsilon", "stage"} <= set(r["keys"])
    rows = r["rows"]
    for (src, npc, size, eps), accs in ACC.items():
        row = _row(rows, **{"train.source": src, "num_per_class": npc, "privacy.epsilon": eps, "stage": "finetune"})
        assert row["runs"] == len(accs)
        assert row["accuracy_mean"] == pytest.approx(np.mean(accs))
        assert row["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
        assert row["macro_f1_mean"] == pytest.approx(np.mean(accs) - 0.01)
        assert row["epsilon_mean"] == (eps if eps else math.inf) and row["dev_accuracy_mean"] is None
    gen = _row(rows, stage="generate")
    g = json.loads((root / "gen_run" / "generate.json").read_text())["summary"]
    assert gen["mean_match_loss_mean"] == pytest.approx(g["mean_match_loss"]) and gen["accuracy_mean"] is None
    # the files: csv holds the same numbers, md shows mean ± std
    with open(out / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    c = [
        x
        for x in csv_rows
        if x["train.source"] == "synthetic" and x["num_per_class"] == "5" and x["stage"] == "finetune"
    ][0]
    assert float(c["accuracy_mean"]) == pytest.approx(0.72) and float(c["accuracy_std"]) == pytest.approx(0.02)
    md = (out / "report.md").read_text()
    assert "| 0.72 ± 0.02 |" in md and "![admm_curves.png](admm_curves.png)" in md


def test_plots_exist_and_match_table(report):
    from matplotlib.image import imread

    root, out, r = report
    for name in ("accuracy_vs_examples.png", "accuracy_vs_epsilon.png", "admm_curves.png"):
        p = out / name
        assert p.exists() and p.stat().st_size > 10_000, name
        img = imread(p)
        assert img.shape[0] >= 300 and img.shape[1] >= 500 and img.std() > 0.01  # not blank
    rows = [x for x in r["rows"] if x["accuracy_mean"] is not None]
    table_pts = sorted((x["n_train_mean"], x["accuracy_mean"], x["accuracy_std"]) for x in rows)
    plotted = sorted(p for pts in r["plots"]["accuracy_vs_examples.png"].values() for p in pts)
    np.testing.assert_allclose(plotted, table_pts)
    table_eps = sorted((x["epsilon_mean"], x["accuracy_mean"], x["accuracy_std"]) for x in rows)
    plotted_eps = sorted(p for pts in r["plots"]["accuracy_vs_epsilon.png"].values() for p in pts)
    np.testing.assert_allclose(plotted_eps, table_eps)  # inf (non-private) included
    # ADMM curves = per outer step mean of the generate run's metrics.jsonl
    (curve,) = r["plots"]["admm_curves.png"].values()
    recs = [json.loads(l) for l in (root / "gen_run" / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if x["kind"] == "step"]
    assert curve["outer_step"] == [0, 1, 2]
    for i, st in enumerate(curve["outer_step"]):
        at = [x for x in recs if x["outer_step"] == st]
        assert curve["best_discrete_loss"][i] == pytest.approx(np.mean([x["best_discrete_loss"] for x in at]))
        if st < 2:
            assert curve["perplexity"][i] == pytest.approx(np.mean([x["perplexity"] for x in at]))


def test_cli_and_errors(report, tmp_path, capsys):
    root, _, _ = report
    assert main([str(root / "multirun"), "-o", str(tmp_path / "r"), "--ignore", "num_per_class"]) == 0
    assert "num_per_class" not in (tmp_path / "r" / "report.csv").read_text().splitlines()[0]
    assert not (tmp_path / "r" / "admm_curves.png").exists()  # no generate run there
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "-o", str(tmp_path / "r2")]) == 2
    assert capsys.readouterr().err.strip().startswith("gmtext-report: error: no run dirs")
    r = subprocess.run(
        [sys.executable, "-c", "from gmtext.cli import report_main; report_main()", "--help"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "output folder" in r.stdout


def test_group_by_a_default_ignored_key(report, tmp_path):
    """Synthetic runs that differ only in train.path are one group by default, separate groups
    with --group-by train.path; an unknown key is refused."""
    root, _, _ = report
    merged = run_report([root / "multirun"], tmp_path / "a")
    assert "train.path" not in merged["keys"]
    split = run_report([root / "multirun"], tmp_path / "b", group_by=["train.path"])
    assert "train.path" in split["keys"] and len(split["rows"]) > len(merged["rows"])
    paths = {r.get("train.path") for r in split["rows"]} - {None, ""}
    assert paths == {f"/runs/gen/{s}" for s in range(3)}
    with pytest.raises(ValueError, match="--group-by no.such.key"):
        run_report([root / "multirun"], tmp_path / "c", group_by=["no.such.key"])
    # --plot-ignore: the table keeps train.path; here every path's runs sit at the same x as
    # the others', so the plot keeps them apart (test_plot_ignore_joins_only_across_x)
    joined = run_report([root / "multirun"], tmp_path / "d", group_by=["train.path"], plot_ignore=["train.path"])
    assert joined["rows"] == split["rows"]
    for name in ("accuracy_vs_epsilon.png", "accuracy_vs_examples.png"):
        by_path, plotted = split["plots"][name], joined["plots"][name]
        assert sorted(p for v in plotted.values() for p in v) == sorted(p for v in by_path.values() for p in v)
        assert all(len({p[0] for p in v}) == len(v) for v in plotted.values())


def test_one_table_per_stage_and_partial_keys(report):
    """Generation and fine-tuning runs get separate tables, each grouped by what varies among
    its own runs; a key that only some runs have, always with one value, groups nothing."""
    from gmtext.stages.report import Run, varying_keys

    root, out, r = report
    md = (out / "report.md").read_text()
    assert (
        "## finetune (11 runs; grouped by " in md and "## generate (1 runs; grouped by nothing (one condition))" in md
    )
    fin = md.split("## finetune")[1].split("## generate")[0]
    assert "matcher." not in fin and "projector." not in fin  # generate-only settings stay out of the fine-tune table
    runs = [
        Run(root, {"train.source": "fewshot", "train.k": 4}, {}),
        Run(root, {"train.source": "real", "train.size": 20}, {}),
        Run(root, {"train.source": "real", "train.size": 20, "matcher.nan_retries": 3}, {}),
    ]
    assert varying_keys(runs) == ["train.source"]
    runs.append(Run(root, {"train.source": "real", "train.size": 100}, {}))
    assert varying_keys(runs) == ["train.size", "train.source"]


# ---------------------------------------------------------------- plot structure
def _legend_labels(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def _check_series_axes(ax, data):
    """One errorbar series per condition, labelled in the legend with its full label; a
    one-point series is a bare marker, a series never has two points at one x."""
    assert ax.get_xlabel() and ax.get_ylabel() == "accuracy"
    conts = ax.containers
    assert len(conts) == len(data)
    assert _legend_labels(ax) == list(data) and len(set(data)) == len(data)
    for c, (label, pts) in zip(conts, data.items()):
        line = c.lines[0]
        assert c.get_label() == label
        assert len(line.get_xdata()) == len(pts)
        assert (line.get_linestyle() == "None") == (len(pts) == 1), label
        assert len({p[0] for p in pts}) == len(pts), f"{label}: two points at one x"


def test_plot_structure(report, tmp_path):
    """Rendered from the fixture runs: labelled axes, one legend entry per condition, no
    vertical joins, markers for single points, integer ADMM steps."""
    root, out, r = report
    ex, eps, admm = (
        r["figures"][n] for n in ("accuracy_vs_examples.png", "accuracy_vs_epsilon.png", "admm_curves.png")
    )
    (ax,) = ex.axes
    _check_series_axes(ax, r["plots"]["accuracy_vs_examples.png"])
    # x = 10 (synthetic, 5 per class) and 20 (synthetic ε = ∞, 1, 4 and real): the synthetic
    # conditions at 20 are told apart by ε, so no series is a vertical line
    assert ax.get_xlabel().startswith("training examples")
    (ax,) = eps.axes
    data = r["plots"]["accuracy_vs_epsilon.png"]
    _check_series_axes(ax, data)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "∞"]
    assert ax.get_xlabel().startswith("ε")
    # three panels, one curve per generate condition each, y labelled, only integer steps
    assert len(admm.axes) == 3
    n_cond = len(r["plots"]["admm_curves.png"])
    for a in admm.axes:
        assert a.get_ylabel() and a.get_xlabel() == "ADMM outer step"
        assert len(a.get_lines()) == n_cond
        lo, hi = a.get_xlim()
        assert all(float(t).is_integer() for t in a.get_xticks() if lo <= t <= hi)
    assert _legend_labels(admm.axes[-1]) == list(r["plots"]["admm_curves.png"])


def test_plot_ignore_joins_only_across_x(tmp_path):
    """--plot-ignore train.path joins GRADMM pools at ε = 1 and 4 into one curve against ε;
    against the number of examples both sit at 20, so there they are two markers, labelled
    by the pool's folder name, not one vertical line."""
    root = tmp_path / "runs"
    for i, (eps, acc) in enumerate([(1.0, 0.55), (1.0, 0.57), (4.0, 0.6), (4.0, 0.62)]):
        d = root / str(i)
        d.mkdir(parents=True)
        cfg = {"stage": "finetune", "seed": i % 2, "train": {"source": "synthetic", "path": f"/x/select_eps{eps:g}"}}
        (d / "metrics.json").write_text(json.dumps({"accuracy": acc, "n_train": 20, "epsilon": eps, "config": cfg}))
    r = run_report([root], tmp_path / "rep", group_by=["train.path"], plot_ignore=["train.path"])
    eps = r["plots"]["accuracy_vs_epsilon.png"]
    assert list(eps) == ["accuracy"] and [p[0] for p in eps["accuracy"]] == [1.0, 4.0]  # nothing else varies
    ex = r["plots"]["accuracy_vs_examples.png"]
    assert list(ex) == ["train.path=select_eps1", "train.path=select_eps4"]
    for name in ("accuracy_vs_examples.png", "accuracy_vs_epsilon.png"):
        (ax,) = r["figures"][name].axes
        _check_series_axes(ax, r["plots"][name])
    (ax,) = r["figures"]["accuracy_vs_epsilon.png"].axes
    assert ax.containers[0].lines[0].get_linestyle() == "-"


def test_epsilon_plot_needs_a_private_run(tmp_path):
    """With every run non-private there is no ε axis: no accuracy_vs_epsilon.png, and not an
    empty one (what the ε = ∞-only rt_n20 report used to show)."""
    root = tmp_path / "runs"
    for i, (src, acc) in enumerate([("real", 0.8), ("real", 0.82), ("prompted", 0.7)]):
        d = root / str(i)
        d.mkdir(parents=True)
        cfg = {"stage": "finetune", "seed": i, "train": {"source": src}, "privacy": {"name": "none"}}
        (d / "metrics.json").write_text(json.dumps({"accuracy": acc, "n_train": 20, "config": cfg}))
    r = run_report([root], tmp_path / "rep")
    assert "accuracy_vs_epsilon.png" not in r["plots"] and not (tmp_path / "rep" / "accuracy_vs_epsilon.png").exists()
    (ax,) = r["figures"]["accuracy_vs_examples.png"].axes
    _check_series_axes(ax, r["plots"]["accuracy_vs_examples.png"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20"]


def test_add_remove_dpsgd_runs_are_placed_by_their_replace_one_epsilon(tmp_path):
    """A DP-SGD run calibrated by opacus (add/remove, ε 0.98) next to a replace-one GRADMM run
    at ε 1: the table gives its replace-one ε too, and the ε plot places it there (1.63), so
    the two budgets compare as one promise."""
    from gmtext.privacy.ledger import Ledger, LedgerEntry

    kw = dict(noise_multiplier=1.5234375, count=93, sample_rate=1 / 31, adjacency="add_remove")
    dpsgd = Ledger(1e-5, [LedgerEntry("dpsgd", "subsampled_gaussian", "rt/train", **kw)]).to_dict()
    rel = LedgerEntry("release", "gaussian", "rt/train", noise_multiplier=5.0, adjacency="replace_one")
    runs = [("dpsgd", dpsgd, 0.81), ("synthetic", Ledger(1e-5, [rel]).to_dict(), 0.79)]
    for i, (src, led, acc) in enumerate(runs):
        d = tmp_path / "runs" / str(i)
        d.mkdir(parents=True)
        cfg = {"stage": "finetune", "seed": 0, "train": {"source": src}, "privacy": {"name": "dp"}}
        out = {"accuracy": acc, "n_train": 100, "epsilon": led["epsilon"], "privacy": led, "config": cfg}
        (d / "metrics.json").write_text(json.dumps(out))
    r = run_report([tmp_path / "runs"], tmp_path / "rep")
    rows = {row["train.source"]: row for row in csv.DictReader(open(tmp_path / "rep" / "report.csv"))}
    assert float(rows["dpsgd"]["epsilon_mean"]) == pytest.approx(0.982, abs=0.002)
    assert float(rows["dpsgd"]["epsilon_replace_one_mean"]) == pytest.approx(1.632, abs=0.005)
    assert rows["synthetic"]["epsilon_replace_one_mean"] in ("", "nan")  # its ε already is replace-one
    xs = sorted(p[0] for v in r["plots"]["accuracy_vs_epsilon.png"].values() for p in v)
    assert xs[0] == pytest.approx(Ledger(1e-5, [rel]).epsilon()) and xs[1] == pytest.approx(1.632, abs=0.005)


def test_dpsgd_runs_group_by_adjacency_and_keep_n_train_withheld(tmp_path):
    """A DP-SGD run dir made before train.adjacency existed was calibrated under add/remove: it
    groups apart from a replace-one run of the same recipe. A run that withholds n_train (how
    many private records trained) is not given one from its config."""
    from gmtext.stages.report import load_run

    dp = {"_target_": "gmtext.finetune.sources.DPSGDSource", "epsilon": 1}
    for name, train, n in (("old", dp, 7695), ("new", {**dp, "adjacency": "replace_one"}, None)):
        d = tmp_path / name
        d.mkdir()
        cfg = {
            "stage": "finetune",
            "seed": 0,
            "train": train,
            "num_per_class": 20,
            "dataset": {"label_names": "[0, 1]"},
        }
        (d / "metrics.json").write_text(json.dumps({"accuracy": 0.8, "n_train": n, "epsilon": 1.0, "config": cfg}))
    old, new = load_run(tmp_path / "old"), load_run(tmp_path / "new")
    assert (old.config["train.adjacency"], new.config["train.adjacency"]) == ("add_remove", "replace_one")
    assert old.metrics["n_train"] == 7695 and new.metrics.get("n_train") is None


def _pipeline_runs(tmp_path, group: str, choices: dict) -> list:
    """One finished pipeline run dir per (name, config of `group`), loaded back in that order."""
    from gmtext.stages.report import load_run

    for name, choice in choices.items():
        d = tmp_path / name
        d.mkdir()
        cfg = {"stage": "pipeline", "seed": 0, group: choice, "num_per_class": 20}
        (d / "metrics.json").write_text(json.dumps({"accuracy": 0.7, "epsilon": math.inf, "config": cfg}))
    return [load_run(tmp_path / n) for n in choices]


def test_admm_runs_from_before_the_readability_guard_group_apart_from_guarded_runs(tmp_path):
    """An ADMM run dir made before matcher.max_perplexity_ratio existed ran without the guard:
    it reads as 0 and groups apart from a guarded run; a twin (matcher=none) never has the key."""
    from gmtext.stages.report import varying_keys

    admm = {"_target_": "gmtext.matching.admm.ADMMMatcher", "rho": 5.0}
    twin = {"_target_": "gmtext.matching.lm_samples.LMSampleMatcher"}
    runs = _pipeline_runs(
        tmp_path, "matcher", {"old": admm, "guarded": {**admm, "max_perplexity_ratio": 1.0}, "twin": twin}
    )
    assert [r.config.get("matcher.max_perplexity_ratio") for r in runs] == [0.0, 1.0, None]
    assert "matcher.max_perplexity_ratio" in varying_keys(runs)
    # matcher.contrastive belongs to both schemas: an old twin reads as β = 0, like an old GRADMM run
    assert [r.config.get("matcher.contrastive") for r in runs] == [0.0, 0.0, 0.0]


def test_lm_topk_runs_from_before_beam_search_read_as_one_beam(tmp_path):
    """A run dir made before projector.beam existed projected one token at a time: it reads as
    beam 1 and groups apart from a beam-search run; the nearest projector never has the key."""
    from gmtext.stages.report import varying_keys

    topk = {"_target_": "gmtext.matching.projectors.LMTopKProjector", "topk": 200}
    nearest = {"_target_": "gmtext.matching.projectors.NearestProjector"}
    runs = _pipeline_runs(tmp_path, "projector", {"old": topk, "beam": {**topk, "beam": 4}, "nearest": nearest})
    assert [r.config.get("projector.beam") for r in runs] == [1, 4, None]
    assert "projector.beam" in varying_keys(runs)


# ---------------------------------------------------------------- dir kinds
PIPE = [
    "debug=fast",
    "matcher.outer_steps=2",
    "matcher.inner_steps=2",
    "num_per_class=2",
    "projector.topk=10",
    "real_per_class=4",
    "selector.per_class=2",
]


def test_report_on_pipeline_single_run_and_multirun_dirs(report, compose, tmp_path, capsys):
    """gmtext-report over a gmtext-pipeline run dir (its metrics.jsonl mixes ADMM and
    fine-tuning step records: used to raise KeyError 'outer_step'), a single-stage run dir
    and a multirun sweep dir."""
    from gmtext.workflows.pipeline import run_pipeline

    pipe = tmp_path / "pipe"
    m = run_pipeline(compose(PIPE, config_name="pipeline"), pipe)
    recs = [json.loads(l) for l in (pipe / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in recs) and any("outer_step" in x for x in recs)
    assert main([str(pipe), "-o", str(tmp_path / "rp")]) == 0
    r = run_report([pipe], tmp_path / "rp2")
    (row,) = r["rows"]
    assert row["stage"] == "pipeline" and row["accuracy_mean"] == pytest.approx(m["accuracy"])
    assert row["mean_match_loss_mean"] == pytest.approx(m["generation"]["mean_match_loss"])
    kept = [json.loads(l)["perplexity"] for l in (pipe / "selected.jsonl").read_text().splitlines()]
    med, p90 = np.percentile(kept, [50, 90])  # the kept set's readability: select.json, metrics.json and the report
    sel = m["selection"]
    assert (sel["median_perplexity"], sel["p90_perplexity"]) == pytest.approx((med, p90))
    assert (row["kept_median_perplexity_mean"], row["kept_p90_perplexity_mean"]) == pytest.approx((med, p90))
    texts = [json.loads(l)["text"] for l in (pipe / "selected.jsonl").read_text().splitlines()]
    assert row["kept_known_word_rate_mean"] == pytest.approx(sel["known_word_rate"])
    assert sel["known_word_rate"] == pytest.approx(known_word_rate(texts))
    (curve,) = r["plots"]["admm_curves.png"].values()
    assert curve["outer_step"] == [0, 1, 2]
    root, _, _ = report
    single = run_report([root / "gen_run"], tmp_path / "rs")  # one generate run dir
    assert (
        len(single["runs"]) == 1
        and single["rows"][0]["stage"] == "generate"
        and list(single["plots"]) == ["admm_curves.png"]
    )
    one_ft = run_report([root / "multirun" / "sweep" / "0"], tmp_path / "rf")  # one fine-tune run dir
    assert len(one_ft["runs"]) == 1 and "accuracy_vs_examples.png" in one_ft["plots"]
    sweep = run_report([root / "multirun" / "sweep"], tmp_path / "rm")  # a multirun sweep dir
    assert len(sweep["runs"]) == 11 and len(sweep["rows"]) == len(ACC)
    capsys.readouterr()


def test_paired_by_seed_against_the_twin(tmp_path):
    """GRADMM vs its matcher=none twin: differences are taken seed by seed (not of the means),
    per context (here N), only over the seeds both have, with the twin as the reference."""
    admm, twin = "gmtext.matching.admm.ADMMMatcher", "gmtext.matching.lm_samples.LMSampleMatcher"
    acc = {
        (admm, 20): {0: 0.80, 1: 0.70, 2: 0.75},
        (twin, 20): {0: 0.78, 1: 0.66, 2: 0.70},
        (admm, 100): {0: 0.79, 1: 0.81},
        (twin, 100): {1: 0.77, 2: 0.60},
    }
    i = 0
    for (target, n), by_seed in acc.items():
        for seed, a in by_seed.items():
            d = tmp_path / "runs" / str(i)
            d.mkdir(parents=True)
            matcher = {"_target_": target, **({"lr": 0.008} if target == admm else {})}
            cfg = {"stage": "pipeline", "seed": seed, "num_per_class": n, "matcher": matcher, "train": {"path": str(d)}}
            (d / "metrics.json").write_text(
                json.dumps({"accuracy": a, "macro_f1": a - 0.02, "n_train": n, "config": cfg})
            )
            i += 1
    r = run_report([tmp_path / "runs"], tmp_path / "rep")
    rows = {p["context"]: p for p in r["paired"]}
    assert set(rows) == {"num_per_class=20", "num_per_class=100"}
    p20, p100 = rows["num_per_class=20"], rows["num_per_class=100"]
    assert p20["reference"] == f"matcher._target_={twin}" and p20["condition"] == f"matcher._target_={admm}"
    assert p20["pairs"] == 3 and p20["d_accuracy_mean"] == pytest.approx((0.02 + 0.04 + 0.05) / 3)
    assert p20["d_accuracy_std"] == pytest.approx(np.std([0.02, 0.04, 0.05], ddof=1))
    assert (p100["pairs"], p100["seeds"]) == (1, "1") and p100["d_accuracy_mean"] == pytest.approx(0.04)  # seed 1 only
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Paired by seed" in md and "+0.03667 ± 0.015" in md
    assert (tmp_path / "rep" / "paired.csv").exists()
    assert run_report([tmp_path / "runs"], tmp_path / "rep", paired="")["paired"] == []
    assert not (tmp_path / "rep" / "paired.csv").exists()


def _paired_accuracy(tmp_path, conds):
    """Pipeline runs of seeds 0 and 1 per {name: (matcher config, accuracy)}; the report's paired
    accuracy difference per (condition, reference)."""
    for name, (matcher, acc) in conds.items():
        for seed in (0, 1):
            d = tmp_path / "runs" / f"{name}_{seed}"
            d.mkdir(parents=True)
            cfg = {"stage": "pipeline", "seed": seed, "matcher": matcher, "train": {"path": str(d)}}
            (d / "metrics.json").write_text(json.dumps({"accuracy": acc + seed / 100, "config": cfg}))
    paired = run_report([tmp_path / "runs"], tmp_path / "rep")["paired"]
    return {(p["condition"], p["reference"]): round(p["d_accuracy_mean"], 6) for p in paired}


def test_each_variant_is_paired_with_its_own_twin(tmp_path):
    """Two twins (matcher.contrastive 0 and 1): contrastive GRADMM meets the contrastive twin, plain
    and guarded GRADMM (a key the twins lack) the plain twin, and the second twin the first."""
    admm, twin = "gmtext.matching.admm.ADMMMatcher", "gmtext.matching.lm_samples.LMSampleMatcher"
    conds = {
        "plain": ({"_target_": admm, "contrastive": 0.0, "max_perplexity_ratio": 0.0}, 0.70),
        "guard": ({"_target_": admm, "contrastive": 0.0, "max_perplexity_ratio": 1.0}, 0.71),
        "contrastive": ({"_target_": admm, "contrastive": 1.0, "max_perplexity_ratio": 0.0}, 0.80),
        "twin": ({"_target_": twin, "contrastive": 0.0}, 0.60),
        "ctwin": ({"_target_": twin, "contrastive": 1.0}, 0.75),
    }
    got = _paired_accuracy(tmp_path, conds)
    t0, t1 = f"matcher._target_={twin}, matcher.contrastive=0", f"matcher._target_={twin}, matcher.contrastive=1"
    a = f"matcher._target_={admm}, matcher.contrastive="
    assert got == {
        (f"{a}0, matcher.max_perplexity_ratio=0", t0): 0.10,
        (f"{a}0, matcher.max_perplexity_ratio=1", t0): 0.11,
        (f"{a}1, matcher.max_perplexity_ratio=0", t1): 0.05,  # not 0.20 against the plain twin
        (t1, t0): 0.15,
    }


def test_a_projector_variant_is_paired_with_the_twin(tmp_path):
    """The projection is the matcher's z-step and a twin never projects: GRADMM with
    projector.beam=4 is compared seed by seed with the twin (whose config still carries the
    default projector), not left without a reference in a context of its own."""
    from gmtext.stages.report import run_report

    admm, twin = "gmtext.matching.admm.ADMMMatcher", "gmtext.matching.lm_samples.LMSampleMatcher"
    topk = "gmtext.matching.projectors.LMTopKProjector"
    for name, target, beam, acc in (("plain", admm, 1, 0.70), ("beam", admm, 4, 0.74), ("twin", twin, 1, 0.60)):
        for seed in (0, 1):
            d = tmp_path / "runs" / f"{name}_{seed}"
            d.mkdir(parents=True)
            cfg = {
                "stage": "pipeline",
                "seed": seed,
                "matcher": {"_target_": target},
                "projector": {"_target_": topk, "beam": beam},
            }
            (d / "metrics.json").write_text(json.dumps({"accuracy": acc + seed / 100, "config": cfg}))
    rep = run_report([tmp_path / "runs"], tmp_path / "rep")
    got = {(p["condition"], p["reference"]): round(p["d_accuracy_mean"], 6) for p in rep["paired"]}
    ref = f"matcher._target_={twin}, projector.beam=1"
    assert got == {
        (f"matcher._target_={admm}, projector.beam=1", ref): 0.10,
        (f"matcher._target_={admm}, projector.beam=4", ref): 0.14,
    }
    # --paired matcher alone leaves the beam run in a context of its own, with no twin to meet
    only = run_report([tmp_path / "runs"], tmp_path / "rep2", paired="matcher")["paired"]
    assert [p["context"] for p in only] == ["projector.beam=1"]


def test_paths_inside_each_run_dir_are_not_a_condition(tmp_path):
    """A pipeline's probe release lies in its own run dir, so selector.release differs in every
    run: seeds of one budget still form one group. Two runs scored against different shared
    releases outside the run dirs stay apart, since that is a real condition."""

    def run(name, seed, eps, release):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        cfg = {"stage": "pipeline", "seed": seed, "privacy": {"epsilon": eps}, "selector": {"release": release(d)}}
        (d / "metrics.json").write_text(json.dumps({"accuracy": 0.7 + seed / 100, "epsilon": eps, "config": cfg}))

    for s in range(3):
        run(f"eps1_s{s}", s, 1, lambda d: str(d / "probe"))
    run("eps4_s0", 0, 4, lambda d: str(d / "probe"))
    r = run_report([tmp_path / "runs"], tmp_path / "rep")
    assert r["keys"] == ["privacy.epsilon"]
    eps1 = _row(r["rows"], **{"privacy.epsilon": 1})
    assert eps1["runs"] == 3 and eps1["accuracy_mean"] == pytest.approx(0.71)
    for s, shared in enumerate(("/releases/a", "/releases/b")):
        run(f"shared_{s}", 0, 8, lambda d, p=shared: p)
    r = run_report([tmp_path / "runs"], tmp_path / "rep")
    assert "selector.release" in r["keys"]
    assert {x["selector.release"] for x in r["rows"]} == {"{run}/probe", "/releases/a", "/releases/b"}


def test_legend_names_methods_not_config_keys(tmp_path):
    """One report over GRADMM, its matcher=none twin, PE and DP-SGD: the ε plot's legend names
    each series by its method, plus only the setting that tells two series of one method apart
    (the private_compare plot used to list every differing class path)."""
    from gmtext.stages.report import method_of

    adm, twin = "gmtext.matching.admm.ADMMMatcher", "gmtext.matching.lm_samples.LMSampleMatcher"
    margin, best = "gmtext.stages.select.LabelMarginSelector", "gmtext.stages.select.BestMatchSelector"
    runs = [  # (stage, generator.name, matcher, selector, ε, accuracy per seed)
        ("pipeline", "gradmm", adm, margin, 1.0, [0.79, 0.80]),
        ("pipeline", "gradmm", adm, margin, 4.0, [0.80]),
        ("pipeline", "gradmm", adm, best, 1.0, [0.60]),
        ("pipeline", "gradmm", twin, margin, 1.0, [0.79, 0.80]),
        ("pipeline", "pe", adm, best, 1.0, [0.70, 0.75]),
        ("pipeline", "pe", adm, best, 4.0, [0.72]),
    ]
    i = 0
    for stage, gen, matcher, sel, eps, accs in runs:
        for seed, acc in enumerate(accs):
            cfg = {
                "stage": stage,
                "seed": seed,
                "generator": {"name": gen, "_target_": f"gmtext.x.{gen.upper()}"},
                "matcher": {"_target_": matcher},
                "selector": {"_target_": sel},
                "privacy": {"name": "dp", "epsilon": eps},
                "train": {"source": "synthetic"},
            }
            (tmp_path / "runs" / str(i)).mkdir(parents=True)
            m = {"accuracy": acc, "n_train": 100, "epsilon": eps, "config": cfg}
            (tmp_path / "runs" / str(i) / "metrics.json").write_text(json.dumps(m))
            i += 1
    dp = {"stage": "finetune", "seed": 0, "train": {"source": "dpsgd", "epsilon": 4.0}}
    (tmp_path / "runs" / "dp").mkdir()
    (tmp_path / "runs" / "dp" / "metrics.json").write_text(
        json.dumps({"accuracy": 0.81, "n_train": 7695, "epsilon": 3.98, "config": dp})
    )
    r = run_report([tmp_path / "runs"], tmp_path / "rep", paired="")
    eps = r["plots"]["accuracy_vs_epsilon.png"]
    assert set(eps) == {
        "GRADMM: selector._target_=BestMatchSelector",
        "GRADMM: selector._target_=LabelMarginSelector",
        "LM samples (no matching)",
        "PE",
        "DP-SGD",
    }
    assert [p[0] for p in eps["GRADMM: selector._target_=LabelMarginSelector"]] == [1.0, 4.0]
    assert eps["DP-SGD"] == [(3.98, 0.81, 0.0)]
    (ax,) = r["figures"]["accuracy_vs_epsilon.png"].axes
    _check_series_axes(ax, eps)
    assert method_of({"stage": "finetune", "train.source": "none"}) == "zero-shot"
    assert method_of({"stage": "finetune", "train.source": "real"}) == "real"


def test_twins_are_paired_with_the_plain_twin_whatever_the_sort_order(tmp_path):
    """A third twin whose setting sorts first (matcher.init=class_prompt before lm_sample) does not
    become the other twins' reference: the twin sharing most settings with every condition does."""
    admm, twin = "gmtext.matching.admm.ADMMMatcher", "gmtext.matching.lm_samples.LMSampleMatcher"
    conds = {
        "plain": ({"_target_": admm, "contrastive": 0.0, "init": "lm_sample"}, 0.70),
        "twin": ({"_target_": twin, "contrastive": 0.0, "init": "lm_sample"}, 0.60),
        "ctwin": ({"_target_": twin, "contrastive": 1.0, "init": "lm_sample"}, 0.75),
        "cptwin": ({"_target_": twin, "contrastive": 0.0, "init": "class_prompt"}, 0.62),
    }
    got = _paired_accuracy(tmp_path, conds)
    t = f"matcher._target_={twin}, matcher.contrastive="
    t0 = f"{t}0, matcher.init=lm_sample"
    assert got == {
        (f"matcher._target_={admm}, matcher.contrastive=0, matcher.init=lm_sample", t0): 0.10,
        (f"{t}1, matcher.init=lm_sample", t0): 0.15,
        (f"{t}0, matcher.init=class_prompt", t0): 0.02,
    }
