"""Errors a user can fix, through the console scripts: each ends with exit code 2, one
`gmtext-<stage>: error: ...` line on stderr (no traceback) and nothing in the run dir but
Hydra's own .hydra/ (these behaved, but no test would notice if they stopped).

Uses the subprocess helpers of test_hardening.py on the tiny random model.
"""

import pytest

from test_hardening import GEN, TINY, cli, no_outputs, one_line_error


def _cases(t):
    data = t / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "a fine film", "label": 1}\n{"text": "broken, "label": 0}\n')
    (t / "not_a_release").mkdir()
    (t / "no_set").mkdir()
    return {
        "invalid_json": (
            "release",
            [*TINY, f"dataset.path={data}"],
            f"{data / 'train.jsonl'}:2: invalid JSON (Expecting ',' delimiter)",
        ),
        "shard_index": (
            "generate",
            [*GEN, "shard.count=2", "shard.index=2"],
            "shard.index=2 / shard.count=2: need 0 <= index < count",
        ),
        "release_without_release_json": (
            "generate",
            [*GEN, f"release={t / 'not_a_release'}"],
            (
                f"release={str(t / 'not_a_release')!r}: no release.json there "
                "(not a release directory, or an unfinished one)"
            ),
        ),
        "override_parse": (
            "generate",
            [*TINY, "seed=[1"],
            "cannot parse the override 'seed=[1': no viable alternative at input '[1' "
            "(grammar: https://hydra.cc/docs/advanced/override_grammar/basic)",
        ),
        "sweep_without_multirun": ("generate", [*TINY, "seed=0,1"], "Ambiguous value for argument 'seed=0,1'"),
        "cuda_without_gpu": (
            "generate",
            [*GEN, "model.device=cuda"],
            "device='cuda' requested but no CUDA device is available; use device=cpu or auto",
        ),
        "template_without_text": (
            "generate",
            [*GEN, "dataset.template='It was'"],
            "dataset.template='It was' must contain '{text}' exactly once",
        ),
        "dpsgd_several_lrs": (
            "finetune",
            [*TINY, "train=dpsgd", "finetune.lrs=[1e-3,1e-4]"],
            "finetune.lrs: selecting the lr over several DP-SGD runs spends the privacy budget once per run, "
            "which is not accounted; give one lr (finetuner.lr) for train=dpsgd",
        ),
        "train_path_without_set": (
            "finetune",
            [*TINY, "train=synthetic", f"train.path={t / 'no_set'}"],
            f"{str(t / 'no_set')!r}: directory has no selected.jsonl or synthetic.jsonl",
        ),
    }


CASES = [
    "invalid_json",
    "shard_index",
    "release_without_release_json",
    "override_parse",
    "sweep_without_multirun",
    "cuda_without_gpu",
    "template_without_text",
    "dpsgd_several_lrs",
    "train_path_without_set",
]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_exit_2_nothing_written(tmp_path, case):
    if case == "cuda_without_gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present: model.device=cuda is valid here")
    stage, overrides, message = _cases(tmp_path)[case]
    run = tmp_path / "run"
    line = one_line_error(cli(stage, *overrides, f"hydra.run.dir={run}"), stage)
    assert line == f"gmtext-{stage}: error: {message}"
    no_outputs(run)


def test_dp_run_reusing_a_non_private_release(compose, tmp_path):
    """privacy=dp with release=<a privacy=none release> is refused before any generation, and
    the config record generate writes before obtaining its release goes with the failure."""
    from gmtext.stages.release import run_release

    run_release(compose(GEN, config_name="release"), tmp_path / "rel")
    run = tmp_path / "run"
    line = one_line_error(
        cli("generate", *GEN, "privacy=dp", f"release={tmp_path / 'rel' / 'release'}", f"hydra.run.dir={run}"),
        "generate",
    )
    assert line == (
        "gmtext-generate: error: privacy=dp but the release to reuse is non-private (epsilon=inf); "
        "make a DP release first"
    )
    no_outputs(run)


def test_changed_config_is_one_line_exit_2_nothing_written(tmp_path):
    """Through the console script: a finished run dir rerun with another seed is refused."""
    run = tmp_path / "run"
    ok = cli("select", *TINY, f"pool={_pool(tmp_path)}", f"hydra.run.dir={run}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = one_line_error(
        cli("select", *TINY, f"pool={_pool(tmp_path)}", "selector.per_class=1", f"hydra.run.dir={run}"), "select"
    )
    assert line == (
        f"gmtext-select: error: {run} holds select output made with another config (selector.per_class 0 → 1); "
        "rerun with the same settings to resume "
        "(only hydra, logger, matcher.seq_chunk, progress, stage, threads may differ) or choose another hydra.run.dir"
    )
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


def _pool(t):
    from gmtext.artifacts import write_jsonl

    pool = t / "pool" / "synthetic.jsonl"
    if not pool.exists():
        write_jsonl(
            pool, [{"text": f"text {i}", "label": i % 2, "match_loss": i / 10, "perplexity": 2.0} for i in range(6)]
        )
    return pool


def test_release_rerun_with_another_config_is_refused(compose, tmp_path):
    """gmtext-release reuses the release in its run dir (a DP release must never be made
    twice); with other settings that reuse would label seed-0 targets as another config's."""
    from gmtext.artifacts import ConfigChanged
    from gmtext.stages.release import run_release

    run = tmp_path / "run"
    first = run_release(compose(GEN, config_name="release"), run)
    files = {p.name: p.read_bytes() for p in (run / "release").iterdir()} | {
        "summary": (run / "release_summary.json").read_bytes()
    }
    with pytest.raises(ConfigChanged, match=r"holds release output made with another config \(real_per_class 6 → 4\)"):
        run_release(compose(GEN + ["real_per_class=4"], config_name="release"), run)
    assert {p.name: p.read_bytes() for p in (run / "release").iterdir()} | {
        "summary": (run / "release_summary.json").read_bytes()
    } == files
    again = run_release(compose(GEN + ["progress=true"], config_name="release"), run)  # a free key: reused
    assert again["reused"] and again["divisors"] == first["divisors"]
