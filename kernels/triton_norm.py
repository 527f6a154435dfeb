"""Triton RMSNorm and RMSNorm fused with the residual add (twins of kernels.reference).

One program normalises one row: the row is loaded once, reduced in float32, and written
once, so the fused variant reads x and residual and writes the sum and the normed row in
a single pass instead of the three passes the reference takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_o, stride_s,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The reference adds in the input dtype (torch computes a bf16 add in fp32 and
        # rounds), then norms the rounded sum.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    h = h * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # Round to the input dtype before the weight multiply, as HF Llama (and the reference) do.
    y = h.to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, summed: torch.Tensor | None) -> None:
    n_cols = x.shape[-1]
    x2, o2 = _rows(x), out.view(-1, n_cols)
    r2 = _rows(residual) if residual is not None else x2
    s2 = summed.view(-1, n_cols) if summed is not None else o2
    block = triton.next_power_of_2(n_cols)
    # A row of 4096 bf16 is 8 KB: 8 warps give each thread 16 elements, 16-byte accesses.
    num_warps = 8 if block >= 4096 else (4 if block >= 1024 else 1)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, s2,
        x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )


def rms_norm_out(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor) -> torch.Tensor:
    """rms_norm writing into a caller-given contiguous ``out`` (tests poison it first)."""
    if x.numel() > 0:
        _launch(x, None, weight, eps, out, None)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    return rms_norm_out(x, weight, eps, out)


def fused_add_rms_norm_out(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    out: torch.Tensor, summed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm writing into caller-given contiguous ``out`` and ``summed``."""
    if x.numel() > 0:
        _launch(x, residual, weight, eps, out, summed)
    return out, summed


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    sum_dtype = torch.result_type(residual, x)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, summed), device=x.device)
    return fused_add_rms_norm_out(x, residual, weight, eps, out, summed)
