"""gmtext-select: best per class, de-duplicated, balanced; schema errors are clear."""

import json
import math

import pytest

from gmtext.stages.select import BestMatchSelector, load_synthetic, run_select


def _row(text, label, loss, ppl=10.0):
    return {
        "text": text,
        "label": label,
        "label_name": str(label),
        "match_loss": loss,
        "perplexity": ppl,
        "batch": 0,
        "class_batch_loss": loss,
    }


def test_best_per_class_dedup_balance():
    rows = [
        _row("a", 0, 0.3),
        _row("b", 0, 0.1),
        _row("B ", 0, 0.05),
        _row("c", 0, 0.2),
        _row("x", 1, 0.4),
        _row("y", 1, 0.2),
    ]
    out = BestMatchSelector()(rows)
    assert [r["text"] for r in out] == ["B ", "c", "y", "x"]  # "b" duplicates "B " (normalised), balanced to 2
    assert [r["text"] for r in BestMatchSelector(per_class=1)(rows)] == ["B ", "y"]
    assert len(BestMatchSelector(balance=False)(rows)) == 5


def test_perplexity_weight_changes_order():
    rows = [_row("fluent", 0, 0.20, ppl=5), _row("garbled", 0, 0.18, ppl=5000), _row("z", 1, 0.1)]
    assert BestMatchSelector(per_class=1, balance=False)(rows)[0]["text"] == "garbled"
    assert BestMatchSelector(per_class=1, balance=False, perplexity_weight=0.05)(rows)[0]["text"] == "fluent"


def test_wrong_schema_is_refused(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"text": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['match_loss', 'perplexity'\]"):
        load_synthetic(f, ["neg", "pos"])
    f.write_text(json.dumps(_row("x", 5, 0.1)) + "\n")
    with pytest.raises(ValueError, match="'label'=5 is not a class index"):
        load_synthetic(f, ["neg", "pos"])


def test_run_select_from_pool(compose, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = [_row(f"t{i}", i % 2, i / 10) for i in range(10)]
    (pool / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sel"
    s = run_select(compose([f"pool={pool}", "selector=best", "selector.per_class=3"], config_name="select"), out)
    assert s["selected"] == 6 and s["per_class"] == {0: 3, 1: 3}
    sel = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["text"] for r in sel] == ["t0", "t2", "t4", "t1", "t3", "t5"]


def test_pool_epsilon_travels_through_select_to_finetune(compose, tmp_path):
    """A set selected into its own run dir keeps the ε of the release behind its pool
    (it used to be lost, and fine-tuning on a DP set reported ε = ∞)."""
    from gmtext.data.synthetic import synthetic_privacy

    def _synthetic_epsilon(path):
        return synthetic_privacy(path)["epsilon"]

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "synthetic.jsonl").write_text("".join(json.dumps(_row(f"t{i}", i % 2, i / 10)) + "\n" for i in range(6)))
    assert synthetic_privacy(pool) is None  # no record: unknown, not "non-private"
    (pool / "generate.json").write_text(json.dumps({"summary": {"epsilon": 3.9995, "delta": 1e-5}}))
    s = run_select(
        compose([f"pool={pool}", "selector=best", "selector.per_class=2"], config_name="select"), tmp_path / "sel"
    )
    assert s["epsilon"] == 3.9995 and s["delta"] == 1e-5
    again = run_select(
        compose([f"pool={tmp_path / 'sel'}", "selector=best", "selector.per_class=1"], config_name="select"),
        tmp_path / "sel2",
    )
    assert again["epsilon"] == 3.9995  # select of a select
    assert (
        _synthetic_epsilon(tmp_path / "sel2") == 3.9995
        and _synthetic_epsilon(tmp_path / "sel2" / "selected.jsonl") == 3.9995
    )
    (pool / "generate.json").write_text(json.dumps({"summary": {"epsilon": float("inf"), "delta": 0.0}}))
    assert _synthetic_epsilon(pool) == float("inf")


def test_label_margin_picks_the_label_that_fits_best():
    import torch

    from gmtext.matching.rescore import label_margin

    fit = torch.tensor([[0.1, 0.5], [0.7, 0.2], [0.3, 0.3]])  # row i: distance under label j to target j
    assert label_margin(fit, [0, 0, 1]).tolist() == pytest.approx([0.4, -0.5, 0.0])
    fit3 = torch.tensor([[0.2, 0.9, 0.4]])
    assert label_margin(fit3, [0]).tolist() == pytest.approx([0.2])  # nearest other label counts


def test_label_fit_of_the_texts_behind_each_target(tiny):
    """A target made of one text's gradient is fitted exactly by that text under that label
    (distance 0); the same text under the other label fits that label's target worse."""
    from gmtext.gradients import MatchedParams, class_target_gradients
    from gmtext.matching.rescore import label_fit, label_margin

    lm, task = tiny
    matched = MatchedParams(lm.model, ["final_norm", "last_blocks:1"])
    a, b = "a truly wonderful film", "dull and far too long"
    tg = class_target_gradients(lm.model, task, matched, [[b], [a]], match_loss="verbalizer")
    fit = label_fit(lm.model, task, matched, tg.grads, [a, b, a], "verbalizer", chunk=2)
    assert fit[0, 1] == pytest.approx(0.0, abs=1e-5) and fit[1, 0] == pytest.approx(0.0, abs=1e-5)
    m = label_margin(fit, [1, 0, 0])
    assert m[0] > 1e-3 and m[1] > 1e-3 and m[2] == pytest.approx(-m[0].item())


def test_margin_selector_stage(compose, tmp_path):
    """selector=margin scores the pool against a probe release, keeps the largest margins,
    and adds the probe's ε to the pool's; a missing or mismatched release fails clearly."""
    from gmtext.stages.release import run_release

    tiny_cfg = ["debug=tiny", "progress=false", "dataset=demo", "real_per_class=6", "threads=1"]
    run_release(
        compose(tiny_cfg + ["matched_params=[final_norm]", "match_loss=verbalizer"], config_name="release"),
        tmp_path / "probe",
    )
    pool = tmp_path / "pool"
    pool.mkdir()
    texts = ["a truly wonderful film", "dull and far too long", "great fun", "boring", "a joy", "awful", "fine", "weak"]
    # plain labelled text, no generation scores: any pool can be margin-selected (e.g. prompted.jsonl)
    (pool / "synthetic.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts))
    )
    (pool / "generate.json").write_text(json.dumps({"summary": {"epsilon": 2.0, "delta": 1e-6}}))
    probe = tmp_path / "probe" / "release"
    privacy_json = json.loads((probe / "privacy.json").read_text())  # non-private: one non_private entry
    (probe / "privacy.json").write_text(json.dumps({"mechanism": "gaussian", "epsilon": 1.5, "delta": 1e-6}))
    s = run_select(
        compose(
            tiny_cfg + [f"pool={pool}", "selector=margin", f"selector.release={probe}", "selector.per_class=2"],
            config_name="select",
        ),
        tmp_path / "sel",
    )
    assert s["selected"] == 4 and s["probe_release"]["epsilon"] == 1.5 and math.isnan(s["mean_match_loss"])
    assert s["epsilon"] == 3.5 and s["delta"] == pytest.approx(2e-6)  # two releases of the same data compose
    sel = [json.loads(l) for l in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    # kept = each class's top 2 of the pool by the label-fit margin, computed here from the probe release
    from gmtext.gradients import MatchedParams
    from gmtext.matching.rescore import label_fit, label_margin
    from gmtext.runtime import build_task, load_generator_model
    from gmtext.privacy.release import Release

    cfg = compose(tiny_cfg, config_name="select")
    lm = load_generator_model(cfg)
    task = build_task(cfg, lm.tokenizer)
    fit = label_fit(
        lm.model,
        task,
        MatchedParams(lm.model, ["final_norm"]),
        Release.load(probe).targets,
        texts,
        "verbalizer",
        cfg.dataset.max_text_tokens,
    )
    margin = label_margin(fit, [i % 2 for i in range(len(texts))]).tolist()
    for c in (0, 1):
        pool_c = sorted((i for i in range(len(texts)) if i % 2 == c), key=lambda i: -margin[i])
        assert abs(margin[pool_c[1]] - margin[pool_c[2]]) > 1e-6  # the cut is not a near-tie
        kept = [r for r in sel if r["label"] == c]
        assert [r["text"] for r in kept] == [texts[i] for i in pool_c[:2]]
        assert [r["label_margin"] for r in kept] == pytest.approx([margin[i] for i in pool_c[:2]], abs=1e-6)
    # a hand-made pool (no generate.json): its cost is unknown, so no ε is stated, but the
    # probe's use of the private data stays in the selection's ledger
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "synthetic.jsonl").write_text((pool / "synthetic.jsonl").read_text())
    (probe / "privacy.json").write_text(json.dumps(privacy_json))
    s2 = run_select(
        compose(tiny_cfg + [f"pool={bare}", "selector=margin", f"selector.release={probe}"], config_name="select"),
        tmp_path / "sel_bare",
    )
    rec = json.loads((tmp_path / "sel_bare" / "select.json").read_text())
    assert "epsilon" not in s2 and rec["privacy"]["epsilon"] is None and "unknown" in rec["privacy"]["note"]
    assert rec["privacy"]["ledger"]["entries"] == privacy_json["ledger"]["entries"]
    from gmtext.data.synthetic import synthetic_privacy

    assert synthetic_privacy(tmp_path / "sel_bare") is None  # a fine-tune on it states no ε either
    with pytest.raises(ValueError, match=r"missing field\(s\) \['match_loss', 'perplexity'\]"):  # best needs the scores
        run_select(compose(tiny_cfg + [f"pool={pool}"], config_name="select"), tmp_path / "z")
    # no release given (empty or null): the pool's own <pool>/probe, which this pool lacks
    with pytest.raises(ValueError, match="no selector.release given and the pool's run dir has no probe release"):
        run_select(
            compose(tiny_cfg + [f"pool={pool}", "selector=margin", "selector.release="], config_name="select"),
            tmp_path / "x",
        )
    with pytest.raises(ValueError, match="does not match this config"):
        run_select(
            compose(
                tiny_cfg
                + [
                    f"pool={pool}",
                    "selector=margin",
                    f"selector.release={probe}",
                    "dataset.template='{text} So it was'",
                ],
                config_name="select",
            ),
            tmp_path / "y",
        )
