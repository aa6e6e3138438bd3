#!/usr/bin/env bash
# Rotten tomatoes, SmolLM2-135M, N = 20 training examples (10 per class), one fine-tuning
# recipe for every row (full model, AdamW lr 1e-5, batch 8, 10 epochs), evaluated on a fixed
# 500-example subset of the validation split. GRADMM rows reuse the pool written by
# experiments/generation_quality.py (20 per class) and keep the 10 best-matching per class.
#   bash experiments/rt_n20.sh [SEEDS...]      (default: 0)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/rotten_tomatoes
OUT=experiments/results/rt_n20
POOL=experiments/results/generation_quality
COMMON=(dataset=rotten_tomatoes dataset.path=$DATA logger=none threads=2 finetune.eval_limit=500 finetune.dev_size=0
        finetuner.lr=1e-5 finetuner.batch_size=8 finetuner.epochs=10)
export WANDB_MODE=disabled
for v in gradmm nearest; do
  [ -f $OUT/select_$v/selected.jsonl ] || gmtext-select "${COMMON[@]}" pool=$POOL/$v selector.per_class=10 hydra.run.dir=$OUT/select_$v
done
[ -f $OUT/zero_shot/metrics.json ] || gmtext-finetune "${COMMON[@]}" train=none hydra.run.dir=$OUT/zero_shot
for s in "${@:-0}"; do
  gmtext-finetune "${COMMON[@]}" seed=$s train=synthetic train.path=$OUT/select_gradmm hydra.run.dir=$OUT/gradmm20_s$s
  gmtext-finetune "${COMMON[@]}" seed=$s train=real train.size=20 hydra.run.dir=$OUT/real20_s$s
  gmtext-finetune "${COMMON[@]}" seed=$s train=prompted train.size=20 hydra.run.dir=$OUT/prompted20_s$s
  gmtext-finetune "${COMMON[@]}" seed=$s train=synthetic train.path=$OUT/select_nearest hydra.run.dir=$OUT/nearest20_s$s
done
# table + plots over every row above (synthetic sets told apart by the pool they came from)
gmtext-report $OUT -o $OUT/report --group-by train.path --ignore match_loss
