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
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from gpu_attention_cases import (
    HD,
    HK,
    HQ,
    PAGE,
    DecodeSetup,
    contiguous_kv,
    decode_setup,
    prefill_setup,
    tables_for,
    time_decode,
    time_prefill,
)
from gpu_timing import BF16, Run, baselines, check, guarded, rel_err, size_matched_copy, time_calls
from gpu_tune import tune_decode, tune_prefill

from kernels import reference as ref
from kernels import triton_activation, triton_kv_write, triton_norm, triton_rope
from kernels.triton_decode_attention import (
    DecodeConfig,
    choose_num_splits,
    decode_attention_out,
    sm_count,
)
from kernels.triton_prefill_attention import PrefillConfig, prefill_attention_out


# ----------------------------------------------------------------------------- checks
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
    cu = torch.tensor([0, *list(torch.tensor([n for n, _ in plan]).cumsum(0).tolist())],
                      dtype=torch.int32, device=dev)
    q = torch.randn(int(cu[-1]), hq, hd, dtype=BF16, device=dev)
    out = torch.full_like(q, float("nan"))
    prefill_attention_out(q, kv, tables, cu, ctx, hd ** -0.5, out, pcfg)
    want = ref.paged_prefill_attention(q, kv, tables, cu, ctx, hd ** -0.5)
    check(run, "prefill ragged with prefixes", rel_err(out, want))


# ----------------------------------------------------------------------------- decode
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
        except Exception as e:
            run.say(f"  flex_attention failed: {type(e).__name__}: {str(e)[:200]}")
    return t_sdpa, t_flex


def decode_table(run: Run, cfg: DecodeConfig, copy_bw: float, with_flex: bool) -> None:
    flex = None
    if with_flex and not run.smoke:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:
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
                t_s = time_calls(run, [lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=HD ** -0.5, enable_gqa=True)])
                sd = f"{100 * setup[5] / t_s / mm:.0f}%"
            except Exception as e:
                run.say(f"  SDPA prefill failed: {type(e).__name__}: {str(e)[:200]}")
        rows.append(f"| {nseq} x {new} | {prefix} | {t * 1e3:.2f} | {tf / 1e12:.1f} | "
                    f"{100 * tf / mm:.0f}% | {sd} |")
        run.say(rows[-1])
        run.record["prefill"].append(dict(nseq=nseq, new=new, prefix=prefix, ms=t * 1e3,
                                          TFLOPs=tf / 1e12, pct_matmul=100 * tf / mm))
    run.record["prefill_table"] = rows


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
