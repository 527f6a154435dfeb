#!/usr/bin/env bash
# The GPU measurements of issues 9, 10, 13 and 14, in steps so each device call stays under
# its 10-minute limit; several steps may go in one call (`bash bench/gpu_steps.sh model
# structured`). Steps that start two pods on two GPUs need nvidia-h200-x2.
# Carry what bench/gpu_wheels.sh makes: .whl/nixl (57 MB) alone in the first call, then
# .whl/base, .whl/extra, .whl/bin and the generated protos/pdserve_pb2*.py* (`make
# install` makes them); they stay installed while the machine is held.
#   model       make the random bf16 Llama-3-8B-shaped model in /tmp/m8b (on the GPU)
#   structured  issue 14: sampler per step, decode tok/s with a JSON schema vs unconstrained
#               (SAMPLER=0: skip the sampler's bench; SAMPLER_PATH=kernel,torch: the engine
#               with the Triton sampler and without it; SETUPS=1x1,4x4s: mask fill setups,
#               engine.mask_fill; STRUCT_MODELS="/tmp/m1b /tmp/m8b": the 1B- and the
#               8B-shaped model; needs .whl/base and .whl/extra)
#   checks      GPU greedy tokens = the CPU path's (graphs, async scheduling on and off)
#   cuda-tests  the connectors' and the tier's CUDA tests
#   transfer    issue 9: bench/kv_transfer.py, nccl / ucx / ucx-packed vs raw NCCL and copy
#               (KINDS=nccl without NIXL carried)
#   serving     issue 9: 8B model through pdserve up: exactness and TTFT, nccl and ucx
#   streams     issue 9: 64 streams through the router vs the CUDA-graph step alone
#   tier        issue 10: TTFT of 4k and 16k prefixes, tier hit vs recompute, 8B model
#   disagg      issue 13: 1P1D vs 2 colocated replicas, one trace, rising rates
#   prefill     the engine's prefill alone on the 8B model: first-token ms, kernels
#   ttft        4k prompts one at a time through pdserve up (colocated, nccl), profiled
#   fill        llguidance's mask fill of 32 rows by thread count (issue 14; host only)
#   structured-profile  py-spy of the engine at batch 32 under a JSON schema (issue 14)
#   calls       issue 9: what one NCCL group costs on the host, blocking vs non-blocking
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
M1B=/tmp/m1b
make_1b() {
  [ -f "$M1B/config.json" ] || python3 -m pdserve.cli make-model --arch llama --out "$M1B" \
    --layers 16 --hidden 2048 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 \
    --dtype bfloat16 --device cuda 2>&1 | tail -1
}
for step in "${@:-transfer}"; do
  echo "== $step ($(date +%T))"
  case "$step" in
    model) make_8b ;;
    structured)
      python3 bench/gil_handoff.py 2>&1 | tee "$OUT/gil_handoff.txt"  # host only, ~2 s
      [ "${SAMPLER:-1}" = 0 ] || python3 bench/sampler_bench.py --device cuda \
        --batches 1,64,256 --repeat 5 --warmup 2 2>&1 | tee "$OUT/sampler_gpu.txt"
      for model in ${STRUCT_MODELS:-$M1B}; do  # /tmp/m8b: the 8B-shaped model too
      if [ "$model" = "$M8B" ]; then make_8b; elif [ "$model" = "$M1B" ]; then make_1b; fi
      for sw in ${SWITCH:-0.0005}; do  # GIL switch intervals, seconds (a pod's: 0.0005)
        PYTHONFAULTHANDLER=1 timeout -s ABRT "${BENCH_TIMEOUT:-400}" \
          python3 bench/structured_bench.py --model "$model" --device cuda --dtype bfloat16 \
          --batches "${BATCHES:-1,32}" --max-tokens 128 --repeat "${REPEAT:-2}" \
          --fill "${FILL:-worker}" --fill-threads "${FILL_THREADS:-}" --setups "${SETUPS:-engine}" \
          --slices "${SLICES:-json}" --sampler "${SAMPLER_PATH:-kernel}" \
          --async-scheduling "${ASYNC:-on,off}" $([ "${PHASES:-0}" = 1 ] && echo --phases) \
          --switch-interval "$sw" $([ "${PROFILE:-0}" = 1 ] && echo --torch-profile \
          "$OUT/structured_kernels_$sw.txt") $([ "${CPROFILE:-0}" = 1 ] && echo --cprofile \
          "$OUT/structured_host_$sw.txt") 2>&1 \
          | tee -a "$OUT/structured_gpu_$sw.txt"
      done
      done
      ;;
    checks)  # greedy GPU tokens = the CPU path's, graphs and async scheduling on/off
      # (SIGABRT on a hang: faulthandler prints every thread's stack)
      PYTHONFAULTHANDLER=1 timeout -s ABRT 120 python3 -m pytest -q -p no:cacheprovider \
        tests/engine/test_host_gate.py 2>&1 | tee "$OUT/host_gate_tests.txt"
      PYTHONFAULTHANDLER=1 timeout -s ABRT "${CHECKS_TIMEOUT:-300}" python3 \
        bench/gpu_engine.py --checks-only 2>&1 | tee "$OUT/gpu_checks.txt"
      ;;
    cuda-tests)
      python3 -m pytest -q -p no:cacheprovider tests/kv_transfer/test_kv_cuda.py \
        tests/kv_transfer/tier/test_tier_codec.py 2>&1 | tee "$OUT/cuda_tests.txt"
      ;;
    transfer)
      python3 bench/kv_transfer.py --kinds "${KINDS:-nccl,ucx,ucx-packed}" --repeats 5 \
        --json "$OUT/kv_transfer.json" 2>&1 | grep -v Warning | tee "$OUT/kv_transfer.txt"
      ;;
    serving)
      make_8b
      python3 bench/gpu_serving.py --model "$M8B" --systems colocated,nccl,ucx --repeats 2 \
        --json "$OUT/serving_8b.json" 2>&1 | tee "$OUT/serving_8b.txt"
      ;;
    streams)
      make_8b
      python3 bench/gpu_streams.py --model "$M8B" --streams 64 --input-len 128 \
        --output-len 512 --connector "${CONNECTOR:-nccl}" --json "$OUT/streams.json" \
        --profile "$OUT/streams_profile" 2>&1 | tee "$OUT/streams.txt"
      compgen -G "$OUT/streams_profile/*.txt" > /dev/null && python3 bench/py_spy_summary.py \
        "$OUT"/streams_profile/*.txt > "$OUT/streams_profile/summary.txt" 2>&1
      ;;
    tier)
      make_8b
      python3 bench/kv_tier_ttft.py --model "$M8B" --device cuda --dtype bfloat16 \
        --prefixes 4096,16384 --repeat "${TIER_REPEAT:-3}" --max-num-batched-tokens 8192 \
        2>&1 | tee "$OUT/tier_gpu.txt"
      ;;
    disagg)
      make_8b
      python3 bench/gpu_disagg.py --model "$M8B" --device cuda --connector "${CONNECTOR:-nccl}" \
        --rates "${RATES:-1.5,3,5}" --num-requests "${REQUESTS:-40}" --warmup 16 \
        --systems "${SYSTEMS:-colocated,disaggregated}" --pod-args "${POD_ARGS:-}" \
        --prefill-pod-args "${PREFILL_POD_ARGS:-}" --out "$OUT/disagg" 2>&1 \
        | tee "$OUT/disagg.txt"
      ;;
    prefill)
      make_8b
      python3 bench/gpu_prefill.py --model "$M8B" 2>&1 | tee "$OUT/prefill.txt"
      ;;
    ttft)
      make_8b
      for system in ${TTFT_SYSTEMS:-colocated nccl}; do
        python3 bench/gpu_ttft_profile.py --model "$M8B" --system "$system" \
          --profile "$OUT/ttft_$system" 2>&1 | tee -a "$OUT/ttft.txt"
        compgen -G "$OUT/ttft_$system/*.txt" > /dev/null && python3 bench/py_spy_summary.py \
          "$OUT/ttft_$system"/*.txt > "$OUT/ttft_$system/summary.txt" 2>&1
      done
      ;;
    structured-profile)
      make_1b
      mkdir -p "$OUT/structured_profile"
      py-spy record -r 500 -f raw --idle --threads -o "$OUT/structured_profile/engine.txt" -- \
        PYTHONFAULTHANDLER=1 timeout -s ABRT "${BENCH_TIMEOUT:-400}" \
          python3 bench/structured_bench.py --model "$M1B" --device cuda --dtype bfloat16 \
        --batches 32 --max-tokens 256 --repeat 1 2>&1 | tail -4 | tee "$OUT/structured_profile/bench.txt"
      python3 bench/py_spy_summary.py "$OUT/structured_profile/engine.txt" \
        > "$OUT/structured_profile/summary.txt" 2>&1
      ;;
    calls)
      python3 bench/nccl_calls.py --repeats 20 --json "$OUT/nccl_calls.json" 2>&1 \
        | grep -v Warning | tee "$OUT/nccl_calls.txt"
      ;;
    fill)
      make_1b
      python3 bench/grammar_fill.py --model "$M1B" --threads "${FILL_THREADS:-1,2,3,4,0}" \
        --replicas "${REPLICAS:-1}" $([ -n "${SPLIT:-}" ] && echo --split "$SPLIT") 2>&1 \
        | tee "$OUT/grammar_fill.txt"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
