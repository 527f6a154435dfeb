"""The dispatcher: one entry point per kernel, choosing Triton or the CPU serving kernels.

Triton runs for CUDA tensors, and for CPU tensors only when the process was started with
``TRITON_INTERPRET=1`` (Triton reads it when kernels are decorated, so it cannot be
switched later). CPU tensors otherwise take the CPU serving kernels (kernels/cpu_*.py),
which a forward feeds with a per-step plan (``plan_cpu_step``); kernels.reference is what
both are tested against, and serves any other device.
"""

from __future__ import annotations

import os

import torch

from kernels import cpu_attention, cpu_elementwise, cpu_linear, cpu_native, reference
from kernels.cpu_step import CpuStepPlan, plan_step

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


def use_cpu_kernels(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not use_triton(t)


def plan_cpu_step(positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  kv_cache: torch.Tensor) -> CpuStepPlan | None:
    """What every layer of a CPU forward shares (RoPE tables, slots, attention gathers and
    masks); None where the CPU kernels do not serve (Triton does)."""
    if not use_cpu_kernels(kv_cache):
        return None
    return plan_step(positions, cos_sin_cache, slot_mapping, block_tables, context_lens,
                     cu_seqlens_q, kv_cache.shape[2], kv_cache.dtype,
                     cpu_native.serves(kv_cache))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf in each row's tokens whose bit is clear (a grammar's mask)."""
    if use_triton(logits):
        from kernels import triton_bitmask
        triton_bitmask.apply_token_bitmask(logits, bitmask)
    elif use_cpu_kernels(logits):
        cpu_elementwise.apply_token_bitmask(logits, bitmask)
    else:
        reference.apply_token_bitmask(logits, bitmask)


def sample_plain(logits: torch.Tensor, bitmask: torch.Tensor | None,
                 temperature: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Greedy or temperature-only rows drawn in two launches (Triton only: the caller
    checks ``use_triton``); [2, rows] int64, tokens and NaN flags (kernels.triton_sampler)."""
    from kernels import triton_sampler
    return triton_sampler.sample_plain(logits, bitmask, temperature, uniform)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from kernels import triton_norm
        return triton_norm.rms_norm(x, weight, eps)
    if use_cpu_kernels(x):
        return cpu_elementwise.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        from kernels import triton_norm
        return triton_norm.fused_add_rms_norm(x, residual, weight, eps)
    if use_cpu_kernels(x):
        return cpu_elementwise.fused_add_rms_norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


GEMV_KEEP_BYTES = 4 << 20


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A weight packed once for the CPU projection (bf16), or None where nothing gains."""
    return cpu_linear.pack(weight) if use_cpu_kernels(weight) else None


def keeps_row_major(weight: torch.Tensor) -> bool:
    """Whether a packed weight keeps its row-major copy too, for cpu_gemv.c's decodes of
    one or two rows: where that kernel runs, for weights of at most GEMV_KEEP_BYTES (there
    oneDNN's fixed cost per call, 11-45 us on this project's CI CPU, is what a small
    model's decode step spends; a larger weight's read outweighs it, and a second copy of
    it would cost real memory)."""
    return weight.numel() * weight.element_size() <= GEMV_KEEP_BYTES \
        and weight.dtype is torch.bfloat16 and weight.dim() == 2 \
        and weight.shape[1] % 32 == 0 and cpu_native.gemv_library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """A projection. A single row (a decode step at batch 1) takes the Triton GEMV, which
    beat cuBLAS on every 8B-shaped weight on an H200; on CPU a weight packed by
    pack_linear_weight is used as is (``weight`` may then be empty); everything else is
    F.linear."""
    if packed is not None:
        if weight.numel() and cpu_native.gemv_fits(x, weight, bias):
            return cpu_native.gemv(x, weight, bias)  # a decode of 1-2 rows: see cpu_gemv.c
        return cpu_linear.linear(x, packed, bias)
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
    plan: CpuStepPlan | None = None,
) -> None:
    """RoPE on q and k in place, then K and V into the cache: one kernel on CUDA; on CPU
    the step's plan holds the RoPE tables and slots."""
    if plan is not None:
        cpu_elementwise.rotary_embedding_and_write_kv(q, k, v, kv_cache, plan)
        return
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
    if use_cpu_kernels(q):
        return cpu_attention.paged_decode_attention(q, kv_cache, block_tables, context_lens,
                                                    scale)
    return reference.paged_decode_attention(q, kv_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    if use_triton(q):
        from kernels import triton_prefill_attention
        return triton_prefill_attention.paged_prefill_attention(
            q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len)
    if use_cpu_kernels(q):
        return cpu_attention.paged_prefill_attention(q, kv_cache, block_tables, cu_seqlens_q,
                                                     context_lens, scale)
    return reference.paged_prefill_attention(
        q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale)


def paged_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_cache: torch.Tensor, plan: CpuStepPlan, scale: float
                        ) -> torch.Tensor:
    """A CPU step's attention, decodes and prefills together (k, v: the step's own K/V
    after RoPE, already in the cache)."""
    return cpu_attention.paged_attention(q, k, v, kv_cache, plan, scale)
