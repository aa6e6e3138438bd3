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
from gmtext.tracking import Tracker

FAST = [
    "debug=tiny",
    "logger=wandb",
    "matcher.outer_steps=2",
    "matcher.inner_steps=2",
    "matcher.init_candidates=2",
    "projector.topk=20",
    "num_per_class=4",
    "batch_size=2",
    "real_per_class=6",
    "dataset.length=6",
    "progress=false",
]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Real offline W&B: WANDB_MODE unset (conftest disables it), every W&B dir in tmp."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var, sub in (
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_DATA_DIR", "wandb_data"),
        ("WANDB_ARTIFACT_DIR", "wandb_artifacts"),
    ):
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
        _crc, n, typ = struct.unpack("<IHB", data[pos : pos + 7])
        if typ == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
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


def metric_defs(run_path) -> dict:
    """define_metric records: {name or glob: {"step_metric", "hidden"}}."""
    out = {}
    for r in wait_for_exit_record(run_path):
        if r.WhichOneof("record_type") == "metric":
            m = r.metric
            out[m.name or m.glob_name] = {"step_metric": m.step_metric, "hidden": m.options.hidden}
    return out


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
    assert run.display_name == "generate-seed0" and run.run_id.startswith("generate-")
    assert (out / ".wandb_id.generate").read_text() == run.run_id  # stored: a re-run resumes this run
    # the resolved config of what generate uses, the experiment and Hydra's choices; no fine-tune groups
    assert config["matcher"]["outer_steps"] == 2 and config["model"]["name"] == "tiny-llama"
    assert config["seed"] == 0 and config["matcher"]["distance"] == "cos" and "experiment" in config
    assert not {"finetuner", "train", "finetune", "selector"} & set(config)

    # one table with the whole synthetic set (not one per batch)
    synth = read_jsonl(out / "synthetic.jsonl")
    (table,) = sorted((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
    assert table.name.startswith("synthetic_")
    tab = json.loads(table.read_text())
    assert tab["columns"] == ["text", "label_name", "match_loss", "perplexity", "batch"]
    assert [row[0] for row in tab["data"]] == [r["text"] for r in synth]
    assert [row[2] for row in tab["data"]] == pytest.approx([r["match_loss"] for r in synth])

    # history: admm/* against the global ADMM step, values equal the local mirror step by step
    local = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in local if r["kind"] == "step"]
    assert len(steps) == 2 * 3  # 2 batches x (outer_steps + 1)
    by_step = {row["admm/step"]: row for row in history.values() if "admm/step" in row}
    assert sorted(by_step) == [r["step"] for r in steps]  # monotonic: no sawtooth
    for rec in steps:
        row = by_step[rec["step"]]
        for k in (
            "continuous_loss",
            "admm_penalty",
            "discrete_loss",
            "best_discrete_loss",
            "perplexity",
            "batch",
            "outer_step",
        ):
            if k in rec:
                assert row[f"admm/{k}"] == pytest.approx(rec[k]), (rec["step"], k)
        assert not {"batch", "outer_step", "discrete_loss"} & set(row)  # nothing outside the admm/ family
        assert "perplexity" in rec or rec["outer_step"] == 2
    metrics = metric_defs(wb_file)
    assert metrics["admm/*"]["step_metric"] == "admm/step" and metrics["dev/*"]["step_metric"] == "train/step"
    assert all(metrics[k]["hidden"] for k in ("admm/step", "admm/batch", "admm/outer_step", "train/lr_run"))
    # summary: epsilon (inf: non-private), delta and the mean losses, as in the mirror and generate.json
    (loc_sum,) = [r for r in local if r["kind"] == "summary"]
    assert math.isinf(summary["epsilon"]) and math.isinf(loc_sum["epsilon"]) and math.isinf(s["epsilon"])
    assert summary["delta"] == loc_sum["delta"] == 0.0
    for k in ("mean_match_loss", "mean_perplexity", "examples"):
        assert summary[k] == pytest.approx(loc_sum[k]) == pytest.approx(s[k])
    assert "epsilon" not in history[max(history)]  # summary values are not history steps


def test_two_runs_in_one_process_do_not_bleed(offline_wandb):
    from gmtext.tracking import WandbTracker

    a = WandbTracker(offline_wandb / "a", mode="offline", job_type="finetune", config={"seed": 0})
    b = WandbTracker(offline_wandb / "b", mode="offline", group="grp", job_type="finetune", config={"seed": 1})
    for step in range(3):  # interleaved: both runs open at once
        a.log({"loss": 1.0 + step}, step=step)
        b.log({"loss": 10.0 + step}, step=step)
    a.summary({"accuracy": 0.5, "epsilon": math.inf})
    b.summary({"accuracy": 0.9, "epsilon": 2.0})
    a.close()
    b.close()
    b.close()  # idempotent
    # and one after the other, as the jobs of a multirun with the basic launcher
    with WandbTracker(offline_wandb / "c", mode="offline", job_type="generate", config={"seed": 2}) as c:
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

    from gmtext.tracking import WandbTracker, default_group

    saved = HydraConfig.instance().cfg
    try:
        with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
            cfg = hcompose("generate", overrides=[f"hydra.sweep.dir={tmp_path}/sweep_42"], return_hydra_config=True)
        run_cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(cfg)
        assert default_group() == "sweep_42"
        assert WandbTracker(tmp_path / "r", mode="disabled").group == "sweep_42"
        assert WandbTracker(tmp_path / "r", mode="disabled", group="mine").group == "mine"
        with open_dict(run_cfg):
            run_cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(run_cfg)
        assert default_group() is None
    finally:
        HydraConfig.instance().cfg = saved


# ---------------------------------------------------------------- W&B conventions
def test_wandb_env_vars_decide_when_the_config_is_null(offline_wandb, monkeypatch):
    """logger.mode / logger.project null (the default): WANDB_MODE / WANDB_PROJECT decide;
    an explicit value wins over them; with neither, offline / gmtext."""
    from gmtext.tracking import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "myproj")
    t = WandbTracker(offline_wandb / "a", job_type="generate")
    assert t.run is None and t.mode == "disabled" and not (offline_wandb / "a" / "wandb").exists()
    with WandbTracker(offline_wandb / "b", mode="offline", job_type="generate") as t:  # explicit mode wins
        assert t.run is not None and t.project == "myproj"
    (rb,) = offline_runs(offline_wandb / "b")
    assert wandb_contents(next(rb.glob("run-*.wandb")))[0].project == "myproj"
    with WandbTracker(offline_wandb / "c", mode="offline", project="explicit", job_type="generate") as t:
        assert t.project == "explicit"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_PROJECT")
    with WandbTracker(offline_wandb / "d", job_type="generate") as t:
        assert (t.mode, t.project) == ("offline", "gmtext") and t.run is not None


def test_rerun_resumes_the_same_run_and_summary_keeps_lists(offline_wandb):
    """A second Tracker on the same run dir and stage (a re-run, a requeued job) logs to the
    same W&B run id; per-class accuracy and the confusion matrix reach the summary; a
    fine-tune run's config carries no generation groups."""
    from gmtext.tracking import Tracker, WandbTracker

    cfg = {"seed": 3, "matcher": {"lr": 0.1}, "finetuner": {"lr": 1e-5}, "train": {"source": "real"}}
    with WandbTracker(offline_wandb / "r", mode="offline", job_type="finetune", config=cfg) as t:
        t.log({"train/loss": 1.0, "lr_run": 0, "lr_value": 1e-5}, step=0)
        t.summary({"accuracy": 0.5, "per_class_accuracy": [0.25, 0.75], "confusion": [[1, 3], [1, 3]]})
    with WandbTracker(offline_wandb / "r", mode="offline", job_type="finetune", config=cfg) as t:
        t.log({"train/loss": 0.5}, step=1)
    ids = set()
    for rd in offline_runs(offline_wandb / "r"):
        run, history, summary, config = wandb_contents(next(rd.glob("run-*.wandb")))
        ids.add(run.run_id)
        assert run.display_name == "finetune-seed3" and "matcher" not in config and config["finetuner"]["lr"] == 1e-5
        if "accuracy" in summary:
            assert summary["per_class_accuracy"] == [0.25, 0.75] and summary["confusion"] == [[1, 3], [1, 3]]
            (row,) = history.values()
            assert row["train/step"] == 0 and row["train/lr_value"] == 1e-5 and "lr_run" not in row
    assert len(ids) == 1 and ids == {(offline_wandb / "r" / ".wandb_id.finetune").read_text()}
    other = Tracker(offline_wandb / "r", job_type="generate")  # another stage in the same dir: its own id
    from gmtext.tracking import stable_run_id

    assert stable_run_id(other.run_dir, "generate") != ids.pop()


@pytest.mark.slow
def test_two_job_multirun_lands_in_one_group_with_named_runs(offline_wandb):
    """gmtext-generate -m seed=0,1 logger=wandb (offline, through W&B's env var): one group
    (the sweep dir), runs named generate-seed<N>-job<K>, Hydra's choices in the config."""
    import os
    import subprocess
    import sys

    sweep = offline_wandb / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    fast = [
        "debug=tiny",
        "logger=wandb",
        "matcher.outer_steps=1",
        "matcher.inner_steps=1",
        "matcher.init_candidates=1",
        "projector.topk=10",
        "num_per_class=2",
        "batch_size=2",
        "real_per_class=4",
        "dataset.length=5",
        "progress=false",
        "threads=1",
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import generate_main; generate_main()",
            "-m",
            "seed=0,1",
            *fast,
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=offline_wandb,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    seen = {}
    for job in ("0", "1"):
        (rd,) = offline_runs(sweep / job)
        run, history, _, config = wandb_contents(next(rd.glob("run-*.wandb")))
        seen[job] = run
        assert run.display_name == f"generate-seed{job}-job{job}" and run.project == "gmtext"
        assert config["choices"]["model"] == "tiny_llama" and config["seed"] == int(job) and "train" not in config
        assert (sweep / job / "generate.log").exists()  # the job log is named after the stage
    assert seen["0"].run_group == seen["1"].run_group == "sweep" and seen["0"].run_id != seen["1"].run_id


# ---------------------------------------------------------------- trackers are components
class ToyTracker(Tracker):
    """A user's own tracker, defined here and chosen by config alone: records every call."""

    calls: list = []

    def __init__(self, run_dir, job_type="generate", config=None, private=False, prefix="toy"):
        if not prefix.isidentifier():  # its own settings, checked once, before the stage's work
            raise ValueError(f"logger.prefix={prefix!r}: must be an identifier")
        super().__init__(run_dir, job_type, config, private)
        ToyTracker.calls.append(("init", job_type, str(run_dir), prefix))

    def log(self, metrics, step=None, kind="step"):
        super().log(metrics, step, kind)
        ToyTracker.calls.append(("log", step, dict(metrics)))

    def summary(self, metrics):
        super().summary(metrics)
        ToyTracker.calls.append(("summary", dict(metrics)))

    def log_artifact(self, name, type, files, metadata=None):
        ToyTracker.calls.append(("out", name, type, sorted(files)))

    def use_artifact(self, name, type, files, metadata=None):
        ToyTracker.calls.append(("in", name, type, sorted(files)))

    def close(self, exit_code=0):
        ToyTracker.calls.append(("close", exit_code))


def test_a_new_tracker_is_a_class_plus_a_yaml_file(compose, tmp_path, monkeypatch):
    """conf/logger/<name>.yaml naming a Tracker subclass is all it takes: `logger=toy` builds it
    with its settings, the stage hands it every metric, the summary and its artifacts, and a
    bad setting stops the stage with the tracker's one-line error before the model loads."""
    from gmtext.stages import generate as G

    (tmp_path / "conf" / "logger").mkdir(parents=True)
    (tmp_path / "conf" / "logger" / "toy.yaml").write_text(f"_target_: {__name__}.ToyTracker\nprefix: mine\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    ToyTracker.calls.clear()
    s = G.run_generate(compose(FAST + [search, "logger=toy"]), tmp_path / "run")
    calls = ToyTracker.calls
    assert calls[0] == ("init", "generate", str(tmp_path / "run"), "mine") and calls[-1] == ("close", 0)
    steps = [c for c in calls if c[0] == "log"]
    local = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == len(local) == 2 * 3 and [c[1] for c in steps] == [r["step"] for r in local]
    assert steps[0][2]["outer_step"] == 0 and "best_discrete_loss" in steps[-1][2]
    (summ,) = [c for c in calls if c[0] == "summary"]
    assert summ[1]["examples"] == s["examples"] == 8 and summ[1]["mean_match_loss"] == pytest.approx(
        s["mean_match_loss"]
    )
    assert ("out", "release-demo", "release", ["privacy.json", "release.json", "targets.pt"]) in calls  # made here
    assert ("out", "synthetic-demo", "synthetic", ["generate.json", "synthetic.jsonl"]) in calls

    # the same class selected by override alone, with a bad setting: refused before the model loads
    def no_model(*a, **k):
        raise AssertionError("model loaded despite a bad tracker setting")

    monkeypatch.setattr(G, "load_generator_model", no_model)
    with pytest.raises(ValueError, match=r"^logger.prefix='not ok': must be an identifier$"):
        G.run_generate(compose(FAST + [search, "logger=toy", "logger.prefix='not ok'"]), tmp_path / "bad")
    # or without a YAML file: the class by override alone (gmtext-select on the pool above)
    from gmtext.stages.select import run_select

    ToyTracker.calls.clear()
    sel = run_select(
        compose(
            FAST + ["logger=none", f"logger._target_={__name__}.ToyTracker", f"pool={tmp_path / 'run'}"],
            config_name="select",
        ),
        tmp_path / "sel",
    )
    calls = ToyTracker.calls
    assert calls[0][:2] == ("init", "select") and calls[-1] == ("close", 0)
    assert ("in", "synthetic-demo", "synthetic", ["generate.json", "synthetic.jsonl"]) in calls
    assert ("out", "selected-demo", "selected", ["select.json", "selected.jsonl"]) in calls
    (summ,) = [c[1] for c in calls if c[0] == "summary"]
    assert summ["selected"] == sel["selected"] and summ["pool"] == 8


@pytest.mark.parametrize("stage", ["release", "generate", "finetune"])
def test_a_failed_model_load_ends_the_wandb_run_as_failed(compose, offline_wandb, monkeypatch, stage):
    """The W&B run starts before the model loads: a failure there reaches the dashboard as a
    failed run (exit code 1), not as no run at all."""
    from gmtext.stages import finetune, generate, release

    def broken(cfg):
        raise OSError("model weights unreadable")

    monkeypatch.setattr(generate, "load_generator_model", broken)
    monkeypatch.setattr(finetune, "load_generator_model", broken)
    monkeypatch.setattr(release, "load_generator_model", broken)
    extra = ["train=real"] if stage == "finetune" else []
    cfg = compose(FAST + extra + ["logger=wandb", "logger.mode=offline"], config_name=stage)
    fn = {"release": release.run_release, "generate": generate.run_generate, "finetune": finetune.run_finetune}[stage]
    with pytest.raises(OSError, match="unreadable"):
        fn(cfg, offline_wandb / "run")
    (rd,) = offline_runs(offline_wandb / "run")
    recs = wait_for_exit_record(next(rd.glob("run-*.wandb")))
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    (exit_rec,) = [r.exit for r in recs if r.WhichOneof("record_type") == "exit"]
    assert run.job_type == stage and exit_rec.exit_code == 1


def test_dp_release_run_is_not_watched(compose, offline_wandb):
    """A run that makes a DP release records no console output and no system metrics (the
    mechanism's progress and resource use over time depend on the private records), logs no
    timing of it, and uploads only the release dir's three public files."""
    from gmtext.stages.release import run_release

    s = run_release(
        compose(
            ["debug=tiny", "privacy=dp", "progress=true", "logger=wandb", "logger.mode=offline"], config_name="release"
        ),
        offline_wandb / "run",
    )
    assert s["mechanism"] == "gaussian" and not s["reused"]
    (rd,) = offline_runs(offline_wandb / "run")
    recs = wait_for_exit_record(next(rd.glob("run-*.wandb")))
    kinds = {r.WhichOneof("record_type") for r in recs}
    assert not {"stats", "output", "output_raw"} & kinds, kinds
    assert not (rd / "files" / "output.log").exists()
    (art,) = [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact"]
    assert (art.type, art.name) == ("release", "release-demo") and not art.use_after_commit
    assert sorted(c.path for c in art.manifest.contents) == ["privacy.json", "release.json", "targets.pt"]
    _, _, summary, _ = wandb_contents(next(rd.glob("run-*.wandb")))
    assert summary["epsilon"] == pytest.approx(s["epsilon"]) and "wall_seconds" not in summary
    # W&B stamps every row and the run with wall-clock times: the run starts after the
    # mechanism ended (the release's targets are written), so none of them times it
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    done = (offline_wandb / "run" / "release" / "targets.pt").stat().st_mtime
    assert run.start_time.ToSeconds() >= int(done)


def _artifacts(recs):
    """{(use|out, type): (name, digest)} of a run's artifact records."""
    out = {}
    for r in recs:
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type != "run_table":
            a = r.artifact
            out[("use" if a.use_after_commit else "out", a.type)] = (a.name, a.digest)
    return out


@pytest.mark.slow  # ~60 s on 2 busy cores: eight W&B runs and four model loads
def test_pipeline_multirun_is_one_group_of_named_runs_linked_by_artifacts(offline_wandb):
    """gmtext-pipeline -m seed=0,1 logger=wandb (offline through W&B's env var, Hydra's basic
    launcher): both jobs' four stage runs land in one group (the sweep dir), named
    <stage>-seed<N>-job<N>, and each stage's input artifact is the previous stage's output
    (same name and digest: W&B links them), release → synthetic → selected → metrics."""
    import os
    import subprocess
    import sys

    sweep = offline_wandb / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    fast = [
        "model=tiny_llama",
        "matcher.outer_steps=1",
        "matcher.inner_steps=1",
        "matcher.init_candidates=1",
        "projector.topk=10",
        "num_per_class=2",
        "batch_size=2",
        "real_per_class=4",
        "dataset.length=5",
        "progress=false",
        "threads=1",
        "finetuner.max_steps=1",
        "finetuner.batch_size=4",
        "finetune.eval_limit=4",
        "finetune.dev_size=0",
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import pipeline_main; pipeline_main()",
            "-m",
            "seed=0,1",
            *fast,
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=offline_wandb,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    groups, ids = set(), set()
    for job in ("0", "1"):
        runs = {}
        for rd in offline_runs(sweep / job):
            recs = wait_for_exit_record(next(rd.glob("run-*.wandb")))
            (run,) = [x.run for x in recs if x.WhichOneof("record_type") == "run"]
            runs[run.job_type] = (run, _artifacts(recs), recs)
            groups.add(run.run_group)
            ids.add(run.run_id)
        assert sorted(runs) == ["finetune", "generate", "release", "select"]
        for stage, (run, _, recs) in runs.items():
            assert run.display_name == f"{stage}-seed{job}-job{job}"
            assert [x.exit.exit_code for x in recs if x.WhichOneof("record_type") == "exit"] == [0]
        arts = {stage: a for stage, (_, a, _) in runs.items()}
        assert set(arts["release"]) == {("out", "release"), ("out", "probe")}  # selector=margin: the probe, same budget
        assert arts["generate"][("use", "release")] == arts["release"][("out", "release")]
        assert arts["select"][("use", "probe")] == arts["release"][("out", "probe")]
        assert arts["release"][("out", "probe")][0] == "probe-demo"
        assert arts["select"][("use", "synthetic")] == arts["generate"][("out", "synthetic")]
        assert arts["finetune"][("use", "selected")] == arts["select"][("out", "selected")]
        assert arts["finetune"][("out", "metrics")][0] == "metrics-demo"
        assert arts["generate"][("out", "synthetic")][0] == "synthetic-demo"
        # the fine-tune run of a pipeline carries the generation settings its accuracy depends on
        ft = [rd for rd in offline_runs(sweep / job) if "-finetune-" in rd.name][0]
        _, _, summary, config = wandb_contents(next(ft.glob("run-*.wandb")))
        assert config["matcher"]["outer_steps"] == 1 and config["seed"] == int(job)
        assert {"accuracy", "per_class_accuracy", "confusion", "epsilon"} <= set(summary)
    assert groups == {"sweep"} and len(ids) == 8
    # generation differs by seed: the two jobs' synthetic artifacts are different versions
    assert (sweep / "0" / "synthetic.jsonl").read_bytes() != (sweep / "1" / "synthetic.jsonl").read_bytes()
