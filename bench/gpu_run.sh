#!/usr/bin/env bash
# The one script a device call runs: what card this is, then bench/gpu_kernels.py (checks
# every Triton kernel against its reference, then times them). Extra arguments go to it,
# e.g. `bash bench/gpu_run.sh --tune`. Output and tables land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pdserve-bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv 2>&1 | tee "$OUT/gpu.txt"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
python3 bench/gpu_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
