#!/usr/bin/env bash
# Canary audit at ε = ∞, 4, 1 on rotten tomatoes (issue 3): plant 4 canaries into the 50-per-class
# private set, run release + a small generation (4 per class) with the main-table generator
# settings, and report canary n-grams in the output and exposure (gmtext-audit, docs/privacy.md).
# Each run also audits the matching main-table pool (experiments/rt_main_cpu.sh) for overlap.
#   bash experiments/rt_canaries.sh          (~15 min on 2 cores; results: experiments/results/rt_canaries/)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/rotten_tomatoes
OUT=${OUT:-experiments/results/rt_canaries}
POOLS=${POOLS:-experiments/results/rt_main_cpu}
GEN=(dataset=rotten_tomatoes dataset.path=$DATA logger=none threads=${THREADS:-2} seed=0 num_per_class=4 batch_size=4
     match_loss=verbalizer "matched_params=[final_norm,last_blocks:1]" matcher.objective=sequence matcher.init_candidates=8
     projector.topk=200 projector.sim_weight=5 canaries.enabled=true canaries.k=4 canaries.references=200)
export WANDB_MODE=disabled
[ -d "$DATA" ] || { echo "rt_canaries.sh: $DATA not found (see ../shared/data/README)" >&2; exit 2; }
# ε = ∞ keeps the published 50-per-class sample; a DP release reads the whole train split
declare -A EPS=([inf]="privacy=none real_per_class=50" [4]="privacy=dp privacy.epsilon=4" [1]="privacy=dp privacy.epsilon=1")
for e in inf 4 1; do
  [ -f $OUT/eps$e/audit.json ] || gmtext-audit "${GEN[@]}" ${EPS[$e]} synthetic=$POOLS/gen_eps$e hydra.run.dir=$OUT/eps$e
done
# reference: 40 held-out real reviews (validation split, disjoint from train) audited the same way,
# i.e. what "no copying" looks like on this data
if [ ! -f $OUT/reference_heldout/audit.json ]; then
  python -c "import json, random, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; random.Random(0).shuffle(rows)
with open(sys.argv[2], 'w') as f: f.writelines(json.dumps({'text': r['text'], 'label': r['label']}) + '\n' for r in rows[:40])" \
    $DATA/validation.jsonl $OUT/heldout40.jsonl
  gmtext-audit dataset=rotten_tomatoes dataset.path=$DATA logger=none synthetic=$OUT/heldout40.jsonl hydra.run.dir=$OUT/reference_heldout
fi
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| ε | longest common n-gram (pool vs real) | pool texts with a real 8-gram | nearest-real cosine median / max | canary 8-gram in output | canary ranks (of 201) | max exposure (bits) |",
        "|---|---:|---:|---:|---|---|---:|"]
for e in ("inf", "4", "1"):
    a = json.loads((out / f"eps{e}" / "audit.json").read_text())
    o, c = a["overlap"], a["canaries"]
    ranks = ", ".join(str(p["rank"]) for p in c["canaries"])
    rows.append(f"| {'∞' if e == 'inf' else e} | {o['longest_common_ngram']} | {o['share_with_real_ngram']:.1%} | "
                f"{o['nearest_real_cosine']['median']:.3f} / {o['nearest_real_cosine']['max']:.3f} | "
                f"{c['any_canary_ngram_in_output']} | {ranks} | {c['max_exposure_bits']:.2f} |")
o = json.loads((out / "reference_heldout" / "audit.json").read_text())["overlap"]
rows.append(f"| held-out real (reference) | {o['longest_common_ngram']} | {o['share_with_real_ngram']:.1%} | "
            f"{o['nearest_real_cosine']['median']:.3f} / {o['nearest_real_cosine']['max']:.3f} | – | – | – |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
