#!/usr/bin/env bash
# Canary audit at ε = ∞, 4, 1 on rotten tomatoes: plant 4 canaries into the private set (50 per
# class at ε = ∞, the whole train split under DP), run release + a small generation (4 per class)
# with the default generator (conf/experiment/rt_canaries*.yaml), and report canary n-grams in the
# output and their exposure (gmtext-audit, docs/privacy.md).
# Each run also audits the matching main-table pool (experiments/rt_main_cpu.sh) for overlap.
#   bash experiments/rt_canaries.sh          (~15 min on 2 cores; results: experiments/results/rt_canaries/)
# The private pools of the N = 100 rows (docs/results.md "Private rows"), against the current release:
#   EPS_LIST="4 1" POOL_PATTERN=experiments/results/rt_private_n100/eps%s_s0 OUT=experiments/results/rt_canaries_private bash experiments/rt_canaries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/rotten_tomatoes
OUT=${OUT:-experiments/results/rt_canaries}
POOLS=${POOLS:-experiments/results/rt_main_cpu}
export WANDB_MODE=disabled
[ -d "$DATA" ] || { echo "rt_canaries.sh: $DATA not found (see ../shared/data/README)" >&2; exit 2; }
EPS=(${EPS_LIST:-inf 4 1})
declare -A EXP=([inf]=rt_canaries [4]=rt_canaries_eps4 [1]=rt_canaries_eps1)  # conf/experiment/: every setting
for e in "${EPS[@]}"; do
  pool=$(printf "${POOL_PATTERN:-$POOLS/gen_eps%s}" $e)
  [ -f $OUT/eps$e/audit.json ] || gmtext-audit experiment=${EXP[$e]} logger=none threads=${THREADS:-2} synthetic=$pool hydra.run.dir=$OUT/eps$e
done
# reference: 40 held-out real reviews (validation split, disjoint from train) audited the same way,
# i.e. what "no copying" looks like on this data
if [ ! -f $OUT/reference_heldout/audit.json ]; then
  python -c "import json, random, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; random.Random(0).shuffle(rows)
with open(sys.argv[2], 'w') as f: f.writelines(json.dumps({'text': r['text'], 'label': r['label']}) + '\n' for r in rows[:40])" \
    $DATA/validation.jsonl $OUT/heldout40.jsonl
  gmtext-audit experiment=rt_main_cpu logger=none synthetic=$OUT/heldout40.jsonl hydra.run.dir=$OUT/reference_heldout
fi
python - "$OUT" "${EPS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["| ε | longest common n-gram (pool vs real) | pool texts with a real 8-gram | nearest-real cosine median / max | canary 8-gram in output | canary ranks (of 201) | max exposure (bits) |",
        "|---|---:|---:|---:|---|---|---:|"]
for e in sys.argv[2:]:
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
