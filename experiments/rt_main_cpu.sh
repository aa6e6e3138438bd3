#!/usr/bin/env bash
# The paper's main-table protocol on rotten tomatoes, CPU scale, in one command, from nothing:
#   bash experiments/rt_main_cpu.sh [SEEDS...]          (default: 0 1 2; ~1.5 h on 2 cores)
#   N=100 POOL_PER_CLASS=50 EPS_LIST=inf ROWS="real prompted gradmm" bash experiments/rt_main_cpu.sh 0
#   N=100 POOL_PER_CLASS=100 EPS_LIST=inf ROWS=gradmm OUT=experiments/results/rt_main_cpu_n100_pool100 bash experiments/rt_main_cpu.sh
#   MARGIN=1 ...   also select the ε = ∞ pool by label-fit margin against a middle-layer probe release (docs/selection.md)
# generate (GRADMM at ε = ∞, 4, 1) → select → fine-tune every row → audit → report.
# SmolLM2-135M (embedded), N training examples (default 20, N/2 per class) for every trained row, one
# fine-tuning recipe (full model, AdamW lr 1e-5, batch 8, 10 epochs, loss over the verbalizer
# tokens), evaluated on a fixed 500-example subset of validation. Finished steps are skipped,
# so a killed run continues where it stopped. Results: experiments/results/rt_main_cpu/.
# Seeds vary fine-tuning and the real / prompted / few-shot / DP-SGD subsets; the three GRADMM
# pools are generated once (seed 0) and reused, as a generator would be in practice.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/rotten_tomatoes
N=${N:-20}                                  # training examples per trained row
POOL_PER_CLASS=${POOL_PER_CLASS:-$N}        # GRADMM pool per class; select keeps N/2 of them
EPS_LIST=${EPS_LIST:-inf 4 1}               # GRADMM privacy levels (inf = non-private)
ROWS=${ROWS:-zero fewshot real prompted gradmm dpsgd}
MARGIN=${MARGIN:-0}                         # 1: add the margin-selected GRADMM row (ε = ∞ pool only)
if [ "$N" = 20 ]; then OUT=${OUT:-experiments/results/rt_main_cpu}; else OUT=${OUT:-experiments/results/rt_main_cpu_n$N}; fi
has() { [[ " $ROWS " == *" $1 "* ]]; }
BASE=(dataset=rotten_tomatoes dataset.path=$DATA logger=none threads=2)
FT=("${BASE[@]}" finetune.eval_limit=500 finetune.dev_size=0 finetuner.lr=1e-5 finetuner.batch_size=8 finetuner.epochs=10)
# generator: last block + final norm matched, verbalizer loss, every sequence matched to its class
# target, 8 LM-sampled starts, LM top-k projection with a closeness bonus (docs/generation.md)
GEN=("${BASE[@]}" seed=0 num_per_class=$POOL_PER_CLASS batch_size=10 match_loss=verbalizer
     "matched_params=[final_norm,last_blocks:1]" matcher.objective=sequence matcher.init_candidates=8
     projector.topk=200 projector.sim_weight=5)
export WANDB_MODE=disabled
[ -d "$DATA" ] || { echo "rt_main_cpu.sh: $DATA not found (see ../shared/data/README)" >&2; exit 2; }

# ε = ∞ (non-private), 4, 1: each pool is POOL_PER_CLASS per class; select keeps the N/2 best-matching per class
# ε = ∞ keeps the published 50-per-class sample; a DP release reads the whole train split
declare -A EPS=([inf]="privacy=none real_per_class=50" [4]="privacy=dp privacy.epsilon=4" [1]="privacy=dp privacy.epsilon=1")
has gradmm || EPS_LIST=
for e in $EPS_LIST; do
  [ -f $OUT/gen_eps$e/generate.json ] || gmtext-generate "${GEN[@]}" ${EPS[$e]} hydra.run.dir=$OUT/gen_eps$e
  [ -f $OUT/select_eps$e/selected.jsonl ] || gmtext-select "${BASE[@]}" pool=$OUT/gen_eps$e selector.per_class=$((N / 2)) hydra.run.dir=$OUT/select_eps$e
  [ -f $OUT/audit_eps$e/audit.json ] || gmtext-audit "${BASE[@]}" synthetic=$OUT/gen_eps$e hydra.run.dir=$OUT/audit_eps$e
done

# margin selection: a second, non-private release of the same 50 real examples per class over layers
# 10-19, whose gradients tell the classes apart (experiments/probe_params.py); it scores the ε = ∞ pool
has gradmm && [[ " $EPS_LIST " == *" inf "* ]] || MARGIN=0
if [ "$MARGIN" = 1 ]; then
  [ -f $OUT/probe_mid/release/release.json ] || gmtext-release "${BASE[@]}" seed=0 real_per_class=50 match_loss=verbalizer \
      "matched_params=['re:layers\.(1[0-9])\.']" hydra.run.dir=$OUT/probe_mid
  [ -f $OUT/select_margin/selected.jsonl ] || gmtext-select "${BASE[@]}" pool=$OUT/gen_epsinf selector=margin \
      selector.release=$OUT/probe_mid/release selector.per_class=$((N / 2)) hydra.run.dir=$OUT/select_margin
fi

ft() {  # ft RUN_NAME OVERRIDES...: one fine-tune + eval, skipped when already finished
  local d=$OUT/$1; shift
  [ -f $d/metrics.json ] || gmtext-finetune "${FT[@]}" "$@" hydra.run.dir=$d
}
has zero && ft zero_shot train=none
for s in "${@:-0 1 2}"; do
  for s1 in $s; do
    has fewshot && ft fewshot4_s$s1 seed=$s1 train=fewshot train.k=4
    has real && ft real${N}_s$s1 seed=$s1 train=real train.size=$N
    has prompted && ft prompted${N}_s$s1 seed=$s1 train=prompted train.size=$N
    for e in $EPS_LIST; do ft gradmm${N}_eps${e}_s$s1 seed=$s1 train=synthetic train.path=$OUT/select_eps$e; done
    [ "$MARGIN" = 1 ] && ft gradmm${N}_margin_s$s1 seed=$s1 train=synthetic train.path=$OUT/select_margin
    if has dpsgd; then for e in 4 1; do ft dpsgd${N}_eps${e}_s$s1 seed=$s1 train=dpsgd train.size=$N train.epsilon=$e; done; fi
  done
done
# table + plots over every row (synthetic sets told apart by the pool they came from)
gmtext-report $OUT -o $OUT/report --group-by train.path --plot-ignore train.path --ignore match_loss
