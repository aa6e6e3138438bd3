#!/usr/bin/env bash
# Rotten tomatoes, CPU scale: the rows of the main tables, one experiment config per row
# (conf/experiment/rt_*.yaml; docs/results.md "Recipes"). This script only loops, skips finished
# runs and reports; every setting lives in the configs.
#   bash experiments/rt_main_cpu.sh [SEEDS...]       N = 20 rows (default seeds 0 1 2; ~1 h per seed on 2 cores)
#   N=100 bash experiments/rt_main_cpu.sh 0 1 2      N = 100 rows (GRADMM-100: ~50 min per seed)
# A pipeline seed varies the real sample, the generation and the fine-tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
OUT=${OUT:-experiments/results/rt_main_cpu_recipes_n$N}
RUN=(logger=none threads=${THREADS:-2})
export WANDB_MODE=disabled
[ -d ../shared/data/rotten_tomatoes ] || { echo "rt_main_cpu.sh: ../shared/data/rotten_tomatoes not found (see ../shared/data/README)" >&2; exit 2; }
if [ "$N" = 20 ]; then GRADMM="rt_main_cpu rt_main_cpu_best"; BASELINES="rt_real20 rt_prompted20 rt_fewshot"; else GRADMM=rt_main_cpu_n100; BASELINES="rt_real100 rt_prompted100"; fi
[ -f $OUT/rt_zero_shot/metrics.json ] || gmtext-finetune experiment=rt_zero_shot "${RUN[@]}" hydra.run.dir=$OUT/rt_zero_shot
SEEDS=("$@"); [ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0 1 2)
for s in "${SEEDS[@]}"; do
  for e in $BASELINES; do
    [ -f $OUT/${e}_s$s/metrics.json ] || gmtext-finetune experiment=$e seed=$s "${RUN[@]}" hydra.run.dir=$OUT/${e}_s$s
  done
  for e in $GRADMM; do
    [ -f $OUT/${e}_s$s/metrics.json ] || gmtext-pipeline experiment=$e seed=$s "${RUN[@]}" hydra.run.dir=$OUT/${e}_s$s
  done
done
gmtext-report $OUT -o $OUT/report
