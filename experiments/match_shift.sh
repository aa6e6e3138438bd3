#!/usr/bin/env bash
# How far the matching moves the text, for every GRADMM run next to its no-matching twin of the same
# seed (docs/generation.md "What the matching changes"): experiments/paired_compare.py per pair, one
# JSON per pair under $OUT; then experiments/label_fit.py judges every pool (a sentence-embedding
# classifier trained on a public split that is not the evaluation split). Reads committed run dirs
# and ../shared/data only; the generator is never loaded.
#   bash experiments/match_shift.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=experiments/results
OUT=${OUT:-$R/match_shift}
mkdir -p "$OUT"
PAIRS=(
  "rt_private_eps1 $R/rt_private_n100/eps1_s%s $R/rt_private_n100/twin_s%s"
  "rt_private_eps4 $R/rt_private_n100/eps4_s%s $R/rt_private_n100/twin_s%s"
  "tweets_n20 $R/n20_transfer/tweet_emotion/gradmm20_s%s $R/n20_transfer/tweet_emotion/twin20_s%s"
  "tweets_n20_contrastive $R/n20_transfer/tweet_emotion/contrastive20_s%s $R/n20_transfer/tweet_emotion/ctwin20_s%s"
  "imdb_n20 $R/n20_transfer/imdb/gradmm20_s%s $R/n20_transfer/imdb/twin20_s%s"
  "tweets_n20_beam $R/n20_transfer/tweet_emotion/beam20_s%s $R/n20_transfer/tweet_emotion/twin20_s%s"
  "imdb_n20_beam $R/n20_transfer/imdb/beam20_s%s $R/n20_transfer/imdb/twin20_s%s"
  "tweets_n20_beam_readable $R/n20_transfer/tweet_emotion/beamread20_s%s $R/n20_transfer/tweet_emotion/twin20_s%s"
  "imdb_n20_beam_readable $R/n20_transfer/imdb/beamread20_s%s $R/n20_transfer/imdb/twin20_s%s"
)
for p in "${PAIRS[@]}"; do
  read -r name a b <<<"$p"
  for s in 0 1 2; do
    echo "== $name seed $s"
    python experiments/paired_compare.py "$(printf "$a" $s)/synthetic.jsonl" "$(printf "$b" $s)/synthetic.jsonl" \
      --json "$OUT/${name}_s$s.json"
  done
done

D=../shared/data
T=$R/n20_transfer
[ -d $D/rotten_tomatoes ] || { echo "match_shift.sh: $D/rotten_tomatoes not found (see ../shared/data/README)" >&2; exit 2; }
python experiments/label_fit.py --file synthetic.jsonl --judge-data $D/rotten_tomatoes/test.jsonl \
  $R/rt_private_n100/{eps1,eps4,twin}_s{0,1,2} --out "$OUT/label_fit_rt_pool.json"
python experiments/label_fit.py --file synthetic.jsonl --judge-data $D/tweeteval_emotion/joy_sadness/test.jsonl \
  $T/tweet_emotion/{gradmm20,twin20,contrastive20,ctwin20,cptwin20}_s{0,1,2} --out "$OUT/label_fit_tweets_pool.json"
python experiments/label_fit.py --file synthetic.jsonl --judge-data $D/imdb/train.jsonl \
  $T/imdb/{gradmm20,twin20}_s{0,1,2} --out "$OUT/label_fit_imdb_pool.json"
