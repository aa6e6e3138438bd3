"""Atomic, resumable file output and the run-dir lock.

Every artifact is written to a temporary file in the same directory and renamed into
place, so a kill or a full disk leaves the previous complete file (or none), never a
half-written one.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
from filelock import FileLock, Timeout


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno and not e.filename:
            e.filename = str(path)  # name the file a full disk or an I/O error stopped
        raise


def write_text(path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def save_torch(path, obj) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path) -> list[dict]:
    # newlines only: str.splitlines also cuts at U+2028 / U+0085, which a JSON string may hold raw
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDirLocked(RuntimeError):
    pass


@contextmanager
def run_lock(run_dir, stage: str):
    """Refuse a second process writing the same stage into the same run dir.

    filelock's flock on `run_dir/.{stage}.lock`: the kernel drops it when its owner ends in
    any way (kill -9 included), so resuming after a crash needs no clean-up, and a stale file
    whose pid was reused by another program blocks nothing. Two things filelock leaves to us:
    the file names the owner's pid (written once the lock is ours; filelock does not truncate
    a held file when it loses the race, since 3.30), so the refusal can name the holder; and
    the file is removed on release, so a finished run dir holds no lock file (filelock keeps
    it for waiters; nobody waits here: a second writer is refused at once).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f".{stage}.lock"
    # fallback_to_soft=False: a marker file (filelock's fallback without flock) would outlive
    # a killed owner and block the resume
    lock = FileLock(path, timeout=0, mode=0o644, fallback_to_soft=False)
    while True:
        try:
            lock.acquire()
            break
        except Timeout:
            if path.exists():
                raise RunDirLocked(
                    f"{run_dir} is in use by process {_owner(path) or '?'} ({stage}); "
                    "wait for it or use another hydra.run.dir"
                ) from None
            # else its owner finished and removed it between our open and flock: lock a new file
    try:
        path.write_text(str(os.getpid()))  # the inode we hold: only its holder removes it
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still held: nobody can have locked the path meanwhile
        finally:
            lock.release()


def other_writers(run_dir) -> list[int]:
    """Pids of other processes holding a stage lock in run_dir right now."""
    out = []
    for lock in Path(run_dir).glob(".*.lock"):
        pid = _owner(lock)
        if pid == os.getpid():
            continue
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if not _try_lock(fd, fcntl.LOCK_SH):
                out.append(pid)
        finally:
            os.close(fd)  # closing drops a lock taken just to test
    return out


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _owner(lock: Path) -> int:
    try:
        return int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------ resume: same config only
# Config keys (dotted) that do not shape any stage's output: how progress is shown, where
# metrics go, how many CPU threads run, Hydra's own settings, which entry point ran the stage
# (gmtext-pipeline runs generate with stage=pipeline; gmtext-generate may resume it), and how
# many sequences share a per-sequence gradient pass (matcher.seq_chunk: the same math; like the
# thread count, it changes only float rounding).
RESUME_FREE_KEYS = frozenset({"progress", "logger", "threads", "hydra", "stage", "matcher.seq_chunk"})


# Keys (dotted paths) added after run dirs already existed, with the value that reproduces what
# those runs did: a stored config without the key reads as having it, so an old GRADMM run dir
# (no generator choice, fixed ADMM ρ) resumes.
LEGACY_DEFAULTS = {
    "generator": {"_target_": "gmtext.matching.generator.GRADMMGenerator", "name": "gradmm"},
    "embedder": None,
    "matcher.rho_balance": 0.0,
    "matcher.rho_factor": 2.0,
    "matcher.max_perplexity_ratio": 0.0,
    "matcher.contrastive": 0.0,
    "projector.beam": 1,  # one token at a time
    "train.adjacency": "add_remove",  # DP-SGD before the key: calibrated by opacus, add/remove
}


class ConfigChanged(ValueError):
    """A run dir holds a stage's output made with another config: resuming would mix or
    silently reuse it, so the stage stops before writing anything."""


def config_record(run_dir, stage: str) -> Path:
    """Where a stage records the config its output in run_dir was made with."""
    return Path(run_dir) / f"{stage}.config.json"


def _plain(config) -> dict:
    """The config as it reads back from JSON (tuples → lists, Paths → str), so a stored
    config and a live one compare equal when they would write the same file."""
    return json.loads(json.dumps(config, default=_json_default))


def config_diff(stored: dict, config: dict, free=RESUME_FREE_KEYS) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, new value) for every leaf that differs, `free` (dotted) keys
    ignored; a key present on one side only counts as a difference."""
    out: list[tuple[str, object, object]] = []
    missing = object()

    def walk(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if f"{prefix}{k}" in free:
                    continue
                walk(a.get(k, LEGACY_DEFAULTS.get(f"{prefix}{k}", missing)), b.get(k, missing), f"{prefix}{k}.")
            return
        if a != b:
            out.append((prefix[:-1], None if a is missing else a, None if b is missing else b))

    walk(_plain(stored), _plain(config), "")
    return out


def _short(v) -> str:
    s = json.dumps(v, default=_json_default)
    return s if len(s) <= 40 else s[:37] + "..."


def check_resume(run_dir, stage: str, config: dict, stored: dict | None = None, free=RESUME_FREE_KEYS) -> bool:
    """Refuse to resume (or reuse) `stage`'s output in run_dir when it was made with a config
    that differs from `config` in a key that shapes the output.

    `stored` is the config the stage kept with its finished output (finetune's metrics.json,
    generate's generate.json); without one, the record written by `record_config` is read.
    Returns True when a stored config exists and matches (there is something to resume),
    False when the run dir holds no record of this stage. Raises ConfigChanged, one line
    naming the differing keys with both values, otherwise: the caller must not have written
    anything yet."""
    if stored is None:
        rec = config_record(run_dir, stage)
        if not rec.exists():
            return False
        stored = read_json(rec)
    diff = config_diff(stored, config, free)
    if diff:
        keys = ", ".join(f"{k} {_short(a)} → {_short(b)}" for k, a, b in diff[:8]) + (
            f" (+{len(diff) - 8} more)" if len(diff) > 8 else ""
        )
        raise ConfigChanged(
            f"{run_dir} holds {stage} output made with another config ({keys}); rerun with the same "
            f"settings to resume (only {', '.join(sorted(free))} may differ) or choose another hydra.run.dir"
        )
    return True


def record_config(run_dir, stage: str, config: dict) -> bool:
    """Record the config of `stage`'s output in run_dir, before its first output file.

    An existing record stays: check_resume already found it equal (up to the free keys),
    and a resumed run writes only what it must. Returns whether this call wrote it."""
    rec = config_record(run_dir, stage)
    if rec.exists():
        return False
    write_json(rec, config)
    return True
