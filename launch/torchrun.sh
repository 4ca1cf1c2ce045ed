#!/usr/bin/env bash
# Usage: launch/torchrun.sh RECIPE [key=value ...]
# Env: NPROC (default: number of GPUs, or 2 on CPU), NNODES (1), NODE_RANK (0),
#      MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=2
  fi
fi
exec python -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$NPROC" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  -m longshard.train.main "$@"
