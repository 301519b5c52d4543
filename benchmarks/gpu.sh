#!/usr/bin/env bash
# The issue-9 GPU figures for the cifar10 preset at bf16, in one run of at most 5 minutes on one GPU:
# teacher training images/s, distillation step / training step (target <= 1.7), DDIM sampling images/s,
# model FLOP utilisation against the device's dense bf16 peak, and an eager NCHW vs channels_last step.
# torch.compile (inductor) compiles during the untimed warm-up steps; everything prints as it is measured.
#   bash benchmarks/gpu.sh [JSON=gpu.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
exec timeout 300 "$PY" benchmarks/gpu.py --compile --channels-last on --compare-layout --json "${1:-gpu.json}"
