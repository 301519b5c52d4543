#!/usr/bin/env bash
# The issue-4 figures in one documented setting (about 30 minutes on this project's 2-core CPU machine):
# a longer demo run (teacher 8,000 iterations; distillation 120 iterations per round, last two rounds x3),
# then benchmarks/quality.py (2 seed sets x 2,000 samples) and benchmarks/speed.py.
#   bash benchmarks/full.sh [OUT=runs/bench]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench}
.venv/bin/progdistill demo --out "$OUT" --teacher-iters 8000 --iters-per-round 120 --last-rounds-factor 3 --num-eval 0
.venv/bin/python benchmarks/quality.py "$OUT" --seeds 0,1 --num 2000
.venv/bin/python benchmarks/speed.py --batch-size 64 --demo "$OUT"
