#!/usr/bin/env bash
# Install longshard (editable) into the current Python environment.
# Usage: bash launch/install.sh [EXTRAS]     e.g.  bash launch/install.sh dev
# Without a GPU, a CPU build of torch is installed first (a bare `torch` requirement would pull a
# multi-GB CUDA build); with a GPU, the default (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.6,<3"
  else
    "$PY" -m pip install "torch==2.13.0" || "$PY" -m pip install "torch>=2.6,<3"
  fi
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
"$PY" -m pip install -q -e "$spec"
