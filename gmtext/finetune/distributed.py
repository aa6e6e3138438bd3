"""Data-parallel fine-tuning under `accelerate launch` (or torchrun): the process group,
which process writes, and the run-dir lock.

One process (plain `gmtext-finetune`) is the default and behaves as without accelerate:
the Accelerator is a no-op there (no device placement, no wrapping, no collectives).
With N processes every rank runs the same seeded schedule; the trainer gives each rank
its share of every global batch, and evaluation shards the examples and gathers the
predictions. Only the main process (rank 0) takes the run lock and writes into the run
dir; the other ranks write nothing. See README.md, "Multi-GPU fine-tuning".
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from datetime import datetime
from typing import NoReturn

RUN_STAMP_ENV = "GMTEXT_RUN_STAMP"  # the run dir's time stamp, shared by every rank (conf/finetune.yaml)


def _env_int(names, default: int) -> int:
    for n in names:
        try:
            return int(os.environ[n])
        except (KeyError, ValueError):
            continue
    return default


def launched_world_size() -> int:
    """Number of processes the launcher started (WORLD_SIZE from torchrun / accelerate
    launch, or the MPI equivalents); readable before any process group exists."""
    return max(1, _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1))


def launched_rank() -> int:
    return _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)


def get_accelerator():
    """This process's Accelerator. Never places anything on a device by itself (the stage
    moves the model to `accelerator.device` only when there are several processes, so one
    process keeps `model.device`). Without CUDA the launched processes form a CPU (gloo)
    group; otherwise accelerate gives each process its GPU (ACCELERATE_USE_CPU=1 or an
    empty CUDA_VISIBLE_DEVICES force CPU)."""
    import torch
    from accelerate import Accelerator

    acc = Accelerator(device_placement=False, cpu=not torch.cuda.is_available())
    if launched_world_size() > 1 and acc.num_processes != launched_world_size():
        from ..errors import UserError

        raise UserError(
            f"launched with WORLD_SIZE={launched_world_size()} but accelerate formed a group of {acc.num_processes}: "
            "every rank would write the same run dir; launch with accelerate launch --multi_gpu --num_processes N "
            "as in README.md"
        )
    return acc


def broadcast(acc, obj):
    """`obj` of the main process, on every process (a no-op on one process)."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if acc.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextmanager
def main_process_lock(acc, run_dir, stage: str):
    """The stage's run lock (artifacts.run_lock), held by the main process only: the other
    ranks write nothing into the run dir, so they take no lock, and they are not refused
    because rank 0 holds it. When rank 0 cannot take the lock (another run uses the dir),
    every rank raises the same error instead of waiting for rank 0 in a collective."""
    from ..artifacts import RunDirLocked, run_lock

    if acc.num_processes == 1:
        with run_lock(run_dir, stage):
            yield
        return
    with ExitStack() as stack:
        err = None
        if acc.is_main_process:
            try:
                stack.enter_context(run_lock(run_dir, stage))
            except Exception as e:  # noqa: BLE001 - every rank must learn of it
                err = e
        msg = broadcast(acc, None if err is None else (isinstance(err, RunDirLocked), str(err)))
        if err is not None:
            raise err
        if msg is not None:
            locked, text = msg
            from ..errors import UserError

            raise (RunDirLocked if locked else UserError)(text)
        yield


def end_process_group(clean: bool) -> None:
    """Tear down the process group before the interpreter exits. `clean` (the stage returned
    on every rank): first a barrier, so no rank drops its end of a pair while the other is
    still in the last collective; after an error only the local teardown (a barrier could
    wait for a rank that is gone). Not enough on its own once DDP has used the group: see
    run_launched."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def share_run_stamp() -> None:
    """Under a multi-process launch, make every rank resolve the same default Hydra run dir:
    rank 0's time stamp goes to every rank in GMTEXT_RUN_STAMP (conf/finetune.yaml uses it
    instead of ${now:...} when set). Initialises the process group (before Hydra runs)."""
    if launched_world_size() <= 1:
        return
    acc = get_accelerator()
    os.environ[RUN_STAMP_ENV] = broadcast(acc, datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def run_launched(fn) -> NoReturn:
    """Run `fn` as one rank of a multi-process launch, end the process group, and leave with
    os._exit after the atexit handlers (W&B, logging) and a flush of stdout/stderr.

    Why not a normal exit: once DDP has wrapped a model, destroy_process_group no longer
    stops gloo's threads (pt_gloo_runloop, gloo_tcp_loop): DDP's C++ side keeps the group
    alive, and neither deleting the model nor gc releases it. The threads then live into
    interpreter finalization and C++ static destruction, and a rank aborts now and then with
    "terminate called without an active exception" after its work is done. os._exit skips
    that phase; everything the stage wrote is already on disk (atomic renames).
    Exit status as Python's: 0, SystemExit's code, or 1 with the traceback on stderr."""
    import atexit
    import sys
    import traceback

    ok, code = False, 1
    try:
        fn()
        ok, code = True, 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported like the interpreter would, then the same teardown
        traceback.print_exc()
    try:
        end_process_group(clean=ok)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = code or 1
    try:
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
