#!/usr/bin/env bash
# Usage: launch/deepspeed.sh RECIPE [key=value ...]
# Starts longshard's trainer with the DeepSpeed launcher (it sets RANK/WORLD_SIZE/LOCAL_RANK and
# passes --local_rank, which the entry point accepts). Env: NUM_GPUS (default: all visible),
# HOSTFILE (multi-node), MASTER_PORT (29500). Needs `pip install 'longshard[deepspeed]'`.
# Runs the DeepSpeed engine (train.engine=deepspeed; ZeRO stage from the recipe's `deepspeed`
# section, default 1); later overrides win, e.g. deepspeed.zero_stage=3.
set -euo pipefail
if ! command -v deepspeed >/dev/null 2>&1; then
  echo "launch/deepspeed.sh: the deepspeed launcher is not installed. Fix: pip install 'longshard[deepspeed]'" >&2
  exit 2
fi
args=(--master_port "${MASTER_PORT:-29500}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
recipe=$1
shift
exec deepspeed "${args[@]}" --module longshard.train.main "$recipe" train.engine=deepspeed "$@"
