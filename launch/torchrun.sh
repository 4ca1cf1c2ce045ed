#!/usr/bin/env bash
# Usage: launch/torchrun.sh RECIPE [key=value ...]
# Env: NPROC (default: number of GPUs, or 2 on CPU), NNODES (1), NODE_RANK (0),
#      MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), OMP_NUM_THREADS (CPU default: cores / NPROC;
#      torchrun's own default of 1 thread per process leaves the other cores idle).
# With NNODES > 1, output_dir must be on a filesystem every node sees (lock, checkpoints, data).
set -euo pipefail
gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$(( gpus > 0 ? gpus : 2 ))
fi
if [ "$gpus" = 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  threads=$(( $(nproc) / NPROC ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
exec python -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$NPROC" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  -m longshard.train.main "$@"
