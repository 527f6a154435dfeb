#!/usr/bin/env bash
# Issue 9 on the 2-GPU machine (nvidia-h200-x2), in steps so each device call stays short.
# Carry .whl/nixl in the first call (bench/gpu_wheels.sh makes .whl/), .whl/base and
# .whl/extra after, and the generated protos/pdserve_pb2*.py* (`make install` makes them).
#   bash bench/gpu_issue9.sh transfer   # CUDA connector tests, then bench/kv_transfer.py
#   bash bench/gpu_issue9.sh serving    # 8B-shaped model: exactness + TTFT, nccl and ucx
#   bash bench/gpu_issue9.sh streams    # 64 streams through the router vs the graph step
# Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
M8B=/tmp/m8b
make_8b() {
  [ -f "$M8B/config.json" ] || python3 -m pdserve.cli make-model --arch llama --out "$M8B" \
    --layers 32 --hidden 4096 --heads 32 --kv-heads 8 --intermediate 14336 --vocab 128256 \
    --dtype bfloat16 --max-position-embeddings 65536 --device cuda 2>&1 | tail -1
}
case "${1:-transfer}" in
  transfer)
    python3 -m pytest -q -p no:cacheprovider tests/kv_transfer/test_kv_cuda.py 2>&1 \
      | tee "$OUT/cuda_tests.txt"
    python3 bench/kv_transfer.py --kinds nccl,ucx,ucx-packed --repeats 5 --json "$OUT/kv_transfer.json" \
      2>&1 | grep -v Warning | tee "$OUT/kv_transfer.txt"
    ;;
  serving)
    make_8b
    python3 bench/gpu_serving.py --model "$M8B" --systems colocated,nccl,ucx --repeats 2 \
      --json "$OUT/serving_8b.json" 2>&1 | tee "$OUT/serving_8b.txt"
    ;;
  streams)
    make_8b
    python3 bench/gpu_streams.py --model "$M8B" --streams 64 --input-len 128 \
      --output-len 512 --connector "${CONNECTOR:-nccl}" --json "$OUT/streams.json" 2>&1 \
      | tee "$OUT/streams.txt"
    ;;
esac
