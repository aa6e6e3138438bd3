"""gmtext-merge: two shards of one release merge into the unsharded run's synthetic set."""

import json
import shutil
import subprocess
import sys

import pytest

from gmtext.stages.merge import MergeError, main, merge_shards

FAST = [
    "debug=tiny",
    "matcher.outer_steps=1",
    "matcher.inner_steps=2",
    "matcher.init_candidates=2",
    "projector.topk=20",
    "num_per_class=4",
    "batch_size=2",
    "real_per_class=4",
    "dataset.length=6",
    "progress=false",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hydra import compose, initialize_config_module

    from gmtext.config import register_configs
    from gmtext.stages.generate import run_generate

    register_configs()
    root = tmp_path_factory.mktemp("merge")

    def gen(out, *extra):
        with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
            cfg = compose(config_name="generate", overrides=FAST + list(extra))
        run_generate(cfg, out)
        return out

    single = gen(root / "single")  # makes single/release; unsharded, seed 0
    rel = single / "release"
    s0 = gen(root / "s0", f"release={rel}", "shard.count=2", "shard.index=0")
    s1 = gen(root / "s1", f"release={rel}", "shard.count=2", "shard.index=1")
    return root, single, s0, s1


def test_merged_equals_unsharded(shards, tmp_path):
    root, single, s0, s1 = shards
    assert {json.loads(l)["batch"] for l in (s0 / "synthetic.jsonl").read_text().splitlines()} == {0}
    info = merge_shards(tmp_path / "m", [s1, s0])  # order of the arguments does not matter
    assert (tmp_path / "m" / "synthetic.jsonl").read_text() == (single / "synthetic.jsonl").read_text()
    m = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert [s["batches"] for s in m["shards"]] == [[1], [0]] and m["shard_count"] == 2
    assert m["release"]["path"] == str((single / "release").resolve()) and m["summary"]["examples"] == 8
    g = json.loads((tmp_path / "m" / "generate.json").read_text())
    assert g["summary"]["epsilon"] == float("inf") and g["config"]["shard"] == {"index": 0, "count": 1}
    assert info["summary"]["mean_match_loss"] == pytest.approx(
        json.loads((single / "generate.json").read_text())["summary"]["mean_match_loss"]
    )


def test_merge_errors_one_line(shards, tmp_path, capsys):
    root, single, s0, s1 = shards
    with pytest.raises(MergeError, match=r"batches \[1\] of 2 are missing"):
        merge_shards(tmp_path / "a", [s0])
    dup = tmp_path / "s0_copy"
    shutil.copytree(s0, dup)
    with pytest.raises(MergeError, match="batch 0 is in two shards"):
        merge_shards(tmp_path / "b", [s0, dup, s1])
    # a shard made from another release (same fingerprint, other privacy ledger / targets)
    other_rel = tmp_path / "other_release"
    shutil.copytree(single / "release", other_rel)
    (other_rel / "privacy.json").write_text(json.dumps({"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5}))
    bad = tmp_path / "s1_other"
    shutil.copytree(s1, bad)
    g = json.loads((bad / "generate.json").read_text())
    g["config"]["release"] = str(other_rel)
    (bad / "generate.json").write_text(json.dumps(g))
    with pytest.raises(MergeError, match="used another release .*privacy.json differs"):
        merge_shards(tmp_path / "c", [s0, bad])
    # a shard with another generation config
    g["config"]["release"] = str(single / "release")
    g["config"]["seed"] = 7
    (bad / "generate.json").write_text(json.dumps(g))
    with pytest.raises(MergeError, match="config key 'seed'"):
        merge_shards(tmp_path / "d", [s0, bad])
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / "synthetic.jsonl").exists()
    # the console form: exit code 2, one line on stderr
    assert main([str(tmp_path / "e"), str(s0)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gmtext-merge: error: batches [1] of 2 are missing")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import merge_main; merge_main()",
            str(tmp_path / "f"),
            str(s0),
            str(s1),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "2 shards, 2 batches, 8 examples" in r.stdout


def test_batch_a_shard_recorded_failed_is_not_missing(shards, tmp_path):
    root, single, s0, s1 = shards
    failed = tmp_path / "s1_failed"  # shard 1's only batch went non-finite: no rows, listed as failed
    shutil.copytree(s1, failed)
    (failed / "synthetic.jsonl").write_text("")
    g = json.loads((failed / "generate.json").read_text())
    g["summary"]["failed_batches"] = [1]
    (failed / "generate.json").write_text(json.dumps(g))
    info = merge_shards(tmp_path / "m", [s0, failed])
    assert info["summary"]["failed_batches"] == [1] and info["summary"]["examples"] == 4
    assert (tmp_path / "m" / "synthetic.jsonl").read_text() == (s0 / "synthetic.jsonl").read_text()


def test_dp_shards_with_their_own_releases_are_refused(tmp_path):
    """Two DP shards that each made their own release (no release=<dir>) spend the budget
    twice. Their release.json fingerprints and privacy records are the same but for the
    release_id (a hash of the targets), so only the targets tell the releases apart: the
    merge must refuse on them."""
    from hydra import compose, initialize_config_module

    from gmtext.config import register_configs
    from gmtext.stages.generate import run_generate

    register_configs()
    dirs = []
    for i in (0, 1):
        with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
            cfg = compose(
                config_name="generate",
                overrides=[o for o in FAST if not o.startswith("real_per_class")]
                + [
                    "privacy=dp",
                    "privacy.epsilon=4",
                    "privacy.delta=1e-3",
                    "shard.count=2",
                    f"shard.index={i}",
                    "threads=1",
                ],
            )
        run_generate(cfg, tmp_path / f"dp{i}")
        dirs.append(tmp_path / f"dp{i}")
    r0, r1 = (d / "release" for d in dirs)
    p0, p1 = (json.loads((r / "privacy.json").read_text()) for r in (r0, r1))
    assert p0["ledger"]["entries"][0]["release_id"] != p1["ledger"]["entries"][0]["release_id"]  # two artifacts
    for p in (p0, p1):  # otherwise the same record: only the targets tell the releases apart
        for e in p["ledger"]["entries"]:
            e.pop("release_id")
    assert p0 == p1
    assert (
        json.loads((r0 / "release.json").read_text())["fingerprint"]
        == json.loads((r1 / "release.json").read_text())["fingerprint"]
    )
    assert (r0 / "targets.pt").read_bytes() != (r1 / "targets.pt").read_bytes()  # independent noise
    # refused on the privacy record (its release_id hashes the targets) or on the targets themselves
    with pytest.raises(MergeError, match=r"used another release than .*\((privacy.json|release targets) differs: "):
        merge_shards(tmp_path / "m", dirs)
    assert not (tmp_path / "m").exists()
