#!/usr/bin/env bash
# Issue 14 on one GPU in one device call: the sampler per step (vectorized vs the
# per-sequence code it replaced) at batch 1/64/256, then decode tokens/s with a JSON schema
# vs unconstrained at batch 1 and 32 on a Llama-3.2-1B-shaped random bf16 model (vocab
# 128,256: the grammar mask's cost grows with the vocabulary). Carry .whl/l14 (llguidance,
# made here with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_31_x86_64 -d .whl/l14 llguidance==1.9.1`). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 bench/sampler_bench.py --device cuda --batches 1,64,256 --repeat 5 --warmup 2 \
  2>&1 | tee "$OUT/sampler_gpu.txt"
python3 -m pdserve.cli make-model --arch llama --out /tmp/m1b --layers 16 --hidden 2048 \
  --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --dtype bfloat16 \
  --device cuda 2>&1 | tail -2
python3 bench/structured_bench.py --model /tmp/m1b --device cuda --dtype bfloat16 \
  --batches 1,32 --max-tokens 128 --repeat 2 2>&1 | tee "$OUT/structured_gpu.txt"
