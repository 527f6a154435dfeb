"""Time to first token of long prompts, one at a time, through ``pdserve up`` on a GPU,
with the pods sampled by py-spy while they run: where a served prefill spends what the
engine alone (bench/gpu_prefill.py) does not.

    python3 bench/gpu_ttft_profile.py --model /tmp/m8b --system colocated|nccl|ucx
        [--length 4096] [--count 8] --profile DIR
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_serving import start, stop
from gpu_streams import start_profiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--system", default="colocated")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--pod-args", default="--max-num-batched-tokens 8192")
    ap.add_argument("--port", type=int, default=8470)
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args()
    log = Path("/tmp/pdserve-gpu-logs")
    log.mkdir(parents=True, exist_ok=True)
    proc, url = start(args.model, args.system, args.port, args.pod_args, False,
                      log / f"ttft-{args.system}.log")
    try:
        base = url.rstrip("/").removesuffix("/v1")
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        rng = random.Random(1)

        def ttft() -> float:
            prompt = [rng.randrange(1000, 100000) for _ in range(args.length)]
            body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
            t0 = time.perf_counter()
            httpx.post(f"{base}/v1/completions", json=body, timeout=120).raise_for_status()
            return time.perf_counter() - t0

        ttft(), ttft()  # warm-up
        spies = []
        if args.profile:
            spies = start_profiles(args.profile, 0, 4, ("decode", "prefill", "router"))
            time.sleep(0.5)
        times = [ttft() for _ in range(args.count)]
        for spy in spies:
            spy.wait(30)
        print(f"{args.system}: {args.length}-token prompts, max_tokens 1, one at a time: "
              f"median {1e3 * statistics.median(times):.1f} ms "
              f"({', '.join(f'{1e3 * t:.0f}' for t in times)})", flush=True)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
