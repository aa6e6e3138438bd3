#!/usr/bin/env bash
# Rotten tomatoes, N = 100, private rows (docs/results.md "Private rows"): one experiment config per
# budget (conf/experiment/rt_private_n100*.yaml). This script only loops, skips finished runs and reports.
#   bash experiments/rt_private.sh [SEEDS...]        (default seeds 0 1 2; BUDGETS="eps1 eps4 epsinf twin", twin: the ε = 1 no-matching twin;
#   readable: ε = 1 with the readability guard)
# The report covers this loop's runs only (the folder also holds sweeps and one-off runs), in
# $REPORT (default $OUT/report): BUDGETS="eps1 twin readable" REPORT=$OUT/report_readable compares the guard.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/rt_private_n100}
RUN=(logger=none threads=${THREADS:-2})
export WANDB_MODE=disabled
[ -d ../shared/data/rotten_tomatoes ] || { echo "rt_private.sh: ../shared/data/rotten_tomatoes not found (see ../shared/data/README)" >&2; exit 2; }
SEEDS=("$@"); [ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0 1 2)
DIRS=()
for s in "${SEEDS[@]}"; do
  for b in ${BUDGETS:-eps1 eps4 epsinf twin}; do
    e=rt_private_n100_$b; [ $b = eps1 ] && e=rt_private_n100
    [ -f $OUT/${b}_s$s/metrics.json ] || gmtext-pipeline experiment=$e seed=$s "${RUN[@]}" hydra.run.dir=$OUT/${b}_s$s
    DIRS+=("$OUT/${b}_s$s")
  done
done
# one accuracy-vs-ε curve: ε = ∞ differs from the DP runs in privacy._target_ and privacy.name too
gmtext-report "${DIRS[@]}" -o ${REPORT:-$OUT/report} --plot-ignore privacy._target_ --plot-ignore privacy.name
