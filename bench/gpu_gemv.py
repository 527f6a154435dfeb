"""Batch-1 projections of a Llama-3-8B-shaped model: cuBLAS against the Triton GEMV.

For each weight shape of the 8B decode step (qkv, o, gate_up, down, LM head) this checks
the GEMV against F.linear on random bf16 inputs, then times cuBLAS and every GEMV config in
GEMV_SWEEP inside CUDA graphs (weights rotated among enough copies to defeat L2), and prints
GB/s per shape. It writes the choice to --out as JSON, which bench/gpu_engine.py --gemv
applies to the whole decode step:

- ``config``: the one config with the least time per 8B step (shapes weighted by how often
  a step runs them: 32 per layer shape, 1 LM head);
- ``max_weight_elements``: the largest weight that still takes the GEMV, so that every
  shape up to it runs faster than cuBLAS with that config (0: cuBLAS everywhere).

    PYTHONPATH=. python3 bench/gpu_gemv.py --out gemv.json [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from gpu_timing import Run, check, n_sets_for, rel_err, time_calls

from kernels.triton_gemv import GemvConfig, linear_out

# (name, N, K, calls per 8B step)
SHAPES_8B = [("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32),
             ("down", 4096, 14336, 32), ("lm_head", 128256, 4096, 1)]
SHAPES_SMOKE = [("a", 40, 96, 1), ("b", 24, 160, 1)]
GEMV_SWEEP = [GemvConfig(bn, bk, w, st)
              for bn, bk in ((1, 1024), (1, 2048), (2, 512), (2, 1024), (2, 2048), (4, 256),
                             (4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256))
              for w in (4, 8) for st in (1, 3)]


def time_shape(run: Run, name: str, n: int, k: int, configs: list[GemvConfig]) -> dict:
    """Checks the GEMV on one weight shape, then seconds per call of cuBLAS and of each
    config: {"cublas": t, config_index: t}. The weight copies are freed on return."""
    sets = n_sets_for(run, n * k * 2, cap=16)
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device=run.dev) / k ** 0.5
          for _ in range(sets)]
    xs = [torch.randn(1, k, dtype=torch.bfloat16, device=run.dev) for _ in range(sets)]
    outs = [torch.empty(1, n, dtype=torch.bfloat16, device=run.dev) for _ in range(sets)]
    want = F.linear(xs[0].float(), ws[0].float())
    linear_out(xs[0], ws[0], None, outs[0], configs[0])
    check(run, f"gemv {name} {n}x{k}", rel_err(outs[0].float(), want))
    row: dict = {"cublas": time_calls(run, [lambda i=i: F.linear(xs[i], ws[i])
                                            for i in range(sets)])}
    for c, cfg in enumerate(configs):
        try:
            row[c] = time_calls(run, [
                lambda i=i, cfg=cfg: linear_out(xs[i], ws[i], None, outs[i], cfg)
                for i in range(sets)])
        except Exception as e:
            run.say(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}")
    return row


def sweep(run: Run, shapes: list[tuple[str, int, int, int]], configs: list[GemvConfig]
          ) -> tuple[dict, dict]:
    """Seconds per call: {shape: {"cublas": t, config_index: t}}, and each shape's
    (N, K, calls per step)."""
    times: dict[str, dict] = {}
    for name, n, k, _ in shapes:
        times[name] = time_shape(run, name, n, k, configs)
        if run.dev.type == "cuda":
            torch.cuda.empty_cache()
    return times, {name: (n, k, calls) for name, n, k, calls in shapes}


def choose(times: dict, shapes: dict, configs: list[GemvConfig]) -> tuple[int, int]:
    """The config with the least step time, and the largest weight below which it wins."""
    def step_time(c: int) -> float:
        return sum(times[s].get(c, float("inf")) * shapes[s][2] for s in times)
    best = min(range(len(configs)), key=step_time)
    limit = 0
    for name in sorted(times, key=lambda s: shapes[s][0] * shapes[s][1]):
        if times[name].get(best, float("inf")) >= times[name]["cublas"]:
            break
        limit = shapes[name][0] * shapes[name][1]
    return best, limit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gemv.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    l2 = 1 << 16 if args.smoke else torch.cuda.get_device_properties(dev).L2_cache_size
    run = Run(dev, args.smoke, l2)
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_8B
    configs = GEMV_SWEEP[:3] if args.smoke else GEMV_SWEEP
    times, meta = sweep(run, shapes, configs)
    best, limit = choose(times, meta, configs)
    run.say("\n| shape | N x K | cuBLAS us | cuBLAS GB/s | best GEMV (block_n, block_k, warps, "
            "stages) | us | GB/s | chosen config us | chosen GB/s | chosen / cuBLAS |")
    run.say("|" + "---|" * 10)
    for name, (n, k, _) in meta.items():
        row, nbytes = times[name], n * k * 2
        own = min((c for c in row if c != "cublas"), key=row.get)
        cfg = configs[own]
        run.say(f"| {name} | {n}x{k} | {row['cublas'] * 1e6:.1f} | "
                f"{nbytes / row['cublas'] / 1e9:.0f} | ({cfg.block_n}, {cfg.block_k}, "
                f"{cfg.num_warps}, {cfg.num_stages}) | {row[own] * 1e6:.1f} | "
                f"{nbytes / row[own] / 1e9:.0f} | {row.get(best, float('nan')) * 1e6:.1f} | "
                f"{nbytes / row.get(best, float('inf')) / 1e9:.0f} | "
                f"{row.get(best, float('nan')) / row['cublas']:.2f} |")
    run.say(f"\nchosen: {configs[best]}, GEMV for weights up to {limit} elements; "
            f"checks failed: {run.failures or 'none'}")
    with open(args.out, "w") as f:
        json.dump({"config": asdict(configs[best]), "max_weight_elements": limit,
                   "times_us": {s: {str(c): t * 1e6 for c, t in r.items()}
                                for s, r in times.items()}}, f, indent=1)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
