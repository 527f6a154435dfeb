"""Launch-config sweeps for the attention kernels (``gpu_kernels.py --tune``): decode tile
shapes, the split path's variants (ranges or interleaved tiles, a PDL-launched merge kernel
or the in-kernel merge, the PDL chain) and split counts, and prefill tiles. Each prints its
table and returns the best config; bench/GPU_NOTES.md keeps what they found."""

from __future__ import annotations

from dataclasses import replace

from gpu_attention_cases import (
    HK,
    DecodeSetup,
    decode_setup,
    prefill_setup,
    time_decode,
    time_prefill,
)
from gpu_timing import Run

from kernels.triton_decode_attention import DecodeConfig, choose_num_splits, sm_count
from kernels.triton_prefill_attention import PrefillConfig

DECODE_TUNE = [DecodeConfig(block_n=bn, num_warps=w, num_stages=st)
               for bn, w, st in [(64, 4, 3), (64, 4, 2), (128, 8, 3), (32, 4, 4)]]
SPLIT_TUNE = [(64, 4, 1), (64, 4, 2), (128, 4, 1), (32, 4, 1), (64, 8, 1)]


def _try_time(run: Run, st: DecodeSetup, cfg: DecodeConfig) -> float:
    try:
        return time_decode(run, st, cfg)
    except Exception as e:
        run.say(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}")
        return float("inf")


def tune_decode(run: Run, base: DecodeConfig) -> DecodeConfig:
    batch, ctx = (2, 64) if run.smoke else (64, 4096)
    st = decode_setup(run, batch, ctx)
    best, best_t = base, float("inf")
    run.say(f"decode tuning at {batch}x{ctx} (no split):")
    for cfg in DECODE_TUNE[:2] if run.smoke else DECODE_TUNE:
        t = _try_time(run, st, replace(cfg, num_splits=1))
        run.say(f"  block_n {cfg.block_n:4d} warps {cfg.num_warps} stages {cfg.num_stages}: "
                f"{t * 1e6:8.1f} us  {st.kv_bytes / t / 1e9:7.0f} GB/s")
        if t < best_t:
            best, best_t = cfg, t
    del st
    # The split path: per tile shape, ranges vs interleaved tiles, without/with PDL.
    small = [(1, 64 if run.smoke else 4096, (2, 4) if run.smoke else (16, 32, 64))]
    if not run.smoke:
        small.append((16, 4096, (2, 4, 8)))
    # (interleave, pdl, merge in the split kernel)
    variants = [(False, False, False), (True, False, False), (True, True, False),
                (False, False, True), (True, False, True)]
    totals: dict[tuple, float] = {}
    for batch, ctx, splits in small:
        st = decode_setup(run, batch, ctx)
        run.say(f"decode split path at {batch}x{ctx}, us for splits {splits}, [ranges | "
                "interleaved | interleaved+pdl | ranges+in-kernel merge | "
                "interleaved+in-kernel merge]:")
        for bn, w, sg in SPLIT_TUNE[:2] if run.smoke else SPLIT_TUNE:
            cells = []
            for inter, pdl, merge in variants:
                cfg = replace(best, split_block_n=bn, split_num_warps=w, split_num_stages=sg,
                              interleave=inter, pdl=pdl, merge_in_kernel=merge)
                ts = [_try_time(run, st, replace(cfg, num_splits=k)) * 1e6 for k in splits]
                key = (bn, w, sg, inter, pdl, merge)
                totals[key] = totals.get(key, 0.0) + min(ts) / (1 if batch == 1 else 6)
                cells.append(" ".join(f"{t:.1f}" for t in ts))
            run.say(f"  block_n {bn:4d} warps {w} stages {sg}: " + " | ".join(cells))
        del st
    bn, w, sg, inter, pdl, merge = min(totals, key=totals.get)  # B=1 weighs most: the goal
    best = replace(best, split_block_n=bn, split_num_warps=w, split_num_stages=sg,
                   interleave=inter, pdl=pdl, merge_in_kernel=merge)
    if best.merge_in_kernel:  # launching by PDL in a chain, or not
        shapes = [(1, 64)] if run.smoke else [(1, 4096), (1, 512), (16, 4096)]
        first = {}
        run.say("in-kernel merge, us without | with the PDL chain:")
        for batch, ctx in shapes:
            st = decode_setup(run, batch, ctx)
            cells = {c: _try_time(run, st, replace(best, pdl_chain=c)) * 1e6
                     for c in (False, True)}
            first = first or cells  # B=1 x the longest context decides
            run.say(f"  {batch}x{ctx}: {cells[False]:.1f} | {cells[True]:.1f}")
            del st
        best = replace(best, pdl_chain=min(first, key=first.get))
    run.say(f"decode split sweep (us; {best}; splits:time):")
    shapes = ([(1, 64)] if run.smoke else
              [(b, c) for b in (1, 16) for c in (512, 4096, 16384)] + [(64, 4096)])
    sweep = {}
    for batch, ctx in shapes:
        st = decode_setup(run, batch, ctx)
        row = {}
        for splits in (1, 2, 4, 8, 16, 32, 64):
            if splits > 1 and ctx // splits < best.split_block_n:
                break
            row[splits] = _try_time(run, st, replace(best, num_splits=splits)) * 1e6
        heur = choose_num_splits(batch, HK, ctx, sm_count(run.dev), best)
        run.say(f"  {batch:3d}x{ctx:<6d} heuristic {heur:2d}: " +
                " ".join(f"{k}:{v:.1f}" for k, v in row.items()))
        sweep[f"{batch}x{ctx}"] = row
        del st
    run.record["decode_split_sweep"] = sweep
    return best


PREFILL_TUNE = [PrefillConfig(bm, bn, w, s) for bm, bn, w, s in
                [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3),
                 (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]]


def tune_prefill(run: Run, base: PrefillConfig) -> PrefillConfig:
    shapes = [(1, 40), (2, 16)] if run.smoke else [(1, 8192), (16, 1024)]
    setups = [prefill_setup(run, nseq, new, 0) for nseq, new in shapes]
    run.say("prefill tuning, prefix 0 (TFLOP/s at " + ", ".join(f"{a}x{b}" for a, b in shapes)
            + "):")
    best, best_t = base, float("inf")
    for cfg in PREFILL_TUNE[:2] if run.smoke else PREFILL_TUNE:
        try:
            ts = [time_prefill(run, st, cfg) for st in setups]
        except Exception as e:
            run.say(f"  {cfg}: {type(e).__name__}")
            continue
        run.say(f"  m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}: "
                + " ".join(f"{st[5] / t / 1e12:6.1f}" for st, t in zip(setups, ts, strict=False)))
        if ts[0] < best_t:  # the goal's shape decides
            best, best_t = cfg, ts[0]
    return best
