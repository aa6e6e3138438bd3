"""Where a benchmark's JSON goes, and the machine facts every result carries."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "machine_name": socket.gethostname(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_end": os.getloadavg(),  # a loaded machine explains slow rows
    }


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
