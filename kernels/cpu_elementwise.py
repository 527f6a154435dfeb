"""RMSNorm, RoPE with the KV write, and the grammar mask, for CPU serving: fewer operator
calls per layer.

Each first tries its C form (kernels/cpu_elementwise.c through cpu_native): one call where
the torch form below is five to ten operators, and at a small model's decode step every
operator call costs a few microseconds whatever its size (a step at batch 1 spent 80 us in
the norms and 92 us in RoPE + KV write out of 717 us; bench/RESULTS.md, issue 15). The torch
form serves where the C one cannot be built or does not apply.

Numerics follow kernels.reference (HF transformers' Llama). The norm is computed in
float32 and rounded to the activations' dtype before the weight multiplies it, as HF
rounds; both forms sum the squares in another order than HF's ``mean(x^2)`` (the torch
form through one fused layer-norm call, see rms_norm), so a result may differ from HF's in
its last bit. RoPE multiplies in the activations' dtype with cos/sin rounded to it, exactly
as HF does, in both forms.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from kernels import cpu_native
from kernels.cpu_step import CpuStepPlan


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` (float32 inside) times the weight.

    Layer norm of ``[x, -x]`` is exactly that on its first half (the mean is 0 and the
    variance is mean(x^2)), and aten's layer norm is one fused kernel on CPU, where its
    RMS form (F.rms_norm) runs as ten small operators: in a decode step on the CI CPU the
    fused form took a tenth of the time (bench/RESULTS.md, issue 15).
    """
    native = cpu_native.add_rms_norm(x, None, weight, eps)
    if native is not None:
        return native[0]
    h = x.shape[-1]
    return F.layer_norm(torch.cat((x, x.neg()), dim=-1), (2 * h,), eps=eps)[..., :h] * weight


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    native = cpu_native.add_rms_norm(x, residual, weight, eps)
    if native is not None:
        return native
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """[T, Ha + Hb, D] viewing a [T, Ha, D] and b [T, Hb, D] together, when b's heads
    follow a's in memory with the same strides (q, k, v are views of one qkv row)."""
    if a.dtype != b.dtype or a.stride() != b.stride() or a.stride(2) != 1 \
            or a.stride(1) != a.shape[2] or a.shape[2] != b.shape[2]:
        return None
    if b.data_ptr() != a.data_ptr() + a.shape[1] * a.stride(1) * a.element_size():
        return None
    t, heads, d = a.shape[0], a.shape[1] + b.shape[1], a.shape[2]
    return a.as_strided((t, heads, d), (a.stride(0), d, 1))


def _rope_(x: torch.Tensor, plan: CpuStepPlan) -> None:
    """x [T, H, D] in place: x * cos + rotate_half(x) * sin, as HF computes it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(plan.sin)
    x.mul_(plan.cos).add_(rotated)


def rotary_embedding_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  kv_cache: torch.Tensor, plan: CpuStepPlan) -> None:
    """RoPE on q and k in place (one pass when they share a buffer), then K and V into the
    cache (one scatter when they do)."""
    if plan.native_rope is None:
        plan.native_rope = plan.slot_rows is None and cpu_native.rope_fits(
            q, k, v, kv_cache, plan.cos, plan.sin, plan.slots)
    if plan.native_rope:
        cpu_native.rope_and_write_kv(q, k, v, kv_cache, plan.cos, plan.sin, plan.slots)
        return
    qk = _joined(q, k)
    if qk is not None:
        _rope_(qk, plan)
    else:
        _rope_(q, plan)
        _rope_(k, plan)
    if plan.slot_rows is not None:
        k, v = k.index_select(0, plan.slot_rows), v.index_select(0, plan.slot_rows)
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    kv = _joined(k, v)
    if kv is not None and kv.dtype == kv_cache.dtype:
        hk = k.shape[1]
        flat.index_copy_(1, plan.slots, kv.unflatten(1, (2, hk)).transpose(0, 1))
    else:
        flat[0].index_copy_(0, plan.slots, k.to(kv_cache.dtype))
        flat[1].index_copy_(0, plan.slots, v.to(kv_cache.dtype))


@functools.lru_cache(maxsize=8)
def _cleared_bits(device: torch.device) -> torch.Tensor:
    """A constant per device: row b says which of byte b's eight bits are clear."""
    byte = torch.arange(256).unsqueeze(1)
    return (((byte >> torch.arange(8)) & 1) == 0).to(device)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """reference.apply_token_bitmask: in C where it is built (kernels.cpu_native), else
    through a byte table, three operations instead of a shift per token."""
    if not cpu_native.apply_token_bitmask(logits, bitmask):
        apply_token_bitmask_bytes(logits, bitmask)


def apply_token_bitmask_bytes(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The byte-table form (any dtype, no compiler needed)."""
    batch, vocab = logits.shape
    as_bytes = bitmask.contiguous().view(torch.uint8)  # little-endian: bit t is byte t // 8
    if sys.byteorder != "little":
        as_bytes = as_bytes.view(batch, -1, 4).flip(-1).reshape(batch, -1)
    cleared = _cleared_bits(logits.device)[as_bytes.long()].view(batch, -1)[:, :vocab]
    logits.masked_fill_(cleared, float("-inf"))
