#!/usr/bin/env bash
# The digits teacher-recipe comparison behind the preset's defaults (issue 10): each recipe trains a
# teacher with `progdistill train --data digits` plus the listed options, then
# benchmarks/teacher_quality.py scores its 256-step DDIM (2 seed sets x 1,297 samples) against the floor.
# Recipes run two at a time with one torch thread each (2-core machine).
#   bash benchmarks/teacher_recipes.sh [OUT=runs/recipes] [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/recipes}
shift || true
declare -A RECIPES=(
  [base]="--lr-decay constant"
  [cos]="--lr-decay cosine --lr-final-frac 0.02"
  [cos_ema9995]="--lr-decay cosine --lr-final-frac 0.02 --ema-decay 0.9995"
  [cos_lr2e3]="--lr-decay cosine --lr-final-frac 0.02 --lr 2e-3"
  [cos_lr3e3]="--lr-decay cosine --lr-final-frac 0.02 --lr 3e-3"
  [cos_lr2e3_w48]="--lr-decay cosine --lr-final-frac 0.02 --lr 2e-3 --width 48 --iters 2000"
  [cos_b128]="--lr-decay cosine --lr-final-frac 0.02 --batch-size 128 --iters 1800"
  [cos_lr2e3_b128]="--lr-decay cosine --lr-final-frac 0.02 --lr 2e-3 --batch-size 128 --iters 1800"
  [cos_lr2e3_d2]="--lr-decay cosine --lr-final-frac 0.02 --lr 2e-3 --depth 2 --iters 2000"
  [shift2.8]="--logsnr-shift 2.77"        # 2 log(32/8): the cosine schedule shifted for 8 px instead of 32 px
  [shift4.2]="--logsnr-shift 4.16"        # 2 log(64/8)
  [shift-1.5]="--logsnr-shift -1.5"        # more noise at every t
  [shift-3]="--logsnr-shift -3"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(base cos cos_ema9995 cos_lr2e3 cos_b128)
run_one() {
  local name=$1
  if [ ! -f "$OUT/$name/timing.json" ] || ! grep -q '"finished": true' "$OUT/$name/timing.json"; then
    rm -rf "$OUT/$name"
    .venv/bin/progdistill --threads 1 train --data digits --out "$OUT/$name" --no-progress --sample-steps 16 \
      ${RECIPES[$name]} > "$OUT/$name.train.log" 2>&1
  fi
  .venv/bin/python benchmarks/teacher_quality.py "$OUT/$name" --threads 1 > "$OUT/$name.quality.log" 2>&1
  echo "== $name (${RECIPES[$name]})"; tail -n 6 "$OUT/$name.quality.log"
}
mkdir -p "$OUT"
i=0
for name in "${names[@]}"; do
  run_one "$name" &
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait
