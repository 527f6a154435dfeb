"""GPU kernel benchmark: checks every Triton kernel against its reference, then times them.

Run on the GPU machine through bench/gpu_run.sh (one call checks and times everything):

    PYTHONPATH=. python3 bench/gpu_kernels.py --out "$OUT" [--tune]

Order: (1) each kernel vs kernels.reference on random bf16 inputs at serving shapes
(relative error < 1e-2); (2) the ceilings of this card, measured in the same run: a
device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul; (3) optional tuning
sweeps (--tune); (4) paged decode attention at batch {1,16,64,256} x context
{512,4096,16384} beside SDPA (and compiled flex_attention) on the same KV made contiguous;
(5) paged prefill attention in TFLOP/s. Times are medians of CUDA-event-timed replays of a
CUDA graph holding many calls, which takes launch gaps out; inputs rotate among enough
copies to exceed L2 where one copy would fit in it. ``--smoke`` runs tiny shapes on the CPU
through Triton's interpreter, to catch script errors before spending device time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import reference as ref  # noqa: E402
from kernels import (triton_activation, triton_kv_write, triton_norm,  # noqa: E402
                     triton_rope)
from kernels.triton_decode_attention import (DecodeConfig, choose_num_splits,  # noqa: E402
                                             decode_attention_out, sm_count)
from kernels.triton_prefill_attention import (PrefillConfig,  # noqa: E402
                                              prefill_attention_out)

HQ, HK, HD, PAGE = 32, 8, 128, 16
BF16 = torch.bfloat16


@dataclass(slots=True)
class Run:
    dev: torch.device
    smoke: bool
    l2_bytes: int
    lines: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - want.double()).norm() / want.double().norm())


def time_calls(run: Run, calls: list[Callable[[], object]], graph: bool = True) -> float:
    """Median seconds per call. ``calls`` are rotated through (one per input set)."""
    for c in calls:
        c()
    if run.smoke:
        t0 = time.perf_counter()
        calls[0]()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    n = max(16, len(calls))
    if graph:
        try:
            return _time_body(_capture(calls, n), n)
        except RuntimeError as e:  # a call that cannot be captured: time plain launches
            print(f"  (graph capture failed, timing launches: {str(e)[:120]})")

    def body() -> None:
        for i in range(n):
            calls[i % len(calls)]()
    return _time_body(body, n)


def _capture(calls: list[Callable[[], object]], n: int) -> Callable[[], object]:
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # warm the allocator on the capture stream
            c()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for i in range(n):
            calls[i % len(calls)]()
    torch.cuda.synchronize()
    return g.replay


def _time_body(body: Callable[[], object], n: int) -> float:
    body()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    body()
    end.record()
    end.synchronize()
    reps = int(min(50, max(5, 0.4 / max(start.elapsed_time(end) / 1e3, 1e-6))))
    samples = []
    for _ in range(reps):
        start.record()
        body()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(samples)


def n_sets_for(run: Run, nbytes: int, cap: int = 64) -> int:
    """How many input copies to rotate so that repeated calls do not run out of L2."""
    return max(1, min(cap, math.ceil(4 * run.l2_bytes / max(nbytes, 1))))


# ----------------------------------------------------------------------------- checks
def check(run: Run, name: str, err: float, tol: float = 1e-2) -> None:
    ok = err < tol
    run.say(f"  check {name:<44} rel err {err:.2e}  {'ok' if ok else 'FAIL'}")
    run.record.setdefault("checks", {})[name] = err
    if not ok:
        run.failures.append(name)


def paged_cache(num_blocks: int, dev: torch.device, dtype=BF16) -> torch.Tensor:
    return torch.randn((2, num_blocks, PAGE, HK, HD), dtype=dtype, device=dev)


def tables_for(lens: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    need = [math.ceil(n / PAGE) for n in lens]
    total = sum(need)
    perm = torch.randperm(total, device=dev, dtype=torch.int64).int()
    width = max(need)
    tables = torch.zeros((len(lens), width), dtype=torch.int32, device=dev)
    used = 0
    for i, k in enumerate(need):
        tables[i, :k] = perm[used:used + k]
        used += k
    return tables, torch.tensor(lens, dtype=torch.int32, device=dev), total


def run_checks(run: Run, dcfg: DecodeConfig, pcfg: PrefillConfig) -> None:
    dev, s = run.dev, run.smoke
    run.say("checks (bf16, random inputs, vs kernels.reference):")
    hidden, inter, tok = (64, 96, 5) if s else (4096, 14336, 64)
    x = torch.randn(tok, hidden, dtype=BF16, device=dev)
    r = torch.randn(tok, hidden, dtype=BF16, device=dev)
    w = torch.randn(hidden, dtype=BF16, device=dev)
    check(run, "rms_norm", rel_err(triton_norm.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)))
    got, want = triton_norm.fused_add_rms_norm(x, r, w, 1e-5), ref.fused_add_rms_norm(x, r, w,
                                                                                      1e-5)
    check(run, "fused_add_rms_norm (normed)", rel_err(got[0], want[0]))
    check(run, "fused_add_rms_norm (sum)", rel_err(got[1], want[1]))
    g = torch.randn(tok, 2 * inter, dtype=BF16, device=dev)
    check(run, "silu_and_mul", rel_err(triton_activation.silu_and_mul(g), ref.silu_and_mul(g)))
    t = 7 if s else 256
    hq, hk, hd = (4, 2, 32) if s else (HQ, HK, HD)
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    ang = torch.arange(8192, device=dev, dtype=torch.float32)[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1)
    q = torch.randn(t, hq, hd, dtype=BF16, device=dev)
    k = torch.randn(t, hk, hd, dtype=BF16, device=dev)
    pos = torch.randint(0, 8192, (t,), device=dev)
    rq, rk = ref.rotary_embedding(q.clone(), k.clone(), pos, cache)
    triton_rope.rotary_embedding(q, k, pos, cache)
    check(run, "rotary_embedding (q)", rel_err(q, rq))
    check(run, "rotary_embedding (k)", rel_err(k, rk))
    kvc = torch.randn((2, 64, PAGE, hk, hd), dtype=BF16, device=dev)
    want_c = kvc.clone()
    slots = torch.randperm(64 * PAGE, device=dev)[:t].int()
    slots[::5] = -1
    ref.write_kv_cache(k, q[:, :hk], want_c, slots)
    triton_kv_write.write_kv_cache(k, q[:, :hk], kvc, slots)
    check(run, "write_kv_cache (exact)", 0.0 if torch.equal(kvc, want_c) else 1.0)
    q2, k2, v2 = (torch.randn(t, h, hd, dtype=BF16, device=dev) for h in (hq, hk, hk))
    rq, rk = ref.rotary_embedding(q2.clone(), k2.clone(), pos, cache)
    ref.write_kv_cache(rk, v2, want_c, slots)
    triton_rope.rotary_embedding_and_write_kv(q2, k2, v2, pos, cache, kvc, slots)
    check(run, "rope + write_kv_cache fused (q)", rel_err(q2, rq))
    check(run, "rope + write_kv_cache fused (cache)", rel_err(kvc, want_c))

    hq, hk, hd = (4, 2, 32) if s else (HQ, HK, HD)
    cases = ([("ragged b3", [40, 3, 17])] if s else
             [("b16 ragged<=4096 (split)", torch.randint(1, 4097, (16,)).tolist()),
              ("b64 ragged<=4096", torch.randint(1, 4097, (64,)).tolist()),
              ("b2 [16384, 9999]", [16384, 9999]), ("b1 4096 (split)", [4096])])
    for label, lens in cases:
        tables, ctx, nb = tables_for(lens, dev)
        kv = torch.randn((2, nb, PAGE, hk, hd), dtype=BF16, device=dev)
        q = torch.randn(len(lens), hq, hd, dtype=BF16, device=dev)
        out = torch.full_like(q, float("nan"))
        decode_attention_out(q, kv, tables, ctx, hd ** -0.5, out, dcfg)
        want = ref.paged_decode_attention(q, kv, tables, ctx, hd ** -0.5)
        check(run, f"decode {label}", rel_err(out, want))
    plan = [(30, 20), (70, 0)] if s else [(1000, 3000), (2048, 0), (1, 500), (333, 16)]
    lens = [n + p for n, p in plan]
    tables, ctx, nb = tables_for(lens, dev)
    kv = torch.randn((2, nb, PAGE, hk, hd), dtype=BF16, device=dev)
    cu = torch.tensor([0] + list(torch.tensor([n for n, _ in plan]).cumsum(0).tolist()),
                      dtype=torch.int32, device=dev)
    q = torch.randn(int(cu[-1]), hq, hd, dtype=BF16, device=dev)
    out = torch.full_like(q, float("nan"))
    prefill_attention_out(q, kv, tables, cu, ctx, hd ** -0.5, out, pcfg)
    want = ref.paged_prefill_attention(q, kv, tables, cu, ctx, hd ** -0.5)
    check(run, "prefill ragged with prefixes", rel_err(out, want))


# -------------------------------------------------------------------------- baselines
def baselines(run: Run) -> tuple[float, float]:
    """The card's two ceilings, measured several ways; the highest of each is the baseline
    (the stricter yardstick for our kernels)."""
    n = 1 << 20 if run.smoke else 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, dtype=BF16, device=run.dev)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    copies = {
        "memcpy, graph": moved / time_calls(run, [lambda: dst.copy_(src)]),
        "memcpy, launches": moved / time_calls(run, [lambda: dst.copy_(src)], graph=False),
        "elementwise kernel": moved / time_calls(run, [lambda: torch.mul(src, 1, out=dst)]),
    }
    del src, dst
    m = 256 if run.smoke else 8192
    a = torch.randn(m, m, dtype=BF16, device=run.dev)
    b = torch.randn(m, m, dtype=BF16, device=run.dev)
    flop = 2 * m ** 3
    mms = {"sustained (graph, median)": flop / time_calls(run, [lambda: a @ b])}
    if not run.smoke:  # a short burst, as KINDS.md measured: 10 after 3 warm-ups, mean
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        mms["burst (10 launches, mean)"] = flop / (start.elapsed_time(end) / 1e3 / 10)
    one = torch.zeros(1, device=run.dev)
    floor = time_calls(run, [lambda: one.add_(1)])
    for k, v in copies.items():
        run.say(f"device-to-device copy, {k:<20}: {v / 1e9:6.0f} GB/s (read+write)")
    for k, v in mms.items():
        run.say(f"bf16 matmul {m}^3, {k:<26}: {v / 1e12:6.1f} TFLOP/s")
    run.say(f"one tiny kernel in a CUDA graph: {floor * 1e6:.2f} us (the per-launch floor)")
    copy_bw, mm = max(copies.values()), max(mms.values())
    run.record.update(copy_GBps=copy_bw / 1e9, matmul_TFLOPs=mm / 1e12, launch_floor_us=floor * 1e6,
                      copies={k: v / 1e9 for k, v in copies.items()},
                      matmuls={k: v / 1e12 for k, v in mms.items()})
    return copy_bw, mm


# ----------------------------------------------------------------------------- decode
@dataclass(slots=True)
class DecodeSetup:
    kv: torch.Tensor
    tables: list[torch.Tensor]
    qs: list[torch.Tensor]
    ctx: torch.Tensor
    kv_bytes: int


def decode_setup(run: Run, batch: int, ctx: int) -> DecodeSetup:
    blocks = math.ceil(ctx / PAGE)
    kv_bytes = batch * ctx * HK * HD * 2 * 2
    sets = n_sets_for(run, kv_bytes)
    kv = paged_cache(sets * batch * blocks, run.dev)
    perm = torch.randperm(sets * batch * blocks, device=run.dev).int().view(sets, batch, blocks)
    qs = [torch.randn(batch, HQ, HD, dtype=BF16, device=run.dev) for _ in range(sets)]
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=run.dev)
    return DecodeSetup(kv, [perm[i].contiguous() for i in range(sets)], qs, lens, kv_bytes)


def time_decode(run: Run, st: DecodeSetup, cfg: DecodeConfig) -> float:
    outs = [torch.empty_like(q) for q in st.qs]
    calls = [lambda i=i: decode_attention_out(st.qs[i], st.kv, st.tables[i], st.ctx,
                                              HD ** -0.5, outs[i], cfg)
             for i in range(len(st.qs))]
    return time_calls(run, calls)


def contiguous_kv(st: DecodeSetup, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, blocks = st.tables[i].shape
    idx = st.tables[i].long().flatten()
    k = st.kv[0].index_select(0, idx).view(batch, blocks * PAGE, HK, HD)
    k = k.transpose(1, 2).contiguous()
    v = st.kv[1].index_select(0, idx).view(batch, blocks * PAGE, HK, HD)
    return k, v.transpose(1, 2).contiguous()


def time_torch_decode(run: Run, st: DecodeSetup, flex: Callable | None) -> tuple[float, float]:
    """SDPA (and flex) on the same KV made contiguous [B, Hk, L, D]. SDPA gets the query
    group folded into the query length ([B, Hk, G, D]), so it reads each KV head once."""
    pairs = [contiguous_kv(st, i) for i in range(len(st.qs))]
    st.kv = torch.empty(0)  # the paged copy is no longer needed: free it for the biggest shape
    batch = st.qs[0].shape[0]
    q4 = [q.view(batch, HK, HQ // HK, HD) for q in st.qs]
    sdpa = [lambda i=i: F.scaled_dot_product_attention(q4[i], *pairs[i], scale=HD ** -0.5)
            for i in range(len(pairs))]
    t_sdpa = time_calls(run, sdpa)
    t_flex = float("nan")
    if flex is not None:
        q1 = [q.view(batch, HQ, 1, HD) for q in st.qs]
        try:
            fl = [lambda i=i: flex(q1[i], *pairs[i], scale=HD ** -0.5, enable_gqa=True)
                  for i in range(len(pairs))]
            t_flex = time_calls(run, fl, graph=False)
        except Exception as e:  # noqa: BLE001 -- report and carry on
            run.say(f"  flex_attention failed: {type(e).__name__}: {str(e)[:200]}")
    return t_sdpa, t_flex


DECODE_TUNE = [DecodeConfig(block_n=bn, num_warps=w, num_stages=st)
               for bn, w, st in [(64, 4, 3), (64, 4, 2), (128, 8, 3), (32, 4, 4)]]
SPLIT_TUNE = [(64, 4, 1), (64, 4, 2), (128, 4, 1), (32, 4, 1), (64, 8, 1)]


def _try_time(run: Run, st: DecodeSetup, cfg: DecodeConfig) -> float:
    try:
        return time_decode(run, st, cfg)
    except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory
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


def size_matched_copy(run: Run, nbytes: int) -> str:
    """Copy bandwidth (read+write) of a tensor the size of the KV read: what a copy reaches
    at this size, launch and ramp-up included. Skipped above 2 GB (it is the asymptote)."""
    if nbytes > 2e9:
        return "-"
    sets = n_sets_for(run, 2 * nbytes)
    srcs = [torch.randn(nbytes // 2, dtype=BF16, device=run.dev) for _ in range(sets)]
    dsts = [torch.empty_like(x) for x in srcs]
    t = time_calls(run, [lambda i=i: torch.mul(srcs[i], 1, out=dsts[i]) for i in range(sets)])
    return f"{2 * nbytes / t / 1e9:.0f}"


def decode_table(run: Run, cfg: DecodeConfig, copy_bw: float, with_flex: bool) -> None:
    flex = None
    if with_flex and not run.smoke:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            run.say(f"flex_attention unavailable: {e}")
    batches, ctxs = ((1, 3), (32, 80)) if run.smoke else ((1, 16, 64, 256), (512, 4096, 16384))
    head = ("| batch x ctx | splits | Triton us | Triton GB/s | % copy | SDPA us | SDPA % copy "
            "| flex % copy | same-size copy GB/s |")
    rows = [head, "|" + "---|" * 9]
    run.say(rows[0])
    run.say(rows[1])
    run.record["decode"] = []
    for batch in batches:
        for ctx in ctxs:
            st = decode_setup(run, batch, ctx)
            splits = choose_num_splits(batch, HK, ctx, sm_count(run.dev), cfg)
            t = time_decode(run, st, cfg)
            use_flex = flex if (batch, ctx) in ((16, 4096), (64, 4096)) else None
            t_sdpa, t_flex = time_torch_decode(run, st, use_flex)
            gbps = st.kv_bytes / t / 1e9
            pct = 100 * st.kv_bytes / t / copy_bw
            sd = 100 * st.kv_bytes / t_sdpa / copy_bw
            fx = "-" if math.isnan(t_flex) else f"{100 * st.kv_bytes / t_flex / copy_bw:.0f}%"
            small = size_matched_copy(run, st.kv_bytes)
            rows.append(f"| {batch} x {ctx} | {splits} | {t * 1e6:.1f} | {gbps:.0f} | "
                        f"{pct:.0f}% | {t_sdpa * 1e6:.1f} | {sd:.0f}% | {fx} | {small} |")
            run.say(rows[-1])
            run.record["decode"].append(dict(batch=batch, ctx=ctx, splits=splits, us=t * 1e6,
                                             GBps=gbps, pct_copy=pct, sdpa_us=t_sdpa * 1e6,
                                             flex_us=t_flex * 1e6))
            del st
            if not run.smoke:
                torch.cuda.empty_cache()
    run.record["decode_table"] = rows


# ---------------------------------------------------------------------------- prefill
def prefill_setup(run: Run, nseq: int, new: int, prefix: int):
    lens = [prefix + new] * nseq
    tables, ctx, nb = tables_for(lens, run.dev)
    kv = paged_cache(nb, run.dev)
    cu = torch.arange(0, nseq + 1, dtype=torch.int32, device=run.dev) * new
    q = torch.randn(nseq * new, HQ, HD, dtype=BF16, device=run.dev)
    # Causal FLOPs actually needed: query i of a sequence sees prefix + i + 1 keys.
    flops = nseq * HQ * 4 * HD * (new * prefix + new * (new + 1) / 2)
    return q, kv, tables, cu, ctx, flops


def time_prefill(run: Run, setup, cfg: PrefillConfig) -> float:
    q, kv, tables, cu, ctx, _ = setup
    out = torch.empty_like(q)
    new = int(q.shape[0] // ctx.shape[0])
    return time_calls(run, [lambda: prefill_attention_out(q, kv, tables, cu, ctx, HD ** -0.5,
                                                          out, cfg, max_q_len=new)])


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
        except Exception as e:  # noqa: BLE001
            run.say(f"  {cfg}: {type(e).__name__}")
            continue
        run.say(f"  m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}: "
                + " ".join(f"{st[5] / t / 1e12:6.1f}" for st, t in zip(setups, ts)))
        if ts[0] < best_t:  # the goal's shape decides
            best, best_t = cfg, ts[0]
    return best


def prefill_table(run: Run, cfg: PrefillConfig, mm: float) -> None:
    shapes = ([(1, 40, 0), (2, 16, 20)] if run.smoke else
              [(1, 8192, 0), (1, 8192, 4096), (16, 1024, 0), (16, 1024, 4096)])
    rows = ["| seqs x new tokens | prefix | Triton ms | TFLOP/s | % matmul | SDPA % matmul |",
            "|---|---|---|---|---|---|"]
    run.say(rows[0])
    run.say(rows[1])
    run.record["prefill"] = []
    for nseq, new, prefix in shapes:
        setup = prefill_setup(run, nseq, new, prefix)
        t = time_prefill(run, setup, cfg)
        tf = setup[5] / t
        sd = "-"
        if prefix == 0:  # SDPA's causal mask is top-left aligned: only prefix 0 compares
            qs = setup[0].view(nseq, new, HQ, HD).transpose(1, 2)
            ks = torch.randn(nseq, HK, new, HD, dtype=BF16, device=run.dev)
            vs = torch.randn_like(ks)
            try:
                t_s = time_calls(run, [lambda: F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=HD ** -0.5, enable_gqa=True)])
                sd = f"{100 * setup[5] / t_s / mm:.0f}%"
            except Exception as e:  # noqa: BLE001
                run.say(f"  SDPA prefill failed: {type(e).__name__}: {str(e)[:200]}")
        rows.append(f"| {nseq} x {new} | {prefix} | {t * 1e3:.2f} | {tf / 1e12:.1f} | "
                    f"{100 * tf / mm:.0f}% | {sd} |")
        run.say(rows[-1])
        run.record["prefill"].append(dict(nseq=nseq, new=new, prefix=prefix, ms=t * 1e3,
                                          TFLOPs=tf / 1e12, pct_matmul=100 * tf / mm))
    run.record["prefill_table"] = rows


def guarded(run: Run, what: str, fn: Callable[[], object]) -> object:
    """Run one section; a crash is reported and counted, and the later sections still run
    (a device call is too scarce to lose to one bad section)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        run.say(f"{what} CRASHED:\n{traceback.format_exc()[-2000:]}")
        run.failures.append(what)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tune", action="store_true", help="sweep launch configs first")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    if args.smoke:
        name, l2 = "cpu (interpreter smoke)", 1 << 16
    else:
        props = torch.cuda.get_device_properties(dev)
        name, l2 = props.name, int(getattr(props, "L2_cache_size", 50 << 20))
    run = Run(dev, args.smoke, l2)
    import triton
    run.say(f"device {name}; SMs {sm_count(dev)}; L2 {l2 >> 20} MiB; torch {torch.__version__};"
            f" triton {triton.__version__}")
    run.record["device"] = name
    dcfg, pcfg = DecodeConfig(), PrefillConfig()
    t0 = time.time()
    guarded(run, "checks", lambda: run_checks(run, dcfg, pcfg))
    copy_bw, mm = baselines(run)
    if args.tune:
        dcfg = guarded(run, "decode tuning", lambda: tune_decode(run, dcfg)) or dcfg
        pcfg = guarded(run, "prefill tuning", lambda: tune_prefill(run, pcfg)) or pcfg
    run.say(f"decode config {dcfg}")
    run.say(f"prefill config {pcfg}")
    run.record["decode_config"], run.record["prefill_config"] = asdict(dcfg), asdict(pcfg)
    run.say(f"\nDecode attention (Hq {HQ}, Hk {HK}, D {HD}, block {PAGE}, bf16); "
            f"copy {copy_bw / 1e9:.0f} GB/s")
    guarded(run, "decode table", lambda: decode_table(run, dcfg, copy_bw, not args.no_flex))
    run.say(f"\nPrefill attention (causal, Hq {HQ}, Hk {HK}, D {HD}, block {PAGE}, bf16); "
            f"matmul {mm / 1e12:.0f} TFLOP/s")
    guarded(run, "prefill table", lambda: prefill_table(run, pcfg, mm))
    run.say(f"\nchecks failed: {run.failures or 'none'}; wall {time.time() - t0:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write("\n".join(run.lines) + "\n")
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(run.record, f, indent=1, default=str)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
