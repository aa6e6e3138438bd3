"""Merge: join the synthetic.jsonl of generate shards into one set.

    gmtext-merge OUT_DIR SHARD_DIR...

Shards are generate runs with shard.count=N and shard.index=0..N-1 (batch b belongs to
shard b % N) that all read one release (`release=<dir>`), so scaling out spends the
privacy budget once. The merge refuses, with one line on stderr and exit code 2:
- shards made from different releases (release fingerprint, privacy.json or targets
  differ) — a second release of the same data would spend the budget again;
- shards whose generation config differs (other than shard.index and bookkeeping);
- a batch present in two shards, or a batch of the run missing from every shard (a batch
  a shard recorded as failed, non-finite, is listed in `failed_batches`, not missing).

It writes OUT_DIR/synthetic.jsonl (rows ordered by batch, exactly the file one
unsharded run with the same seed writes), OUT_DIR/merge.json (shards, release,
batches), and OUT_DIR/generate.json (config, summary with epsilon, privacy) so that
gmtext-finetune and gmtext-report read the merged set like any generate run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from ..artifacts import RESUME_FREE_KEYS, config_diff, read_json, read_jsonl, write_json, write_jsonl
from ..privacy.release import META_FILE, PRIVACY_FILE, RELEASE_FILE

SYNTHETIC_FILE = "synthetic.jsonl"
# Config keys allowed to differ between shards: those a resume ignores, plus the shard's own
# index and how it named the (checked, identical) release.
FREE_KEYS = RESUME_FREE_KEYS | {"shard", "release"}


class MergeError(ValueError):
    pass


def _release_dir(shard: Path, cfg: dict) -> Path:
    cands = []
    if cfg.get("release"):
        p = Path(cfg["release"])
        cands += [p] if p.is_absolute() else [p, shard / p]
    cands.append(shard / "release")
    for c in cands:
        if (c / "release.json").exists():
            return c.resolve()
    raise MergeError(
        f"{shard}: its release ({cfg.get('release') or shard / 'release'}) is not there; "
        "cannot check that all shards used the same release"
    )


def release_identity(rdir: Path) -> dict:
    meta = read_json(rdir / META_FILE)
    privacy = read_json(rdir / PRIVACY_FILE)
    targets = hashlib.sha256((rdir / RELEASE_FILE).read_bytes()).hexdigest()
    return {"path": str(rdir), "fingerprint": meta.get("fingerprint"), "privacy": privacy, "targets_sha256": targets}


def _load_shard(d: Path) -> dict:
    d = Path(d)
    gen = d / "generate.json"
    if not gen.exists() or not (d / SYNTHETIC_FILE).exists():
        raise MergeError(f"{d}: not a finished generate run (needs generate.json and {SYNTHETIC_FILE})")
    g = read_json(gen)
    cfg = g["config"]
    rel = release_identity(_release_dir(d, cfg))
    return {"dir": d, "config": cfg, "release": rel, "rows": read_jsonl(d / SYNTHETIC_FILE), "generate": g}


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def merge_shards(out_dir, shard_dirs) -> dict:
    if not shard_dirs:
        raise MergeError("no shard dirs given")
    shards = [_load_shard(Path(d)) for d in shard_dirs]
    first = shards[0]
    for s in shards[1:]:
        r0, r1 = first["release"], s["release"]
        for k, what in (
            ("fingerprint", "release fingerprint"),
            ("privacy", "privacy.json"),
            ("targets_sha256", "release targets"),
        ):
            if not _same(r0[k], r1[k]):
                raise MergeError(
                    f"{s['dir']} used another release than {first['dir']} ({what} differs: "
                    f"{r1['path']} vs {r0['path']}); shards must share one release=<dir>"
                )
        diff = config_diff(first["config"], s["config"], FREE_KEYS)
        if diff:
            keys = ", ".join(f"config key {k!r} ({json.dumps(a)} vs {json.dumps(b)})" for k, a, b in diff[:4])
            raise MergeError(
                f"{s['dir']} differs from {first['dir']} in {keys}; shards must share the generation config"
            )
    cfg = first["config"]
    count = int(cfg["shard"]["count"])
    counts = {int(s["config"]["shard"]["count"]) for s in shards}
    if counts != {count}:
        raise MergeError(f"shards disagree on shard.count ({sorted(counts)})")
    nb = math.ceil(int(cfg["num_per_class"]) / int(cfg["batch_size"]))
    owner: dict[int, Path] = {}
    rows_by_batch: dict[int, list] = {}
    for s in shards:
        mine: dict[int, list] = {}
        for r in s["rows"]:
            mine.setdefault(int(r["batch"]), []).append(r)
        for b, rows in mine.items():
            if b in owner:
                raise MergeError(f"batch {b} is in two shards ({owner[b]} and {s['dir']}): overlapping shards")
            owner[b] = s["dir"]
            rows_by_batch[b] = rows
    failed = sorted({int(b) for s in shards for b in s["generate"].get("summary", {}).get("failed_batches", [])})
    missing = [b for b in range(nb) if b not in rows_by_batch and b not in failed]
    if missing:
        raise MergeError(
            f"batches {missing} of {nb} are missing (shard.count={count}; shard indexes given: "
            f"{sorted({int(s['config']['shard']['index']) for s in shards})}); add the missing shards or finish them"
        )
    extra = sorted(b for b in rows_by_batch if b >= nb)
    if extra:
        raise MergeError(f"batches {extra} are beyond the run's {nb} batches (num_per_class/batch_size mismatch)")
    rows = [r for b in range(nb) for r in rows_by_batch.get(b, [])]
    out = Path(out_dir)
    write_jsonl(out / SYNTHETIC_FILE, rows)
    privacy = first["release"]["privacy"]
    summary = {
        "examples": len(rows),
        "batches": nb,
        "failed_batches": failed,
        "mean_match_loss": sum(r["match_loss"] for r in rows) / len(rows),
        "mean_class_batch_loss": sum(r["class_batch_loss"] for r in rows) / len(rows),
        "mean_perplexity": sum(r["perplexity"] for r in rows) / len(rows),
        "epsilon": float(privacy.get("epsilon", math.inf)),
        "delta": float(privacy.get("delta", 0.0)),
    }
    info = {
        "shards": [
            {
                "dir": str(s["dir"]),
                "index": s["config"]["shard"]["index"],
                "batches": sorted(b for b, o in owner.items() if o == s["dir"]),
            }
            for s in shards
        ],
        "shard_count": count,
        "release": first["release"],
        "summary": summary,
    }
    write_json(out / "merge.json", info)
    merged_cfg = {**cfg, "shard": {"index": 0, "count": 1}, "release": first["release"]["path"]}
    write_json(
        out / "generate.json",
        {"config": merged_cfg, "summary": summary, "privacy": privacy, "merged_from": [str(s["dir"]) for s in shards]},
    )
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="gmtext-merge",
        description="Merge generate shards (shard.index=0..N-1 of one release) into one synthetic.jsonl.",
    )
    ap.add_argument("out_dir", help="output folder for synthetic.jsonl, merge.json, generate.json")
    ap.add_argument("shard_dirs", nargs="+", help="generate run dirs of the shards")
    a = ap.parse_args(argv)
    try:
        info = merge_shards(a.out_dir, a.shard_dirs)
    except (MergeError, OSError, KeyError, ValueError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"gmtext-merge: error: {msg}", file=sys.stderr)
        return 2
    s = info["summary"]
    print(
        f"gmtext-merge: {len(info['shards'])} shards, {s['batches']} batches, {s['examples']} examples "
        f"(epsilon={s['epsilon']:.4g}) → {a.out_dir}/synthetic.jsonl"
    )
    return 0
