#!/usr/bin/env bash
# One device call for issue 3's whole-step goal: sweep the batch-1 GEMV configs against
# cuBLAS (bench/gpu_gemv.py), then time the 8B decode step with the chosen GEMV beside
# cuBLAS and check greedy tokens (bench/gpu_engine.py), then profile the batch-1 step.
# Output lands in $OUT (gemv.json, gemv.md, engine.md, profile.txt, log.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pdserve-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem \
        --format=csv
    python3 bench/gpu_gemv.py --out "$OUT/gemv.json"
    python3 bench/gpu_engine.py --gemv "$OUT/gemv.json" --out "$OUT/engine.md"
    python3 bench/gpu_engine.py --gemv "$OUT/gemv.json" --profile --out "$OUT/profile.txt"
} 2>&1 | tee "$OUT/log.txt"
