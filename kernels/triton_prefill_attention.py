"""Triton paged prefill attention (twin of reference.paged_prefill_attention).

Causal attention for a ragged batch of new tokens (offsets in ``cu_seqlens_q``). The paged
cache already holds each sequence's cached prefix *and* the new tokens' K/V, so every key
is gathered through the block table: this one kernel serves plain prefill (prefix 0),
chunked prefill and prefix-cache hits alike.

A program owns ``block_m`` queries of one sequence and one query head. Its key loop runs
in two parts: the keys every query of the tile may see (no mask at all), then the few
tiles across the causal diagonal. Heads are the fastest grid axis so the query heads
sharing a KV head run side by side and reuse its K/V from L2; query tiles run last-first
because later tiles see more keys and should start early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """Tile shape; the default won the sweep at 1 x 8192 on an H200 (bench/GPU_NOTES.md)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_base, stride_kv, bt_row, stride_blk, stride_tok,
    lo, hi, pos, ctx, qk_scale,
    d, dmask,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for n in range(lo, hi, BLOCK_N):
        t = n + offs_n
        if MASKED:
            tmask = t < ctx
            page = tl.load(bt_row + t // PAGE, mask=tmask, other=0).to(tl.int64)
            if EVEN_D:
                kv_mask = tmask[:, None]
            else:
                kv_mask = tmask[:, None] & dmask[None, :]
        else:
            page = tl.load(bt_row + t // PAGE).to(tl.int64)
            kv_mask = dmask[None, :]  # unused when EVEN_D: those loads take no mask
        off = page * stride_blk + (t % PAGE) * stride_tok
        ptrs = k_base + off[:, None] + d[None, :]
        if MASKED or not EVEN_D:
            k = tl.load(ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            visible = (t[None, :] <= pos[:, None]) & (t[None, :] < ctx)
            s = tl.where(visible, s, float("-inf"))
        # Scores stay unscaled; the scale folds into one FMA inside the exp2 argument.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED or not EVEN_D:
            v = tl.load(ptrs + stride_kv, mask=kv_mask, other=0.0)
        else:
            v = tl.load(ptrs + stride_kv)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kv, stride_blk, stride_tok, stride_kh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    h = tl.program_id(0)
    m_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - q_len

    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    tok = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    pos = prefix + rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = kv_ptr + (h // GROUP) * stride_kh
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # Keys below prefix + m0 + 1 are visible to every query of the tile.
    full_end = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(ctx, prefix + m0 + BLOCK_M)
    acc, m_i, l_i = _attend_tile(
        acc, m_i, l_i, q, k_base, stride_kv, bt_row, stride_blk, stride_tok,
        0, full_end, pos, ctx, qk_scale, d, dmask,
        False, BLOCK_N, PAGE, UPCAST, PRECISION, EVEN_D)
    acc, m_i, l_i = _attend_tile(
        acc, m_i, l_i, q, k_base, stride_kv, bt_row, stride_blk, stride_tok,
        full_end, hi, pos, ctx, qk_scale, d, dmask,
        True, BLOCK_N, PAGE, UPCAST, PRECISION, EVEN_D)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_attention_out(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
    out: torch.Tensor, cfg: PrefillConfig = PrefillConfig(), max_q_len: int | None = None,
) -> torch.Tensor:
    """paged_prefill_attention writing into ``out`` [T, Hq, D] with an explicit config.
    ``max_q_len`` (the longest new-token run) saves a host sync when the caller knows it."""
    total, num_heads, head_dim = q.shape
    batch = context_lens.shape[0]
    if total == 0 or batch == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert kv_cache.stride(-1) == 1 and out.stride(-1) == 1
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if max_q_len <= 0:
        return out
    num_kv_heads = kv_cache.shape[3]
    upcast = q.device.type != "cuda"  # the interpreter's dot on bf16 is wrong: use fp32
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    grid = (num_heads, triton.cdiv(max_q_len, cfg.block_m), batch)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), PAGE=kv_cache.shape[2],
        UPCAST=upcast, PRECISION=precision, EVEN_D=triton.next_power_of_2(head_dim) == head_dim,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    return prefill_attention_out(q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                 torch.empty_like(q), max_q_len=max_q_len)
