#!/usr/bin/env bash
# DP-SGD on the whole rotten tomatoes train split (opacus; docs/privacy.md "The DP-SGD baseline"), the
# baseline rows next to the private GRADMM rows: one experiment config per (finetuner, budget)
# (conf/experiment/rt_dpsgd_*.yaml). This script only loops, skips finished runs and reports.
#   bash experiments/rt_dpsgd.sh [SEEDS...]   (default seeds 0 1 2; ROWS="lora lora_eps4 last_layers last_layers_eps4")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/rt_dpsgd}
RUN=(logger=none threads=${THREADS:-2})
export WANDB_MODE=disabled
[ -d ../shared/data/rotten_tomatoes ] || { echo "rt_dpsgd.sh: ../shared/data/rotten_tomatoes not found (see ../shared/data/README)" >&2; exit 2; }
SEEDS=("$@"); [ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0 1 2)
for s in "${SEEDS[@]}"; do
  for r in ${ROWS:-lora lora_eps4 last_layers last_layers_eps4}; do
    e=rt_dpsgd_$r
    [ -f $OUT/${r}_s$s/metrics.json ] || gmtext-finetune experiment=$e seed=$s "${RUN[@]}" hydra.run.dir=$OUT/${r}_s$s
  done
done
gmtext-report $OUT -o $OUT/report
