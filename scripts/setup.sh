#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with torch and progdistill.
# Where a torch already imports (e.g. a GPU user's CUDA build, visible through
# --system-site-packages), it is kept; otherwise the CPU build torch==2.13.0 is installed first,
# so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PROGDISTILL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.progdistill-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$VPY" -c "import torch, progdistill" 2>/dev/null; then
  exit 0
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: no torch found; installing the CPU build torch==2.13.0"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
"$VPY" -m pip install -q -e ".[test]"
touch "$stamp"
echo "setup: ready ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
