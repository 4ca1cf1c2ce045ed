#!/usr/bin/env bash
# Usage: launch/deepspeed.sh RECIPE [key=value ...]
# Starts longshard's trainer with the DeepSpeed launcher (it sets RANK/WORLD_SIZE/LOCAL_RANK and
# passes --local_rank, which the entry point accepts). Env: NUM_GPUS (default: all visible),
# HOSTFILE (multi-node), MASTER_PORT (29500). Needs `pip install 'longshard[deepspeed]'`.
set -euo pipefail
args=(--master_port "${MASTER_PORT:-29500}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
exec deepspeed "${args[@]}" --module longshard.train.main "$@"
