"""The attention shapes the GPU benchmarks time: a Llama-3-8B-like head layout (32 query,
8 KV heads of 128, block 16), paged caches with shuffled block tables, and one decode or
prefill setup per shape with enough input copies to defeat L2."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from gpu_timing import BF16, Run, n_sets_for, time_calls

from kernels.triton_decode_attention import DecodeConfig, decode_attention_out
from kernels.triton_prefill_attention import PrefillConfig, prefill_attention_out

HQ, HK, HD, PAGE = 32, 8, 128, 16


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
