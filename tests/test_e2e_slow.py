"""End to end on the embedded SmolLM2-135M and real rotten-tomatoes data (slow)."""

import json
import subprocess
import sys

import pytest

from conftest import rt_path

pytestmark = pytest.mark.slow


def test_generate_smollm2_rotten_tomatoes(tmp_path):
    data = rt_path()
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import generate_main; generate_main()",
            "dataset=rotten_tomatoes",
            f"dataset.path={data}",
            "num_per_class=4",
            "batch_size=4",
            "real_per_class=16",
            "matcher.outer_steps=2",
            "matcher.inner_steps=2",
            "matcher.init_candidates=2",
            "projector.topk=50",
            "logger=wandb",
            "logger.mode=offline",
            "progress=false",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**__import__("os").environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["label"] for r in rows} == {0, 1}
    assert all(len(r["text"].split()) >= 3 for r in rows)
    assert all(r["perplexity"] < 5000 for r in rows)
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert "examples" in r.stdout
