"""Triton KV-cache write (twin of reference.write_kv_cache): scatter each new token's K and V
into its slot of the paged cache ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.

One program per token copies all of its heads; a negative slot (a padding token, as in a
CUDA-graph batch padded to a captured size) writes nothing. No host sync, so the launch can
be captured in a graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cblk, stride_ctok, stride_ch,
    n_heads, head_dim,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < n_heads) & (cols[None, :] < head_dim)
        dst = (cache_ptr + (slot // PAGE) * stride_cblk + (slot % PAGE) * stride_ctok
               + heads[:, None] * stride_ch + cols[None, :])
        k = tl.load(k_ptr + tok * stride_kt + heads[:, None] * stride_kh + cols[None, :],
                    mask=mask)
        v = tl.load(v_ptr + tok * stride_vt + heads[:, None] * stride_vh + cols[None, :],
                    mask=mask)
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value: [T, Hk, D] (last dim contiguous); slot = block_id * block_size + offset."""
    if key.shape[0] == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    assert kv_cache.stride(-1) == 1, "kv_cache's head_dim must be contiguous"
    n_heads, head_dim = key.shape[1], key.shape[2]
    _write_kv_kernel[(key.shape[0],)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        n_heads, head_dim,
        PAGE=kv_cache.shape[2], BLOCK_H=triton.next_power_of_2(n_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
