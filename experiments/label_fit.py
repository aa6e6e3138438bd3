"""Diagnostic: does a kept synthetic set say what its labels say?

    python experiments/label_fit.py RUN_DIR [RUN_DIR ...] [--judge-data FILE] [--file NAME] [--out JSON]

A judge (logistic regression on all-MiniLM-L6-v2 sentence embeddings) is trained on a labelled
file that is neither private nor the evaluation subset (default: rotten tomatoes' test split;
its 5-fold accuracy is printed, so the judge's own error is known). Each run dir's selected.jsonl
is then judged: the share of kept texts the judge puts in their own label, per class. A set that
teaches "negative" must contain texts that read negative; a low share for one class predicts a
fine-tuned classifier that leans to the other. Reads no private record.

`--file synthetic.jsonl` judges the whole pool instead of the kept set: next to a no-matching
twin of the same seed (same LM starts), it shows whether the matching moved the text toward its
label as a reader sees it. `own_prob` is the judge's mean probability of each text's own label,
a finer reading than the hard label fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gmtext.artifacts import read_jsonl as read_rows  # noqa: E402
from gmtext.evolution.embedders import MiniLMEmbedder  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--judge-data", type=Path, default=Path("../shared/data/rotten_tomatoes/test.jsonl"))
    ap.add_argument("--file", default="selected.jsonl", help="which jsonl of each run dir to judge")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if not a.judge_data.exists():
        print(f"label_fit: --judge-data {a.judge_data}: no such file (see ../shared/data/README)", file=sys.stderr)
        return 2
    for r in a.runs:
        if not (r / a.file).exists():
            print(f"label_fit: {r}: no {a.file} (accepted: a run dir that holds it)", file=sys.stderr)
            return 2
    emb = MiniLMEmbedder().bind()
    judge_rows = read_rows(a.judge_data)
    x = emb.embed([r["text"] for r in judge_rows]).numpy()
    y = np.array([r["label"] for r in judge_rows])
    clf = LogisticRegression(max_iter=2000, C=1.0)
    cv = float(cross_val_score(clf, x, y, cv=5).mean())
    clf.fit(x, y)
    print(f"judge: MiniLM + logistic regression on {a.judge_data} ({len(y)} texts), 5-fold accuracy {cv:.3f}")
    out = {"judge_data": str(a.judge_data), "judge_cv_accuracy": cv, "file": a.file, "runs": {}}
    for r in a.runs:
        rows = read_rows(r / a.file)
        lab = np.array([x["label"] for x in rows])
        prob = clf.predict_proba(emb.embed([x["text"] for x in rows]).numpy())
        pred = clf.classes_[prob.argmax(1)]
        own = float(prob[np.arange(len(rows)), np.searchsorted(clf.classes_, lab)].mean())
        per = {int(c): float((pred[lab == c] == c).mean()) for c in sorted(set(lab.tolist()))}
        fit = float((pred == lab).mean())
        out["runs"][str(r)] = {"label_fit": fit, "own_prob": own, "per_class": per, "n": len(rows)}
        classes = ", ".join(f"{c}: {v:.2f}" for c, v in per.items())
        print(f"{r}: label fit {fit:.2f}, own-label probability {own:.3f} (per class {classes}; n = {len(rows)})")
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
