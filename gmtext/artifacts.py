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
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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

    An advisory lock (flock) on `run_dir/.{stage}.lock`, a file that also names the owner's
    pid for the message. The kernel drops the lock when its owner ends in any way (kill -9
    included), so resuming after a crash needs no clean-up, and a stale file whose pid was
    reused by another program blocks nothing.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / f".{stage}.lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        if not _try_lock(fd, fcntl.LOCK_EX):
            os.close(fd)
            raise RunDirLocked(f"{run_dir} is in use by process {_owner(lock) or '?'} ({stage}); wait for it or use another hydra.run.dir")
        if _is_path_of(fd, lock):  # else a finishing owner unlinked it meanwhile: lock the new file
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


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


def _is_path_of(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return os.path.samestat(os.fstat(fd), st)


def _owner(lock: Path) -> int:
    try:
        return int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
