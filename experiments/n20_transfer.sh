#!/usr/bin/env bash
# The default recipe on datasets it was never tuned on (imdb, tweet_emotion joy/sadness), N = 20:
# zero-shot, real-20, GRADMM-20 (gmtext-pipeline with no recipe overrides, as it stood before the
# readability guard became the default), its no-matching twin (the same seed's LM starts under the
# same selection, matcher=none) and GRADMM-20 with the guard (matcher.max_perplexity_ratio=1,
# today's default) over seeds 0 1 2.
# Every setting lives in conf/experiment/<dataset>_n20*.yaml; this script only loops, skips
# finished runs and reports.   bash experiments/n20_transfer.sh [SEEDS...]   (~1 h per seed on 2 cores)
# ROWS picks the pipeline rows (run dir prefix:experiment suffix); the contrastive pair
# (matcher.contrastive=1, GRADMM and its twin) is opt-in: ROWS="contrastive20:_contrastive ctwin20:_contrastive_twin",
# as is the class-prompted pair (matcher.init=class_prompt): ROWS="cprompt20:_classprompt cptwin20:_classprompt_twin"
# and GRADMM with the beam-search projection (projector.beam=4), without and with the guard:
# ROWS="beam20:_beam beamread20:_beam_readable"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/n20_transfer}
DATASETS=${DATASETS:-tweet_emotion imdb}
RUN=(logger=none threads=${THREADS:-2})
export WANDB_MODE=disabled
for d in $DATASETS; do
  [ -f $OUT/$d/zero_shot/metrics.json ] || gmtext-finetune experiment=${d}_zero_shot "${RUN[@]}" hydra.run.dir=$OUT/$d/zero_shot
done
SEEDS=("$@"); [ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0 1 2)
for s in "${SEEDS[@]}"; do
  for d in $DATASETS; do
    [ -f $OUT/$d/real20_s$s/metrics.json ] || gmtext-finetune experiment=${d}_real20 seed=$s "${RUN[@]}" hydra.run.dir=$OUT/$d/real20_s$s
    for row in ${ROWS:-gradmm20: twin20:_twin readable20:_readable}; do
      r=${row%%:*}
      [ -f $OUT/$d/${r}_s$s/metrics.json ] || gmtext-pipeline experiment=${d}_n20${row#*:} seed=$s "${RUN[@]}" hydra.run.dir=$OUT/$d/${r}_s$s
    done
  done
done
for d in $DATASETS; do gmtext-report $OUT/$d -o $OUT/$d/report --ignore selector.release; done  # runs made before {run}/probe recorded absolute probe paths
