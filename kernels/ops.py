"""The dispatcher: one entry point per kernel, choosing Triton or the torch reference.

Triton runs for CUDA tensors, and for CPU tensors only when the process was started with
``TRITON_INTERPRET=1`` (Triton reads it when kernels are decorated, so it cannot be
switched later). Anything else takes the reference.
"""

from __future__ import annotations

import os

import torch

from kernels import reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_HAS_TRITON = _triton_available()


def use_triton(t: torch.Tensor) -> bool:
    return _HAS_TRITON and (t.is_cuda or _INTERPRET)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from kernels import triton_norm
        return triton_norm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        from kernels import triton_norm
        return triton_norm.fused_add_rms_norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """A projection. A single row (a decode step at batch 1) takes the Triton GEMV, which
    beat cuBLAS on every 8B-shaped weight on an H200; everything else is F.linear."""
    if use_triton(x) and x.dim() == 2:
        from kernels import triton_gemv
        if triton_gemv.prefers_gemv(x.shape[0], weight.shape[0], weight.shape[1]):
            return triton_gemv.linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from kernels import triton_activation
        return triton_activation.silu_and_mul(x)
    return reference.silu_and_mul(x)


def rotary_embedding_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    """RoPE on q and k in place, then K and V into the cache: one kernel on CUDA."""
    if use_triton(q):
        from kernels import triton_rope
        triton_rope.rotary_embedding_and_write_kv(q, k, v, positions, cos_sin_cache,
                                                  kv_cache, slot_mapping)
        return
    reference.rotary_embedding(q, k, positions, cos_sin_cache)
    reference.write_kv_cache(k, v, kv_cache, slot_mapping)


def paged_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    if use_triton(q):
        from kernels import triton_decode_attention
        return triton_decode_attention.paged_decode_attention(
            q, kv_cache, block_tables, context_lens, scale)
    return reference.paged_decode_attention(q, kv_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    if use_triton(q):
        from kernels import triton_prefill_attention
        return triton_prefill_attention.paged_prefill_attention(
            q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale)
    return reference.paged_prefill_attention(
        q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale)
