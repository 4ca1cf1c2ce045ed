#!/bin/bash
# longshard's one-call device check. From the repository root, on one GPU node:
#   OUT=DIR bash benchmarks/gpu_check.sh            # about 8 minutes on an H200
#   OUT=DIR bash benchmarks/gpu_check.sh --cpu-smoke  # tiny sizes on CPU: checks that the script runs
# Needs torch and triton; not flash-attn, omegaconf, wandb, deepspeed or a network. Wheels the tests
# need and the node lacks (omegaconf) may travel in WHEELS=DIR (default .gpucheck/whl); they go to a
# temporary site dir. The checkout is imported as `longshard` through a symlink (the repository
# root is the package). Every step has a cap, cut to what is left before DEADLINE (seconds).
# Writes under $OUT: env.txt, log.txt, compile.jsonl (every Triton kernel compiled for this
# device's arch with its launch settings: registers, spills, shared memory), pytest.xml (the
# CUDA and Triton tests), kernels.json (kernel vs SDPA flash and flex, fwd and fwd+bwd ms),
# train_step.json (bf16 step tokens/s and MFU of a ~1B model, dense / S2 / linear, ring sp=1).
set -u
R=$(cd "$(dirname "$0")/.." && pwd); cd "$R"
OUT=${OUT:-/tmp/longshard_gpu_check}; mkdir -p "$OUT"
SMOKE=0; [[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
DEADLINE=${DEADLINE:-480}; T0=$(date +%s); W=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TRITON_CACHE_DIR=$W/tcache WANDB_MODE=disabled
WHEELS=${WHEELS:-$R/.gpucheck/whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$WHEELS"/*.whl || exit 1
fi
if ! python3 -c "import longshard" 2>/dev/null; then
  mkdir -p "$W/pkg" && ln -sfn "$R" "$W/pkg/longshard"
  export PYTHONPATH=$W/pkg:$W/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$W/site${PYTHONPATH:+:$PYTHONPATH}
fi
LOG=$OUT/log.txt; : >"$LOG"
step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  (( left < 10 )) && { echo "== SKIP $name (deadline)" | tee -a "$LOG"; return; }
  (( cap > left )) && cap=$left
  echo "== $name start=$(( $(date +%s) - T0 ))s cap=${cap}s" | tee -a "$LOG"
  timeout -k 5 "$cap" "$@" >>"$LOG" 2>&1
  echo "== $name rc=$? end=$(( $(date +%s) - T0 ))s" | tee -a "$LOG"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  python3 -c "import sys,torch;print(sys.version.split()[0],torch.__version__,torch.cuda.is_available() and torch.cuda.get_device_name())"
  python3 -c "import triton;print('triton',triton.__version__)"
  python3 -c "import longshard;print('longshard',longshard.__file__)"
  git -C "$R" log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
if (( SMOKE )); then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  step compile 120 bash -c "env -u TRITON_INTERPRET python3 -m longshard.kernels.triton_compile --kernel fwd \
       --limit 2 --jobs 2 >'$OUT/compile.jsonl'"
  step pytest 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py -k "half or tensor_core" \
       --junitxml="$OUT/pytest.xml"
  step kernels_bench 120 python3 benchmarks/kernels.py --smoke --json "$OUT/kernels.json"
  step train_step 120 python3 benchmarks/train_step.py --cpu-smoke --json "$OUT/train_step.json"
else
  ARCH=$(python3 -c "import torch;m=torch.cuda.get_device_capability()[0];print(90 if m>=9 else 80)")
  step compile 90 bash -c "python3 -m longshard.kernels.triton_compile --jobs 8 >'$OUT/compile.jsonl'"
  step pytest 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" tests/kernels/test_triton_kernels.py \
       tests/kernels/test_flex.py tests/models/test_offload.py tests/kernels/test_doc_chunked.py tests/kernels/test_ring_pairs.py tests/kernels/test_flash_pairs.py tests/models/test_dma.py --junitxml="$OUT/pytest.xml"
  step kernels_bench 90 python3 benchmarks/kernels.py --lengths 8192 32768 --json "$OUT/kernels.json"
  step train_step 140 python3 benchmarks/train_step.py --lengths 8192 32768 --json "$OUT/train_step.json"
  echo "arch sm_$ARCH" >>"$OUT/env.txt"
fi
echo "== total $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
grep -h '"problems": \["' "$OUT/compile.jsonl" 2>/dev/null | cut -c1-300
grep -E "passed|failed" "$LOG" | tail -2
tail -8 "$LOG" | grep -E "MFU|overhead|variant" || true
rm -rf "$W"
