"""What the benchmarks share: the texts they time, where their JSON goes, the machine facts every result carries."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
RT = Path(__file__).resolve().parents[2] / "shared" / "data" / "rotten_tomatoes"  # ../shared/data beside the repo
# the texts timed where ../shared/data is missing
FALLBACK = [
    "A dull film.",
    "so so so so so so",
    "The acting is wooden, the plot is worse and it is long.",
    "a great film!",
    "I loved every minute of it",
    "wonderful cast, smart and funny",
] * 20


def machine() -> dict:
    return {
        "machine_name": socket.gethostname(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_end": os.getloadavg(),  # a loaded machine explains slow rows
    }


def save(benchmark: str, name: str, args, texts: str, rows: list, **fields) -> dict:
    """The result every benchmark writes: what ran (its args' model and threads, the texts),
    the machine, the rows and its own `fields`; written by write_result."""
    result = {"benchmark": benchmark, "model": args.model, "threads": args.threads, "texts": texts}
    result.update(**fields, **machine(), rows=rows)
    write_result(result, name, args.out, args.quick or args.model == "tiny-llama")
    return result


def write_result(result: dict, name: str, out: str | None, smoke: bool) -> Path:
    """--out, else results/<name>-smoke.json for smoke runs (so they never pass for
    measurements), else results/<name>-<machine>-<timestamp>.json."""
    if out:
        path = Path(out)
    elif smoke:
        path = RESULTS / f"{name}-smoke.json"
    else:
        path = RESULTS / f"{name}-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"→ {path}")
    return path
