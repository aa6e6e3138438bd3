"""Smoke tests of benchmarks/bench_generate.py and bench_release.py on the tiny random Llama (keys, and each
timed fast path computes what its reference computes)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_generate.py"


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(BENCH), "--model", "tiny-llama", "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads(out.read_text())
    for k in ("speedups", "peak_rss_gib", "machine", "device", "settings", "rows", "projection_identical"):
        assert k in res, k
    for k in (
        "projection",
        "target_gradients",
        "inner_step",
        "end_to_end",
        "init",
        "target_gradients_head",
        "inner_step_last_block",
        "projection_beam",
    ):
        assert k in res["speedups"] and res["speedups"][k] > 0, k
    assert res["projection_identical"] is True
    # each timed fast path computes what its reference computes (fp32): the row is a fair comparison
    rows = {r["key"]: r for r in res["rows"]}
    for k in ("target_gradients", "target_gradients_head", "inner_step", "inner_step_last_block"):
        assert rows[k]["max_rel_diff"] < 1e-4, (k, rows[k]["max_rel_diff"])
    dp = [r for r in res["rows"] if r["key"].startswith("dp_clipped_")]
    assert dp and all(r["max_rel_diff"] < 1e-4 for r in dp), dp
    proj = next(r for r in res["rows"] if r["key"] == "projection")
    assert proj["identical_tokens"] is True
    e2e = next(r for r in res["rows"] if r["key"] == "end_to_end")
    assert e2e["extrapolated"]  # the reference side says what it scaled
    assert res["settings"]["quick"] is True and res["peak_rss_gib"] > 0
    assert not (ROOT / "benchmarks" / "results" / "latest.json").exists() or res["settings"]["model"] == "tiny-llama"


def _run_tiny(tmp_path, script: str, *args: str) -> dict:
    """benchmarks/<script> --quick on the tiny model, one thread; its JSON result."""
    out = tmp_path / (Path(script).stem + ".json")
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--model", "tiny-llama", "--quick", "--threads", "1"]
        + [*args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


def test_bench_release_smoke(tmp_path):
    """benchmarks/bench_release.py on the tiny model: every row, and each slower path it times
    computes the clipped sums of the hook path (the comparison is fair)."""
    out = _run_tiny(tmp_path, "bench_release.py", "--stride", "2")
    rows = out["rows"]
    bf16 = "sketch_hooks (parts, target_precision=bfloat16)"
    prev = {f"sketch_hooks (parts, {p}, sorted_plan)" for p in ("float32", "bfloat16")}
    assert {"none", "sketch_hooks", "vmap", "loop", "sketch_hooks (parts)", bf16} | prev == {r["method"] for r in rows}
    for r in (r for r in rows if r["method"] in prev):  # the previous chunk layout: timed, and the same sums
        assert r["width_plan_cost"] > 0 and r["chunks"] >= 1 and r["chunks_width_plan"] >= 1, r
        assert r["max_rel_err_vs_width_plan"] < (1e-5 if "float32" in r["method"] else 0.1), r
    low = next(r for r in rows if r["method"] == bf16)
    assert len(low["cosine_to_float32"]) == 2 and min(low["cosine_to_float32"]) > 0.99, low
    assert 0 < max(low["rel_err_to_float32"]) < 0.1 and low["speedup_vs_float32_one_pass"] > 0
    dep = out["record_gradient_vs_chunk_mates"]
    assert set(dep) == {"float32", "bfloat16"} and all(0 <= v < 0.1 for d in dep.values() for v in d.values()), dep
    checked = [r for r in rows if "max_rel_err_vs_hooks" in r]
    assert {r["method"] for r in checked} == {"vmap", "loop"}
    assert all(r["max_rel_err_vs_hooks"] < 1e-4 for r in checked), checked
    assert next(r for r in rows if r["method"] == "sketch_hooks (parts)")["speedup_vs_two_passes"] > 0
    assert all(r["split_minutes_extrapolated"] > 0 for r in rows)


def test_bench_dpsgd_smoke(tmp_path):
    """benchmarks/bench_dpsgd.py on the tiny model: a row per fine-tuner; only the cached row
    runs a prefix pass, and its steps are timed apart from that pass and the accounting."""
    rows = {r["finetuner"]: r for r in _run_tiny(tmp_path, "bench_dpsgd.py", "--num-layers", "1")["rows"]}
    assert set(rows) == {"lora", "last_layers (whole model)", "last_layers (cached prefix)"}
    cached, whole = rows["last_layers (cached prefix)"], rows["last_layers (whole model)"]
    assert (
        cached["frozen_prefix_blocks"] == 1
        and whole["frozen_prefix_blocks"] == rows["lora"]["frozen_prefix_blocks"] == 0
    )
    assert (
        cached["prefix_seconds"] > 0
        and whole["prefix_seconds"] == 0
        and cached["trainable_params"] == whole["trainable_params"]
    )
    for r in rows.values():
        assert r["steps_timed"] == 1 and r["texts_timed"] == 8 and r["ms_per_record_step"] > 0, r
        assert 0 < r["accounting_seconds"] < r["seconds"] and r["recipe_minutes_extrapolated"] > 0, r
    assert cached["step_speedup_vs_whole_model"] > 0


def test_bench_xstep_smoke(tmp_path):
    """benchmarks/bench_xstep.py on the tiny model: a chunked row computes what the unchunked row
    computes (here with the contrastive rival)."""
    spec = "sketch:4x4:0:last_blocks:1"
    rows = [f"{spec}/1/0", f"{spec}/1/2"]  # 3 sequences per class: chunks of 2 and 1
    res = _run_tiny(tmp_path, "bench_xstep.py", "--batch", "3", "--length", "6", "--rows", *rows)
    assert [(r["contrastive"], r["seq_chunk"]) for r in res["rows"]] == [(1, 0), (1, 2)]
    assert "max_abs_diff_distance" in res["rows"][1]  # the chunked row was compared
    for r in res["rows"]:
        assert r["seconds"] > 0 and r["peak_rss_gib"] > 0 and r["matched_numel"] == 112
        if r["seq_chunk"]:
            assert r["max_abs_diff_distance"] < 1e-5 and r["rel_diff_grad"] < 1e-4, r
    assert res["settings"]["batch_per_class"] == 3
