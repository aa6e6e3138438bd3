"""Reading synthetic sets (synthetic.jsonl / selected.jsonl) with schema checks.

Shared by selection (needs the scores) and fine-tuning (needs text and label), so both
accept the same paths and refuse bad files with the same one-line messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from . import read_utf8


def resolve_synthetic_path(path: str | Path) -> Path:
    """A file, or a run dir holding selected.jsonl (preferred) or synthetic.jsonl."""
    p = Path(path)
    if p.is_dir():
        for name in ("selected.jsonl", "synthetic.jsonl"):
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"{str(path)!r}: directory has no selected.jsonl or synthetic.jsonl")
    if not p.exists():
        raise FileNotFoundError(f"synthetic set {str(path)!r}: no such file")
    return p


def synthetic_privacy(path: str | Path) -> dict | None:
    """{"epsilon", "delta", "ledger"} of everything behind a synthetic set, from the record of
    the stage that wrote that file: select.json for selected.jsonl, generate.json (also a
    merged one) for synthetic.jsonl. None when the set has no such record (a hand-made file).
    `ledger` is None for records written before ledgers existed (ε, δ only)."""
    from ..privacy.ledger import ledger_of

    try:
        file = resolve_synthetic_path(path)
        d = file.parent
        record = {"selected.jsonl": "select.json", "synthetic.jsonl": "generate.json"}.get(file.name)
        if record is None or not (d / record).exists():
            return None
        rec = json.loads(read_utf8(d / record))
        priv = rec.get("privacy") if isinstance(rec.get("privacy"), dict) else {}
        summary = rec.get("summary", rec)
        if summary.get("epsilon") is None:
            return None
        return {
            "epsilon": float(summary["epsilon"]),
            "delta": float(summary.get("delta") or 0.0),
            "ledger": ledger_of(priv),
        }
    except (OSError, ValueError, TypeError):
        return None


def read_synthetic_rows(
    path: str | Path, label_names: Sequence[str], required: Sequence[str] = ("text", "label")
) -> list[dict]:
    """Rows with `label` normalised to a class index; empty texts dropped.

    Any bad row raises a one-line ValueError naming the file, the line and the field."""
    file = resolve_synthetic_path(path)
    names = list(label_names)
    out = []
    for i, line in enumerate(read_utf8(file).split("\n"), 1):  # only \n ends a JSONL record
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{file}:{i}: expected a JSON object with fields {list(required)}")
        missing = [f for f in required if f not in row]
        if missing:
            raise ValueError(
                f"{file}:{i}: missing field(s) {missing} "
                f"(a synthetic set needs {list(required)}; row has: {sorted(row)})"
            )
        text, lab = row["text"], row["label"]
        if not isinstance(text, str):
            raise ValueError(f"{file}:{i}: field 'text' must be a string, got {type(text).__name__}")
        if isinstance(lab, str) and lab in names:
            lab = names.index(lab)
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(names):
            raise ValueError(
                f"{file}:{i}: field 'label'={row['label']!r} is not a class index 0..{len(names) - 1} or one of {names}"
            )
        if text.strip():
            out.append({**row, "label": lab})
    if not out:
        raise ValueError(f"{file}: no non-empty synthetic examples")
    return out
