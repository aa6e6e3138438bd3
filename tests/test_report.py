"""gmtext-report on fake run dirs with known metrics plus one real tiny generate run."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from gmtext.stages.report import main, run_report

FAST_GEN = ["model=tiny_llama", "logger=none", "matcher.outer_steps=2", "matcher.inner_steps=2", "matcher.init_candidates=2",
            "projector.topk=20", "num_per_class=2", "batch_size=2", "real_per_class=4", "dataset.length=6", "progress=false"]

ACC = {  # (train.source, num_per_class, train.size, privacy.epsilon) → accuracy per seed
    ("synthetic", 5, None, None): [0.70, 0.72, 0.74],
    ("synthetic", 10, None, None): [0.80, 0.82],
    ("synthetic", 10, None, 1.0): [0.60, 0.64],
    ("synthetic", 10, None, 4.0): [0.75, 0.77],
    ("real", 10, 20, None): [0.90, 0.86],
}


def _cfg(source, npc, size, eps, seed):
    train = {"source": source, "path": f"/runs/gen/{seed}"} if source == "synthetic" else {"source": source, "size": size}
    privacy = {"name": "dp", "epsilon": eps, "delta": 1e-5} if eps else {"name": "none"}
    return {"stage": "finetune", "seed": seed, "num_per_class": npc, "train": train, "privacy": privacy,
            "dataset": {"name": "demo", "label_names": ["negative", "positive"]}, "logger": {"name": "none", "group": f"g{seed}"},
            "finetuner": {"lr": 1e-5, "seed": seed}}


def make_fake_runs(root):
    i = 0
    for (src, npc, size, eps), accs in ACC.items():
        for seed, acc in enumerate(accs):
            d = root / "multirun" / "sweep" / str(i)
            d.mkdir(parents=True)
            cfg = _cfg(src, npc, size, eps, seed)
            n_train = size if size else 2 * npc
            m = {"accuracy": acc, "macro_f1": acc - 0.01, "seed": seed, "epsilon": eps, "n_train": n_train, "dev_accuracy": None}
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
    c = [x for x in csv_rows if x["train.source"] == "synthetic" and x["num_per_class"] == "5" and x["stage"] == "finetune"][0]
    assert float(c["accuracy_mean"]) == pytest.approx(0.72) and float(c["accuracy_std"]) == pytest.approx(0.02)
    md = (out / "report.md").read_text()
    assert "| 0.72 ± 0.02 |" in md and "![admm_curves.png](admm_curves.png)" in md


def test_plots_exist_and_match_table(report):
    from matplotlib.image import imread

    root, out, r = report
    shapes = {"accuracy_vs_examples.png": (400, 600), "accuracy_vs_epsilon.png": (400, 600), "admm_curves.png": (400, 1200)}
    for name, hw in shapes.items():
        p = out / name
        assert p.exists() and p.stat().st_size > 10_000, name
        img = imread(p)
        assert img.shape[:2] == hw and img.std() > 0.01  # not blank
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
    r = subprocess.run([sys.executable, "-c", "from gmtext.cli import report_main; report_main()", "--help"], capture_output=True, text=True)
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
    # --plot-ignore: the table keeps train.path, the plot curves do not split by it
    joined = run_report([root / "multirun"], tmp_path / "d", group_by=["train.path"], plot_ignore=["train.path"])
    assert joined["rows"] == split["rows"]
    for name in ("accuracy_vs_epsilon.png", "accuracy_vs_examples.png"):
        by_path, without = split["plots"][name], joined["plots"][name]
        assert any("train.path" in k for k in by_path) and not any("train.path" in k for k in without)
        assert len(without) < len(by_path)
        assert sorted(p for v in without.values() for p in v) == sorted(p for v in by_path.values() for p in v)


def test_one_table_per_stage_and_partial_keys(report):
    """Generation and fine-tuning runs get separate tables, each grouped by what varies among
    its own runs; a key that only some runs have, always with one value, groups nothing."""
    from gmtext.stages.report import Run, varying_keys

    root, out, r = report
    md = (out / "report.md").read_text()
    assert "## finetune (11 runs; grouped by " in md and "## generate (1 runs; grouped by nothing (one condition))" in md
    fin = md.split("## finetune")[1].split("## generate")[0]
    assert "matcher." not in fin and "projector." not in fin  # generate-only settings stay out of the fine-tune table
    runs = [Run(root, {"train.source": "fewshot", "train.k": 4}, {}), Run(root, {"train.source": "real", "train.size": 20}, {}),
            Run(root, {"train.source": "real", "train.size": 20, "matcher.nan_retries": 3}, {})]
    assert varying_keys(runs) == ["train.source"]
    runs.append(Run(root, {"train.source": "real", "train.size": 100}, {}))
    assert varying_keys(runs) == ["train.size", "train.source"]
