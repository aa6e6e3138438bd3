"""Hardening: bad input ends in one clear line and exit code 2 with nothing
half-written; kills, non-finite steps and a second writer never corrupt a run dir.

Bad input goes through the stage functions the console scripts call (`run_<stage>(cfg,
run_dir)` with a config composed like the CLI's) or through the console scripts
themselves in a subprocess. Faults use real SIGKILLs of the console scripts on the tiny
random model and the builtin demo set. docs/troubleshooting.md lists every message.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gmtext.artifacts import _owner, read_jsonl, run_lock, write_jsonl
from gmtext.cli import error_line

TINY = ["debug=tiny", "progress=false", "threads=1"]
GEN = TINY + [
    "matcher.outer_steps=2",
    "matcher.inner_steps=2",
    "matcher.init_candidates=2",
    "projector.topk=20",
    "num_per_class=4",
    "batch_size=2",
    "real_per_class=6",
    "dataset.length=6",
]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("GMTEXT_TRACEBACK", None)
ENV.pop("HYDRA_FULL_ERROR", None)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """threads=1 (for bitwise comparison with the subprocesses) must not leak into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def console(stage: str) -> list[str]:
    exe = Path(sys.executable).with_name(f"gmtext-{stage}")
    return (
        [str(exe)] if exe.exists() else [sys.executable, "-c", f"from gmtext.cli import {stage}_main; {stage}_main()"]
    )


def cli(stage: str, *overrides, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(console(stage) + list(overrides), capture_output=True, text=True, timeout=timeout, env=ENV)


def one_line_error(r: subprocess.CompletedProcess, stage: str) -> str:
    """The run failed with exit code 2 and exactly one error line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"gmtext-{stage}: error: ")]
    assert len(lines) == 1, r.stderr[-2000:]
    other = [
        ln
        for ln in r.stderr.splitlines()
        if ln.strip() and ln not in lines and "Warning" not in ln and not ln.startswith(" ")
    ]
    assert not other, other
    return lines[0]


def no_outputs(run_dir: Path) -> None:
    """Nothing but Hydra's own .hydra/ and job log: no artifact, no lock, no temp file."""
    left = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert set(left) <= {".hydra"} | {
        f"{s}.log" for s in ("generate", "release", "select", "finetune", "pipeline", "audit")
    }, left


def data_dir(tmp_path: Path, rows, split="train", raw: bytes | None = None) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    f = d / f"{split}.jsonl"
    f.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return d


def good_rows(n=6):
    return [{"text": f"review number {i} of the film", "label": i % 2} for i in range(n)]


def run_release_with(compose, tmp_path, *overrides):
    from gmtext.stages.release import run_release

    return run_release(compose(GEN + list(overrides), config_name="release"), tmp_path / "run")


def start(cmd: list[str], log: Path, slow_fsync: float = 0.0) -> subprocess.Popen:
    """Start a console script in the background, its output in a file (a pipe nobody reads
    could fill up). slow_fsync > 0 gives it a slow disk: every fsync takes that long, so a
    kill right after a file appears lands in the middle of the next write."""
    env = ENV
    if slow_fsync:
        site = log.with_suffix(".site")
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            f"import os, time\n_fsync = os.fsync\n"
            f"def fsync(fd):\n    time.sleep({slow_fsync})\n    _fsync(fd)\nos.fsync = fsync\n"
        )
        env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    p.log = log
    return p


def wait_for(cond, proc: subprocess.Popen, timeout=240, what=""):
    t = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {proc.log.read_text()[-2000:]}")
        if time.monotonic() - t > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if "seconds" not in k and k != "timings"}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


# ============================================================ bad input → one line, exit 2
def test_unknown_group_option_is_one_line(tmp_path):
    line = one_line_error(cli("generate", "projector=fancy", f"hydra.run.dir={tmp_path / 'run'}"), "generate")
    assert line == (
        "gmtext-generate: error: Could not find 'projector/fancy'; available options: lm_topk, lm_topk_paper, nearest"
    )
    assert not (tmp_path / "run").exists()


def test_misspelled_key_is_one_line_with_accepted_keys(tmp_path):
    line = one_line_error(cli("generate", "matcher.rhoo=1", f"hydra.run.dir={tmp_path / 'run'}"), "generate")
    assert "'matcher.rhoo'" in line and "Key 'rhoo' not in 'ADMMConfig'" in line
    assert "accepted keys: " in line and " rho," in line
    line = one_line_error(cli("finetune", "matcher.outer_steps=many", f"hydra.run.dir={tmp_path / 'run'}"), "finetune")
    assert "matcher.outer_steps=many" in line and "could not be converted to Integer" in line


def test_missing_dataset_path_cli(tmp_path):
    run = tmp_path / "run"
    line = one_line_error(
        cli("generate", *GEN, f"dataset.path={tmp_path / 'nowhere'}", f"hydra.run.dir={run}"), "generate"
    )
    assert (
        line
        == f"gmtext-generate: error: dataset.path={str(tmp_path / 'nowhere')!r} does not exist or is not a directory"
    )
    no_outputs(run)


def test_empty_dataset_dir_and_empty_file(compose, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(
        ValueError, match=r"split 'train' not found in .*data \(expected train.jsonl or train.csv; found: none\)"
    ):
        run_release_with(compose, tmp_path, f"dataset.path={tmp_path / 'data'}")
    d = data_dir(tmp_path, [], raw=b"\n  \n")
    with pytest.raises(ValueError, match=r"train.jsonl: no rows"):
        run_release_with(compose, tmp_path, f"dataset.path={d}")
    no_outputs(tmp_path / "run")


def test_missing_split(compose, tmp_path):
    d = data_dir(tmp_path, good_rows())
    with pytest.raises(ValueError, match=r"split 'dev' not found in .* found: \['train'\]"):
        run_release_with(compose, tmp_path, f"dataset.path={d}", "dataset.train_split=dev")
    from gmtext.stages.finetune import run_finetune

    with pytest.raises(
        ValueError, match=r"split 'validation' not found"
    ):  # fine-tuning evaluates on dataset.eval_split
        run_finetune(compose(TINY + ["train=none", f"dataset.path={d}"], config_name="finetune"), tmp_path / "ft")
    assert not (tmp_path / "ft" / "metrics.json").exists()


@pytest.mark.parametrize("field", ["text", "label"])
def test_missing_text_or_label_field(compose, tmp_path, field):
    rows = good_rows()
    del rows[3][field]  # not only the first row is checked
    d = data_dir(tmp_path, rows)
    with pytest.raises(
        ValueError,
        match=(
            rf"train.jsonl row 3: field '{field}' missing \(row has: .*\); "
            r"set dataset.text_field / dataset.label_field"
        ),
    ):
        run_release_with(compose, tmp_path, f"dataset.path={d}")
    d = data_dir(tmp_path, good_rows())
    with pytest.raises(ValueError, match=r"row 0: field 'body' missing"):
        run_release_with(compose, tmp_path, f"dataset.path={d}", "dataset.text_field=body")
    no_outputs(tmp_path / "run")


def test_label_outside_declared_names_and_empty_class(compose, tmp_path):
    d = data_dir(tmp_path, good_rows() + [{"text": "so so", "label": "meh"}])
    with pytest.raises(
        ValueError, match=r"row 6: label 'meh' outside the declared labels \['negative', 'positive'\] \(ids 0..1\)"
    ):
        run_release_with(compose, tmp_path, f"dataset.path={d}")
    d = data_dir(tmp_path, [{"text": "fine", "label": 2}])
    with pytest.raises(ValueError, match=r"label 2 outside the declared labels"):
        run_release_with(compose, tmp_path, f"dataset.path={d}")
    d = data_dir(tmp_path, [{"text": f"t{i}", "label": "negative"} for i in range(5)])
    with pytest.raises(ValueError, match=r"class\(es\) \['positive'\] have zero examples"):
        run_release_with(compose, tmp_path, f"dataset.path={d}")
    no_outputs(tmp_path / "run")


def test_empty_texts_are_skipped_and_counted(compose, tmp_path, caplog):
    from gmtext.data import load_split

    rows = good_rows(8) + [{"text": "", "label": 0}, {"text": " \t ", "label": 1}, {"text": None, "label": 1}]
    d = data_dir(tmp_path, rows)
    split = load_split("train", ["negative", "positive"], path=str(d))
    assert split.skipped_empty == 3 and len(split.examples) == 8
    caplog.clear()
    s = run_release_with(compose, tmp_path, f"dataset.path={d}")
    assert s["divisors"] and (tmp_path / "run" / "release" / "release.json").exists()
    # the count is a statistic of the (private) file: never in the job log
    assert not any("skipped" in r.getMessage() for r in caplog.records)
    # ...but a class left with nothing but empty texts is refused
    d = data_dir(tmp_path, [{"text": "  ", "label": 1}, {"text": "ok", "label": 0}])
    with pytest.raises(ValueError, match=r"class\(es\) \['positive'\] have zero examples"):
        run_release_with(compose, tmp_path / "b", f"dataset.path={d}")


def test_non_utf8_bytes(compose, tmp_path):
    d = data_dir(tmp_path, None, raw=b'{"text": "caf\xe9 au lait", "label": 0}\n')
    with pytest.raises(ValueError, match=r"train.jsonl: not valid UTF-8 at byte 13; re-encode the file as UTF-8"):
        run_release_with(compose, tmp_path, f"dataset.path={d}")
    from gmtext.stages.select import run_select

    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b'{"text": "\xff", "label": 0, "match_loss": 0.1, "perplexity": 2.0}\n')
    with pytest.raises(ValueError, match=r"pool.jsonl: not valid UTF-8 at byte 10"):
        run_select(compose(["logger=none", f"pool={pool}"], config_name="select"), tmp_path / "sel")
    assert not (tmp_path / "sel" / "selected.jsonl").exists()


@pytest.mark.parametrize(
    "words,message",
    [
        ("['',' great']", "verbalizer '' tokenizes to nothing; choose a non-empty word"),
        (
            "[' great film',' great']",
            "verbalizers [' great film', ' great'] share their first token; each class needs a distinct first token",
        ),
    ],
)
def test_bad_verbalizers(compose, tmp_path, words, message):
    from gmtext.stages.generate import run_generate

    with pytest.raises(ValueError) as e:
        run_generate(compose(GEN + [f"dataset.verbalizers={words}"]), tmp_path / "run")
    assert str(e.value) == message
    no_outputs(tmp_path / "run")


def test_sequence_longer_than_model_context(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune
    from gmtext.stages.generate import run_generate

    with pytest.raises(
        ValueError,
        match=(
            r"dataset.length=300: must be >= 1 and fit the model context \(256 tokens\) "
            r"with the \d+ template tokens around it; at most 2\d\d"
        ),
    ):
        run_generate(compose(GEN + ["dataset.length=300"]), tmp_path / "g")
    with pytest.raises(ValueError, match=r"dataset.length=0: must be >= 1"):
        run_generate(compose(GEN + ["dataset.length=0"]), tmp_path / "g")
    no_outputs(tmp_path / "g")
    with pytest.raises(ValueError, match=r"dataset.max_text_tokens=1000: .* model context \(256 tokens\)"):
        run_release_with(compose, tmp_path, "dataset.max_text_tokens=1000")
    no_outputs(tmp_path / "run")
    with pytest.raises(ValueError, match=r"finetuner.max_text_tokens=999: .* model context \(256 tokens\)"):
        run_finetune(
            compose(TINY + ["train=none", "finetuner.max_text_tokens=999"], config_name="finetune"), tmp_path / "ft"
        )
    assert not (tmp_path / "ft" / "metrics.json").exists()


def test_topk_out_of_range(compose, tmp_path):
    from gmtext.stages.generate import run_generate

    with pytest.raises(ValueError, match=r"^projector.topk=-3 must be a positive integer$"):
        run_generate(compose(GEN + ["projector.topk=-3"]), tmp_path / "run")
    with pytest.raises(ValueError, match=r"^projector.topk=100000 exceeds the allowed vocabulary \(\d+ tokens\)$"):
        run_generate(compose(GEN + ["projector.topk=100000"]), tmp_path / "run")
    no_outputs(tmp_path / "run")  # refused before the release is made: no pass over real data


@pytest.mark.parametrize(
    "override,message",
    [
        ("privacy.epsilon=0", "privacy.epsilon=0.0: accepted: a finite number > 0"),
        ("privacy.epsilon=-1", "privacy.epsilon=-1.0: accepted: a finite number > 0"),
        ("privacy.delta=0", "privacy.delta=0.0: accepted: a number in (0, 1), well below 1/N"),
        ("privacy.delta=1", "privacy.delta=1.0: accepted: a number in (0, 1), well below 1/N"),
        ("privacy.clip_norm=0", "privacy.clip_norm=0.0: must be a finite number > 0"),
    ],
)
def test_dp_parameters_out_of_range(compose, tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        run_release_with(compose, tmp_path, "privacy=dp", override)
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()


def test_dp_parameter_cli(tmp_path):
    line = one_line_error(
        cli("release", *TINY, "privacy=dp", "privacy.delta=1.5", f"hydra.run.dir={tmp_path / 'run'}"), "release"
    )
    assert line == "gmtext-release: error: privacy.delta=1.5: accepted: a number in (0, 1), well below 1/N"
    no_outputs(tmp_path / "run")


def test_release_from_other_model_or_dataset_is_refused(compose, tmp_path):
    from gmtext.stages.generate import run_generate

    run_release_with(compose, tmp_path)
    rel = tmp_path / "run" / "release"
    for other in ("model.tiny_layers=3", "dataset.name=other_demo", "matched_params=[final_norm]"):
        with pytest.raises(
            ValueError,
            match=r"release fingerprint \w+ does not match this config \(\w+\): it was made for another model, dataset",
        ):
            run_generate(compose(GEN + [f"release={rel}", other]), tmp_path / "g")
        assert not (tmp_path / "g" / "synthetic.jsonl").exists()
    assert (
        run_generate(compose(GEN + [f"release={rel}"]), tmp_path / "ok")["examples"] == 8
    )  # the same config reuses it


def test_finetune_wrong_synthetic_schema_cli(tmp_path):
    bad = tmp_path / "synthetic.jsonl"
    bad.write_text(
        json.dumps({"text": "a fine film", "label": 1})
        + "\n"
        + json.dumps({"sentence": "no text field", "label": 0})
        + "\n"
    )
    run = tmp_path / "run"
    line = one_line_error(
        cli("finetune", *TINY, "train=synthetic", f"train.path={bad}", f"hydra.run.dir={run}"), "finetune"
    )
    assert line == (
        f"gmtext-finetune: error: {bad}:2: missing field(s) ['text'] (a synthetic set needs ['text', 'label']; "
        f"row has: ['label', 'sentence'])"
    )
    no_outputs(run)


def test_output_dir_not_writable_cli(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = one_line_error(cli("select", f"hydra.run.dir={blocker / 'run'}"), "select")
    assert line == (
        f"gmtext-select: error: cannot write {blocker / 'run'}: Not a directory; "
        "choose a writable hydra.run.dir with free space"
    )


def test_output_dir_read_only(compose, tmp_path, monkeypatch):
    from gmtext.stages.select import run_select

    pool = tmp_path / "pool.jsonl"
    write_jsonl(pool, [{"text": "t", "label": k, "match_loss": 0.1, "perplexity": 2.0} for k in (0, 1)])
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    if os.geteuid() == 0:  # root ignores the mode: refuse writes below run as the kernel does for everyone else
        real_open = os.open

        def guarded(path, flags, *a, **k):
            if Path(path).is_relative_to(run) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", guarded)
    try:
        with pytest.raises(PermissionError) as e:
            run_select(compose(["logger=none", f"pool={pool}"], config_name="select"), run)
    finally:
        run.chmod(0o700)
    assert (
        error_line(e.value)
        == f"cannot write {run / '.select.lock'}: Permission denied; choose a writable hydra.run.dir with free space"
    )
    assert not list(run.iterdir())


def test_disk_full_keeps_previous_complete_file(compose, tmp_path, monkeypatch):
    from gmtext.stages.select import run_select

    pool = tmp_path / "pool.jsonl"
    write_jsonl(pool, [{"text": f"t{i}", "label": i % 2, "match_loss": i / 10, "perplexity": 2.0} for i in range(10)])
    run = tmp_path / "sel"
    run_select(compose(["logger=none", "selector=best", f"pool={pool}"], config_name="select"), run)
    before = (run / "selected.jsonl").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    # the same config (another one is refused before any write) on a pool whose scores changed
    write_jsonl(
        pool, [{"text": f"t{i}", "label": i % 2, "match_loss": 1 - i / 10, "perplexity": 2.0} for i in range(10)]
    )
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        run_select(compose(["logger=none", "selector=best", f"pool={pool}"], config_name="select"), run)
    assert e.value.errno == errno.ENOSPC
    assert error_line(e.value) == (
        f"cannot write {run / 'selected.jsonl'}: No space left on device; "
        "choose a writable hydra.run.dir with free space"
    )
    assert (run / "selected.jsonl").read_bytes() == before  # the previous complete file survives
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".lock")]


# ======================================================================= faults
def _gen_cmd(run: Path) -> list[str]:
    # 10 batches of one sequence per class, so a kill lands between finished batches
    over = [o for o in GEN if not o.startswith(("num_per_class", "batch_size"))]
    return console("generate") + over + ["num_per_class=10", "batch_size=1", f"hydra.run.dir={run}"]


@pytest.mark.slow
def test_kill9_generate_resumes_to_the_uninterrupted_result_and_a_second_writer_is_refused(compose, tmp_path):
    from gmtext.stages.generate import run_generate

    run = tmp_path / "killed"
    cmd = _gen_cmd(run)
    a = start(cmd, tmp_path / "a.log", slow_fsync=0.5)  # the kill lands in the write that follows a finished batch
    # the lock file exists a moment before it names its holder (flock first, then the pid): wait until
    # it reads as the refusal below will read it
    wait_for(lambda: _owner(run / ".generate.lock") == a.pid, a, what="the run took its lock")
    # a second process on the same run dir is refused while the first one holds it
    # (paused, so it cannot finish meanwhile)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert one_line_error(b, "generate") == (
        f"gmtext-generate: error: {run} is in use by process {a.pid} (generate); "
        "wait for it or use another hydra.run.dir"
    )
    wait_for(lambda: (run / "batches" / "batch_00000.jsonl").exists(), a, what="a finished batch")
    kill9(a)
    done = sorted(p.name for p in (run / "batches").glob("batch_*.jsonl"))
    assert 1 <= len(done) < 10, done
    assert not (run / "synthetic.jsonl").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)  # the same command again
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "generate.json").read_text())["summary"]
    assert summary["batches_generated_now"] == 10 - len(done) and summary["examples"] == 20

    ref = tmp_path / "uninterrupted"
    over = [o for o in cmd[len(console("generate")) :] if not o.startswith("hydra.")]
    run_generate(compose(over), ref)
    assert (run / "synthetic.jsonl").read_text() == (ref / "synthetic.jsonl").read_text()
    assert sorted(p.name for p in (run / "batches").iterdir() if not p.name.startswith(".")) == [
        f"batch_{b:05d}.jsonl" for b in range(10)
    ]
    # the log reads like one run: each (batch, outer step) once, the same values as uninterrupted
    steps = lambda d: [strip_timing(x) for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "step"]
    assert steps(run) == steps(ref) and len(steps(run)) == 10 * 3


def test_kill9_select_rerun_gives_the_uninterrupted_result(compose, tmp_path):
    from gmtext.stages.select import run_select

    pool = tmp_path / "pool" / "synthetic.jsonl"
    write_jsonl(
        pool,
        [
            {
                "text": f"synthetic text {i} " + "word " * (i % 40),
                "label": i % 2,
                "match_loss": ((i * 7919) % 1000) / 1000,
                "perplexity": 1.0 + i % 97,
                "batch": i // 10,
            }
            for i in range(20_000)
        ],
    )
    run = tmp_path / "killed"
    cmd = console("select") + ["logger=none", "selector=best", f"pool={pool.parent}", f"hydra.run.dir={run}"]
    p = start(cmd, tmp_path / "p.log", slow_fsync=3)  # a slow disk: the kill lands mid-write
    wait_for(lambda: any(run.glob(".selected.jsonl.*.tmp")), p, what="selected.jsonl being written")
    kill9(p)
    assert not (run / "selected.jsonl").exists()  # a kill mid-write leaves no partial file under the real name
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = tmp_path / "uninterrupted"
    run_select(compose(["logger=none", "selector=best", f"pool={pool.parent}"], config_name="select"), ref)
    assert (run / "selected.jsonl").read_bytes() == (ref / "selected.jsonl").read_bytes()
    assert len(read_jsonl(run / "selected.jsonl")) == 20_000


FT = TINY + [
    "train=real",
    "train.size=20",
    "finetuner.max_steps=60",
    "finetuner.batch_size=4",
    "finetuner.lr=1e-3",
    "finetune.dev_size=0",
    "finetune.eval_limit=8",
]


def test_kill9_finetune_restarts_cleanly(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune

    run = tmp_path / "killed"
    cmd = console("finetune") + FT + [f"hydra.run.dir={run}"]
    p = start(cmd, tmp_path / "p.log")
    logged = lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("train/loss") >= 2
    wait_for(logged, p, what="training steps")
    kill9(p)
    assert not (run / "metrics.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]

    ref = tmp_path / "uninterrupted"
    run_finetune(compose(FT, config_name="finetune"), ref)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, ref))
    assert strip_timing(got) == strip_timing(want) and got["steps"] == 60
    # one training curve, not the killed attempt's steps followed by the restart's
    recs = [strip_timing(x) for x in read_jsonl(run / "metrics.jsonl")]
    assert recs == [strip_timing(x) for x in read_jsonl(ref / "metrics.jsonl")]
    assert [x["step"] for x in recs if "train/loss" in x] == list(range(60))


def _poison(monkeypatch, when, record=None):
    """Make the x-step's matching loss NaN (hence its x-gradient) whenever when(state) is true;
    state counts matcher runs (batches) and x-step loss evaluations; record(state, x) sees
    every x-step evaluation."""
    from gmtext.matching import admm
    from gmtext.matching.objective import MatchingObjective

    state = {"call": 0, "x_steps": 0}
    real_run, real_losses = admm.ADMMMatcher.run, MatchingObjective.losses

    def run(self, *a, **k):
        state["call"] += 1
        return real_run(self, *a, **k)

    def losses(self, x, *a, **k):
        out = real_losses(self, x, *a, **k)
        if not (x.is_leaf and x.requires_grad):  # a discrete evaluation, not the x-step
            return out
        state["x_steps"] += 1
        if record:
            record(state, x.detach().clone())
        return (out[0] * float("nan"), *out[1:]) if when(state) else out

    monkeypatch.setattr(admm.ADMMMatcher, "run", run)
    monkeypatch.setattr(MatchingObjective, "losses", losses)
    return state


def test_nan_step_is_retried_with_a_smaller_lr(compose, tmp_path, monkeypatch):
    from gmtext.stages.generate import run_generate

    _poison(monkeypatch, lambda s: s["x_steps"] == 1)  # the very first x-step goes NaN once
    s = run_generate(compose(GEN), tmp_path)
    assert s["x_step_retries"] == 1 and s["failed_batches"] == [] and s["examples"] == 8
    rec = [x for x in read_jsonl(tmp_path / "metrics.jsonl") if x["kind"] == "step" and x.get("x_step_retries")]
    assert len(rec) == 1 and rec[0]["batch"] == 0 and rec[0]["outer_step"] == 0
    assert rec[0]["lr"] == pytest.approx(compose(GEN).matcher.lr / 2)
    import math

    assert all(math.isfinite(r["match_loss"]) and r["text"] for r in read_jsonl(tmp_path / "synthetic.jsonl"))


def test_retry_restarts_the_x_step_from_its_saved_state(compose, tmp_path, monkeypatch):
    """Outer step 1 of the first batch goes NaN at its second inner step twice: the third
    attempt must start from the saved x and Adam state, so its first step is exactly the
    first attempt's first step at a quarter of the lr (Adam's update is linear in lr)."""
    from gmtext.stages.generate import run_generate

    xs = {}
    _poison(
        monkeypatch, lambda s: s["call"] == 1 and s["x_steps"] in (4, 6), lambda s, x: xs.setdefault(s["x_steps"], x)
    )
    s = run_generate(compose(GEN), tmp_path)
    assert s["x_step_retries"] == 2 and s["failed_batches"] == []
    assert torch.equal(xs[3], xs[7]) and torch.equal(xs[3], xs[5])  # each attempt starts from the saved x
    assert torch.allclose((xs[3] - xs[8]) * 4, xs[3] - xs[4], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(xs[3], xs[4])


def test_batch_that_stays_nan_is_recorded_failed_never_written_as_text(compose, tmp_path, monkeypatch):
    from gmtext.stages.generate import run_generate

    state = _poison(monkeypatch, lambda s: s["call"] == 2)  # every step of the second batch
    s = run_generate(compose(GEN), tmp_path)
    assert s["failed_batches"] == [1] and s["examples"] == 4
    rows = read_jsonl(tmp_path / "synthetic.jsonl")
    assert {r["batch"] for r in rows} == {0}
    assert not (tmp_path / "batches" / "batch_00001.jsonl").exists()
    failed = json.loads((tmp_path / "batches" / "batch_00001.failed.json").read_text())
    assert "non-finite loss or gradient" in failed["reason"] and "after 3 halvings" in failed["reason"]
    assert json.loads((tmp_path / "generate.json").read_text())["summary"]["failed_batches"] == [1]
    assert [x["batch"] for x in read_jsonl(tmp_path / "metrics.jsonl") if x["kind"] == "failed"] == [1]
    calls = state["call"]
    again = run_generate(compose(GEN), tmp_path)  # resuming keeps the record, does not redo it
    assert state["call"] == calls and again["failed_batches"] == [1] and again["batches_generated_now"] == 0


def test_a_poisoned_release_fails_every_batch_with_one_message(compose, tmp_path):
    from gmtext.stages.generate import run_generate

    run_release_with(compose, tmp_path)
    rel = tmp_path / "run" / "release"
    t = torch.load(rel / "targets.pt", weights_only=True)
    t["targets"][0][0][0] = float("nan")
    torch.save(t, rel / "targets.pt")
    with pytest.raises(
        ValueError, match=r"every batch failed \(2, see .*failed.json\): non-finite matching loss or gradient"
    ):
        run_generate(compose(GEN + [f"release={rel}"]), tmp_path / "g")
    assert not (tmp_path / "g" / "synthetic.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "g" / "batches").iterdir()) == [
        "batch_00000.failed.json",
        "batch_00001.failed.json",
    ]


def test_same_seed_same_text_other_seed_other_text(compose, tmp_path):
    from gmtext.stages.generate import run_generate

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_generate(compose(GEN + [f"seed={seed}"]), tmp_path / name)
    text = {n: (tmp_path / n / "synthetic.jsonl").read_text() for n in "abc"}
    assert text["a"] == text["b"]
    assert [r["text"] for r in read_jsonl(tmp_path / "a" / "synthetic.jsonl")] != [
        r["text"] for r in read_jsonl(tmp_path / "c" / "synthetic.jsonl")
    ]


def test_tracker_drops_what_a_killed_attempt_logged_for_unfinished_work(tmp_path):
    from gmtext.tracking import Tracker

    t = Tracker(tmp_path)
    t.commit(tmp_path / "batch_0")
    t.log({"a": 0}, step=0)
    (tmp_path / "batch_0").write_text("done")  # batch 0 finished (its file exists) ...
    t.commit(tmp_path / "batch_1")
    t.log({"a": 1}, step=1)  # ... batch 1 logged, then the process died before its file was written
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "a"')  # in the middle of a write
    t = Tracker(tmp_path)  # the resumed run redoes batch 1
    t.commit(tmp_path / "batch_1")
    t.log({"a": 2}, step=1)
    (tmp_path / "batch_1").write_text("done")
    assert [(r["step"], r["a"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(0, 0), (1, 2)]
    # killed right after batch 1's file appeared: its records are kept, not logged twice
    t = Tracker(tmp_path)
    t.commit(tmp_path / "batch_2")
    t.log({"a": 3}, step=2)
    (tmp_path / "batch_2").write_text("done")
    Tracker(tmp_path)
    assert [(r["step"], r["a"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(0, 0), (1, 2), (2, 3)]


def test_stale_lock_file_does_not_block_but_a_held_lock_does(tmp_path):
    from gmtext.artifacts import RunDirLocked

    (tmp_path / ".generate.lock").write_text(
        str(os.getppid())
    )  # left by a killed run; its pid now names a live process
    with run_lock(tmp_path, "generate"):
        assert (tmp_path / ".generate.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".generate.lock").exists()
    with run_lock(tmp_path, "generate"):
        with pytest.raises(RunDirLocked, match=rf"{tmp_path} is in use by process {os.getpid()} \(generate\)"):
            with run_lock(tmp_path, "generate"):
                pass
