"""Triton rotate-half RoPE applied in place to q and k (twin of reference.rotary_embedding).

One program per token rotates all of that token's q and k heads, so the cos/sin row of its
position is read once. The cache row holds cos in its first D/2 columns and sin in its last
D/2; any frequency scaling (llama3) is already baked into it by whoever built the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(base, stride_h, n_heads, cos, sin,
            BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    lo_ptr = base + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(lo_ptr, mask=mask, other=0.0)
    x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(lo_ptr, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(lo_ptr + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    n_q_heads, n_k_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    row = cache_ptr + pos * stride_c
    # The reference casts cos/sin to q's dtype before multiplying; round the same way.
    cos = tl.load(row + cols, mask=cmask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = tl.load(row + HALF + cols, mask=cmask, other=0.0)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate(q_ptr + tok * stride_qt, stride_qh, n_q_heads, cos[None, :], sin[None, :],
            BLOCK_HQ, BLOCK_HALF, HALF)
    _rotate(k_ptr + tok * stride_kt, stride_kh, n_k_heads, cos[None, :], sin[None, :],
            BLOCK_HK, BLOCK_HALF, HALF)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D] (views into a fused qkv are fine as long as the last
    dim is contiguous); rotated in place and returned."""
    if q.shape[0] == 0:
        return q, k
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        # Rare: rotate contiguous copies, then write back to keep the in-place contract.
        qc, kc = q.contiguous(), k.contiguous()
        rotary_embedding(qc, kc, positions, cos_sin_cache)
        q.copy_(qc)
        k.copy_(kc)
        return q, k
    half = cos_sin_cache.shape[-1] // 2
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rope_kernel[(q.shape[0],)](
        q, k, positions, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cache.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
    )
    return q, k
