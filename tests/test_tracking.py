"""W&B tracking: real offline runs, read back from the .wandb log and compared with the
local metrics.jsonl mirror. Nothing here contacts a W&B server (mode=offline)."""
import copy
import json
import math
import struct
import time
from pathlib import Path

import pytest

from gmtext.artifacts import read_jsonl

FAST = ["model=tiny_llama", "matcher.outer_steps=2", "matcher.inner_steps=2", "matcher.init_candidates=2",
        "projector.topk=20", "num_per_class=4", "batch_size=2", "real_per_class=6", "dataset.length=6", "progress=false"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Real offline W&B: WANDB_MODE unset (conftest disables it), every W&B dir in tmp."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_CONFIG_DIR", "wandb_config"),
                     ("WANDB_DATA_DIR", "wandb_data"), ("WANDB_ARTIFACT_DIR", "wandb_artifacts")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "")  # never pick up a real key
    return tmp_path


# ---- a minimal reader for the .wandb transaction log (LevelDB log format of protobuf Records) ----
def read_wandb_records(path):
    """Records of a run-*.wandb file: header ':W&B' + magic + version (7 bytes), then 32 KiB
    blocks of chunks [crc32 u32][length u16][type u8] (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if typ == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if typ in (1, 2) else buf + chunk
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item):
    return "/".join(item.nested_key) if item.nested_key else item.key


def wait_for_exit_record(run_path, timeout=60.0):
    """wandb-core writes the offline log asynchronously: run.finish() can return before the
    file is flushed (it is complete at the latest when the process exits). Poll for the
    run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_wandb_records(run_path)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def wandb_contents(run_path):
    """(run record, history rows keyed by _step, merged summary, config dict)."""
    recs = wait_for_exit_record(run_path)
    run, history, summary, config = None, {}, {}, {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            summary.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
    return run, history, summary, config


def offline_runs(root):
    return sorted(Path(root).glob("wandb/offline-run-*"))


def test_generate_offline_wandb_run(compose, offline_wandb):
    from gmtext.stages.generate import run_generate

    out = offline_wandb / "run"
    s = run_generate(compose(FAST + ["logger=wandb", "logger.mode=offline", "logger.tags=[t1]"]), out)
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    (wb_file,) = runs[0].glob("run-*.wandb")
    run, history, summary, config = wandb_contents(wb_file)
    assert run.job_type == "generate" and run.run_group == "" and list(run.tags) == ["t1"]
    # the resolved config
    assert config["matcher"]["outer_steps"] == 2 and config["model"]["name"] == "tiny-llama"
    assert config["seed"] == 0

    # per-batch text tables hold exactly the synthetic texts
    synth = read_jsonl(out / "synthetic.jsonl")
    tables = sorted((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 2
    by_batch = {}
    for t in tables:
        b = int(t.name.split("_")[1])  # batch_<b>_<step>_<hash>.table.json
        tab = json.loads(t.read_text())
        assert tab["columns"] == ["text", "label_name", "match_loss", "perplexity"]
        by_batch[b] = tab["data"]
    for b in (0, 1):
        mine = [r for r in synth if r["batch"] == b]
        assert [row[0] for row in by_batch[b]] == [r["text"] for r in mine]
        assert [row[2] for row in by_batch[b]] == pytest.approx([r["match_loss"] for r in mine])

    # history values equal the local mirror, step by step
    local = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in local if r["kind"] == "step"]
    assert len(steps) == 2 * 3  # 2 batches x (outer_steps + 1)
    for rec in steps:
        row = history[rec["step"]]
        for k in ("continuous_loss", "admm_penalty", "discrete_loss", "best_discrete_loss", "perplexity", "batch", "outer_step"):
            if k in rec:
                assert row[k] == pytest.approx(rec[k]), (rec["step"], k)
        assert "perplexity" in rec or rec["outer_step"] == 2
    # summary: epsilon (inf: non-private), delta and the mean losses, as in the mirror and generate.json
    (loc_sum,) = [r for r in local if r["kind"] == "summary"]
    assert math.isinf(summary["epsilon"]) and math.isinf(loc_sum["epsilon"]) and math.isinf(s["epsilon"])
    assert summary["delta"] == loc_sum["delta"] == 0.0
    for k in ("mean_match_loss", "mean_perplexity", "examples"):
        assert summary[k] == pytest.approx(loc_sum[k]) == pytest.approx(s[k])
    assert "epsilon" not in history[max(history)]  # summary values are not history steps


def test_two_runs_in_one_process_do_not_bleed(offline_wandb):
    from gmtext.tracking import Tracker

    a = Tracker(offline_wandb / "a", name="wandb", mode="offline", job_type="finetune", config={"seed": 0})
    b = Tracker(offline_wandb / "b", name="wandb", mode="offline", group="grp", job_type="finetune", config={"seed": 1})
    for step in range(3):  # interleaved: both runs open at once
        a.log({"loss": 1.0 + step}, step=step)
        b.log({"loss": 10.0 + step}, step=step)
    a.summary({"accuracy": 0.5, "epsilon": math.inf})
    b.summary({"accuracy": 0.9, "epsilon": 2.0})
    a.close()
    b.close()
    b.close()  # idempotent
    # and one after the other, as the jobs of a multirun with the basic launcher
    with Tracker(offline_wandb / "c", name="wandb", mode="offline", job_type="generate", config={"seed": 2}) as c:
        c.log({"loss": 100.0}, step=0)
    (rc,) = offline_runs(offline_wandb / "c")
    runc, hc, _, cc = wandb_contents(next(rc.glob("run-*.wandb")))
    assert hc[0]["loss"] == 100.0 and cc["seed"] == 2 and runc.job_type == "generate"
    (ra,), (rb,) = offline_runs(offline_wandb / "a"), offline_runs(offline_wandb / "b")
    runa, ha, sa, ca = wandb_contents(next(ra.glob("run-*.wandb")))
    runb, hb, sb, cb = wandb_contents(next(rb.glob("run-*.wandb")))
    assert len({runa.run_id, runb.run_id, runc.run_id}) == 3
    assert (runa.run_group, runb.run_group) == ("", "grp")
    assert [ha[i]["loss"] for i in range(3)] == [1.0, 2.0, 3.0]
    assert [hb[i]["loss"] for i in range(3)] == [10.0, 11.0, 12.0]
    assert (sa["accuracy"], sb["accuracy"], sb["epsilon"]) == (0.5, 0.9, 2.0) and math.isinf(sa["epsilon"])
    assert (ca["seed"], cb["seed"]) == (0, 1)


def test_default_group_is_the_sweep_dir_name(compose, tmp_path):
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from gmtext.tracking import Tracker, default_group

    saved = HydraConfig.instance().cfg
    try:
        with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
            cfg = hcompose("generate", overrides=[f"hydra.sweep.dir={tmp_path}/sweep_42"], return_hydra_config=True)
        run_cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        assert default_group() == "sweep_42"
        assert Tracker(tmp_path / "r", name="none").group == "sweep_42"
        assert Tracker(tmp_path / "r", name="none", group="mine").group == "mine"
        with open_dict(run_cfg):
            run_cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(run_cfg)
        assert default_group() is None
    finally:
        HydraConfig.instance().cfg = saved
