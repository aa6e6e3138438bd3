"""Data-parallel fine-tuning on 2 CPU processes (gloo): the trainer and the sharded
evaluation against one process, and `gmtext-finetune` under `accelerate launch`.

Two processes on CPU: `accelerate launch --multi_gpu --num_processes 2` with no visible
GPU (accelerate's `--cpu --num_processes 2` starts one process unless MPI is set up).
"""

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmtext.artifacts import run_lock
from gmtext.data import load_split
from gmtext.finetune.evaluate import evaluate, gather_predictions
from gmtext.finetune.trainer import FullFineTuner

NAMES = ["negative", "positive"]
EVAL_BATCHES = (3, 7, 32)  # 20 eval examples: 7, 3 and 1 batches, every one padded by the sampler on 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe():
    # 36 examples in global batches of 7: 5 full batches and one of 1 per epoch, so rank 1
    # has an empty share in the last step of each epoch (it joins the all-reduce with weight 0)
    return FullFineTuner(lr=1e-3, epochs=3, batch_size=7, seed=3)


def _ddp_worker(rank: int, world: int, port: int, work: str, task, base) -> None:
    """One rank: the run lock on a dir the parent holds and on a free one, train `base`
    with the recipe, then predict with the weights the parent trained on one process.
    (The parent passes the task and model: loading the tokenizer again costs seconds per
    process.)"""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from gmtext.artifacts import RunDirLocked
    from gmtext.finetune.distributed import get_accelerator, main_process_lock

    acc = get_accelerator()
    out = {"num_processes": acc.num_processes, "pid": os.getpid(), "eval": {}}
    try:
        with main_process_lock(acc, Path(work) / "held", "finetune"):
            out["held"] = "entered"
    except RunDirLocked as e:
        out["held"] = str(e)
    with main_process_lock(acc, Path(work) / "free", "finetune"):
        out["free"] = (Path(work) / "free" / ".finetune.lock").read_text()  # rank 0 holds it while rank 1 runs on
        acc.wait_for_everyone()
    train = load_split("train", NAMES, builtin="demo").examples[:36]
    val = load_split("validation", NAMES, builtin="demo").examples
    ft = _recipe()
    model = ft.prepare(copy.deepcopy(base))
    fit = ft.fit(model, task, train, accelerator=acc)
    out.update(losses=fit.losses, steps=fit.steps)
    if rank == 0:
        torch.save(model.state_dict(), Path(work) / "ddp_trained.pt")
    same = copy.deepcopy(base)
    same.load_state_dict(torch.load(Path(work) / "single_trained.pt"))
    seqs = [task.encode(e.text) for e in val]
    for bs in EVAL_BATCHES:
        rows, seen = gather_predictions(same, task, seqs, bs, acc)
        res = evaluate(same, task, val, bs, accelerator=acc)
        out["eval"][bs] = {
            "rows": rows,
            "seen": seen,
            "predictions": res.predictions,
            "accuracy": res.accuracy,
            "n": res.n,
        }
    (Path(work) / f"rank{rank}.json").write_text(json.dumps(out))
    acc.wait_for_everyone()


def test_two_processes_match_one_process_training_and_evaluation(tiny, tmp_path, monkeypatch):
    """2 gloo processes (torch.multiprocessing): the run lock is rank 0's; the same per-step
    losses and weights as one process with the same global batch size; and on identical
    weights the same predictions, each eval example counted once although the distributed
    sampler repeats samples."""
    lm, task = tiny
    train = load_split("train", NAMES, builtin="demo").examples[:36]
    val = load_split("validation", NAMES, builtin="demo").examples
    ft = _recipe()
    single = ft.prepare(copy.deepcopy(lm.model))
    fit = ft.fit(single, task, train)
    torch.save(single.state_dict(), tmp_path / "single_trained.pt")
    want = evaluate(single, task, val, 32)
    assert 0 < sum(want.predictions) < len(val)  # both classes predicted: equal predictions mean something

    for k, v in {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    with run_lock(tmp_path / "held", "finetune"):  # another run owns this dir
        torch.multiprocessing.spawn(
            _ddp_worker, args=(2, _free_port(), str(tmp_path), task, lm.model), nprocs=2, join=True
        )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # refused on every rank (none waits for rank 0), with rank 0's message
        assert r["held"].startswith(f"{tmp_path / 'held'} is in use by process {os.getpid()} (finetune)"), r["held"]
        assert r["free"] == str(ranks[0]["pid"])  # rank 1 was not refused although rank 0 held the lock
    assert not (tmp_path / "free" / ".finetune.lock").exists()

    for r in ranks:
        assert r["num_processes"] == 2
        # training: global batch semantics, so the same steps and losses as one process
        assert r["steps"] == fit.steps == 18
        assert r["losses"] == pytest.approx(fit.losses, rel=1e-5, abs=1e-6)
        assert sum(r["losses"][-6:]) < 0.8 * sum(r["losses"][:6])  # it learned (last epoch vs first)
        for bs in EVAL_BATCHES:
            e = r["eval"][str(bs)]
            assert sorted(i for i, _ in e["rows"]) == list(range(len(val)))  # every example exactly once
            assert e["predictions"] == want.predictions
            assert e["accuracy"] == want.accuracy and e["n"] == len(val) == 20
    for bs in EVAL_BATCHES:
        # the sampler did repeat samples (so the exact count above is gather_for_metrics' doing)
        assert sum(r["eval"][str(bs)]["seen"] for r in ranks) > len(val)
        assert ranks[0]["eval"][str(bs)]["rows"] == ranks[1]["eval"][str(bs)]["rows"]
    ddp = torch.load(tmp_path / "ddp_trained.pt")
    one = single.state_dict()
    assert ddp.keys() == one.keys()
    w0 = lm.model.state_dict()
    diff = sum(float((ddp[k] - one[k]).double().pow(2).sum()) for k in one) ** 0.5
    moved = sum(float((one[k] - w0[k]).double().pow(2).sum()) for k in one) ** 0.5
    # the same training up to float summation order (which AdamW's normalisation passes on to tiny-gradient weights)
    assert moved > 0.1 and diff < 1e-3 * moved, (diff, moved)


# --------------------------------------------------------------------------- accelerate launch
AUDIT_SITE = '''
import os, sys
_root, _log = os.environ.get("GMTEXT_AUDIT_ROOT"), os.environ.get("GMTEXT_AUDIT_LOG")
if _root and _log:
    _rank = os.environ.get("RANK", "-")
    _fd = os.open(f"{_log}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((flags or 0) & _W or any(c in str(mode or "") for c in "wax+")):
                return
            paths = [path]
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.symlink", "os.link"):
            paths = list(args[:2]) if event in ("os.rename", "os.symlink", "os.link") else [args[0]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(p))
                if p == _root or p.startswith(_root + os.sep):
                    os.write(_fd, f"{_rank}\\t{event}\\t{p}\\n".encode())

    sys.addaudithook(_hook)
'''

TRAIN = [
    "debug=tiny",
    "logger=wandb",
    "train=real",
    "train.size=22",
    "finetuner.lr=1e-3",
    "finetuner.epochs=3",
    "finetuner.batch_size=7",
    "finetune.eval_batch_size=3",
    "finetune.lrs=[3e-4,1e-3]",
    "finetune.dev_size=20",
]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(compose, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` of the gmtext-finetune console script
    on CPU, default run dir: one run dir, rank 0 alone writes into it (file writes audited
    in every process), metrics over each eval example once, equal to one process's."""
    script = Path(sys.executable).with_name("gmtext-finetune")
    assert script.exists(), f"console script not installed: {script}"
    site = tmp_path / "audit_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_SITE)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "GMTEXT_RUN_STAMP")
    }
    env.update(
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        GMTEXT_AUDIT_ROOT=str(work / "outputs"),
        GMTEXT_AUDIT_LOG=str(tmp_path / "audit"),
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        *TRAIN,
        "logger=wandb",
        "logger.mode=offline",
    ]  # explicit: wins over WANDB_MODE=disabled; no network
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len([ln for ln in p.stdout.splitlines() if ln.startswith("gmtext-finetune: real")]) == 1  # rank 0 prints
    assert "terminate called" not in p.stderr  # each rank ended its group and left by os._exit (run_launched)

    runs = list((work / "outputs" / "finetune" / "demo").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", runs[0].name), runs  # one shared run dir
    run = runs[0]
    assert list(work.rglob("metrics.json")) == [run / "metrics.json"]
    assert sorted(x.name for x in run.iterdir()) == [
        ".hydra",
        ".metrics.jsonl.commit",
        ".wandb_id.finetune",
        "finetune.log",
        "metrics.json",
        "metrics.jsonl",
        "wandb",
    ]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one W&B run, rank 0's

    events = [ln.split("\t") for f in tmp_path.glob("audit.*") for ln in f.read_text().splitlines()]
    rank0 = [(e, Path(x)) for r, e, x in events if r == "0"]
    assert ("os.rename", run / "metrics.json") in rank0  # the audit sees rank 0 writing
    ancestors = {run, *run.parents}
    rank1 = [(e, x) for r, e, x in events if r == "1" and not (e == "os.mkdir" and Path(x) in ancestors)]
    assert rank1 == []  # rank 1 wrote nothing into the run dir (at most Hydra's mkdir of the shared dir itself)

    m = json.loads((run / "metrics.json").read_text())
    for k in (
        "accuracy",
        "macro_f1",
        "per_class_accuracy",
        "dev_accuracy",
        "confusion",
        "lr",
        "lr_selection",
        "steps",
        "final_loss",
        "n_train",
        "n_eval",
        "n_dev",
        "train_seconds",
        "config",
        "wall_seconds",
    ):
        assert m.get(k) is not None, k
    n_val = len(load_split("validation", NAMES, builtin="demo").examples)
    assert m["num_processes"] == 2 and m["n_train"] == 22 and m["n_eval"] == n_val == 20
    assert sum(map(sum, m["confusion"])) == n_val  # each eval example once
    assert m["accuracy"] == pytest.approx(sum(m["confusion"][i][i] for i in range(2)) / n_val)
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if "train/loss" in r]
    assert (
        len(train_steps) == 2 * m["steps"] == 2 * 3 * 4
    )  # two lrs × 3 epochs × ceil(22/7) steps: logged once, by rank 0

    from gmtext.stages.finetune import run_finetune

    one = run_finetune(compose([*TRAIN, "logger=none"], config_name="finetune"), tmp_path / "single")
    assert one["num_processes"] == 1
    for k in (
        "accuracy",
        "macro_f1",
        "confusion",
        "dev_accuracy",
        "lr",
        "lr_selection",
        "steps",
        "n_train",
        "n_eval",
        "n_dev",
    ):
        assert m[k] == one[k], k
    assert m["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    ref = [
        json.loads(ln)["train/loss"]
        for ln in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in ln
    ]
    assert [r["train/loss"] for r in train_steps] == pytest.approx(ref, rel=1e-4)


def test_end_process_group_tears_down(tmp_path):
    """end_process_group destroys an initialised group (after a barrier when clean) and is a
    no-op without one: what gmtext-finetune runs before exit under accelerate launch."""
    import torch.distributed as dist

    from gmtext.finetune.distributed import end_process_group

    end_process_group(clean=True)  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group(clean=True)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    end_process_group(clean=False)
    assert not dist.is_initialized()


RUN_LAUNCHED = """
import atexit, sys
from gmtext.finetune.distributed import run_launched
atexit.register(lambda: print("atexit ran", flush=True))
def ok():
    print("work done")
def usage():
    sys.exit(2)
def boom():
    raise RuntimeError("boom")
run_launched({"ok": ok, "usage": usage, "boom": boom}[sys.argv[1]])
print("not reached")
"""


@pytest.mark.parametrize("case,rc", [("ok", 0), ("usage", 2), ("boom", 1)])
def test_run_launched_exits_with_python_status_after_atexit(case, rc):
    """A rank under accelerate launch leaves by os._exit (gloo threads kept alive by DDP must
    not meet interpreter teardown) yet exits as Python would: the same status, the
    traceback on stderr, atexit handlers run and output flushed."""
    p = subprocess.run([sys.executable, "-c", RUN_LAUNCHED, case], capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, p.stderr
    assert "atexit ran" in p.stdout and "not reached" not in p.stdout
    assert ("work done" in p.stdout) == (case == "ok")
    assert ("RuntimeError: boom" in p.stderr) == (case == "boom")
