"""gmtext-select: best per class, de-duplicated, balanced; schema errors are clear."""
import json

import pytest

from gmtext.stages.select import BestMatchSelector, load_synthetic, run_select


def _row(text, label, loss, ppl=10.0):
    return {"text": text, "label": label, "label_name": str(label), "match_loss": loss, "perplexity": ppl, "batch": 0, "class_batch_loss": loss}


def test_best_per_class_dedup_balance():
    rows = [_row("a", 0, 0.3), _row("b", 0, 0.1), _row("B ", 0, 0.05), _row("c", 0, 0.2),
            _row("x", 1, 0.4), _row("y", 1, 0.2)]
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
    s = run_select(compose([f"pool={pool}", "selector.per_class=3"], config_name="select"), out)
    assert s["selected"] == 6 and s["per_class"] == {0: 3, 1: 3}
    sel = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["text"] for r in sel] == ["t0", "t2", "t4", "t1", "t3", "t5"]


def test_pool_epsilon_travels_through_select_to_finetune(compose, tmp_path):
    """A set selected into its own run dir keeps the ε of the release behind its pool
    (it used to be lost, and fine-tuning on a DP set reported ε = ∞)."""
    from gmtext.data.synthetic import synthetic_privacy
    from gmtext.stages.finetune import _synthetic_epsilon

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "synthetic.jsonl").write_text("".join(json.dumps(_row(f"t{i}", i % 2, i / 10)) + "\n" for i in range(6)))
    assert synthetic_privacy(pool) is None  # no record: unknown, not "non-private"
    (pool / "generate.json").write_text(json.dumps({"summary": {"epsilon": 3.9995, "delta": 1e-5}}))
    s = run_select(compose([f"pool={pool}", "selector.per_class=2"], config_name="select"), tmp_path / "sel")
    assert s["epsilon"] == 3.9995 and s["delta"] == 1e-5
    again = run_select(compose([f"pool={tmp_path / 'sel'}", "selector.per_class=1"], config_name="select"), tmp_path / "sel2")
    assert again["epsilon"] == 3.9995  # select of a select
    assert _synthetic_epsilon(tmp_path / "sel2") == 3.9995 and _synthetic_epsilon(tmp_path / "sel2" / "selected.jsonl") == 3.9995
    (pool / "generate.json").write_text(json.dumps({"summary": {"epsilon": float("inf"), "delta": 0.0}}))
    assert _synthetic_epsilon(pool) == float("inf")
