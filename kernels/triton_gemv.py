"""Triton skinny GEMM (twin of reference.linear) for decode-sized batches: y = x @ W^T + b.

At batch 1-16 a projection is a read of W at memory speed. On an H200, cuBLAS ran the small
decode projections of an 8B model (qkv 6144x4096, o 4096x4096) at only 2.7-3.1 TB/s against
4.1 TB/s for the large ones (bench/GPU_NOTES.md): it picks 64-wide tiles and split-K. Here
every program streams BLOCK_N full rows of W (no split-K, so no reduce kernel), which gives
enough programs to fill the SMs for these shapes. ``prefers_gemv`` says where this kernel
replaces cuBLAS: nowhere yet, as measured (see MAX_WEIGHT_ELEMENTS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_M = 16  # the M tile: decode batches up to this size
# Off: inside a whole decode step on an H200 this kernel on qkv/o (limit 32 << 20) was
# slower than cuBLAS (5.07 vs 4.76 ms at batch 1, bench/RESULTS.md), so the dispatcher
# keeps cuBLAS until a tuned version wins there. bench/gpu_engine.py turns it on to compare.
MAX_WEIGHT_ELEMENTS = 0


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


DEFAULT_CONFIG = GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=6)


def prefers_gemv(m: int, n: int, k: int) -> bool:
    return m <= MAX_M and n * k <= MAX_WEIGHT_ELEMENTS


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    w_rows = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + kk[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:  # the interpreter's dot on bf16 is wrong; fp32 there
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def linear_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor, cfg: GemvConfig | None = None) -> torch.Tensor:
    """x: [M, K] with M <= MAX_M (last dim contiguous); weight: [N, K] contiguous;
    writes x @ weight^T + bias into out [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_M and weight.shape[1] == k and weight.stride(-1) == 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    if m == 0:
        return out
    cfg = cfg or DEFAULT_CONFIG
    upcast = x.device.type != "cuda"
    precision = "ieee" if (x.dtype == torch.float32 or upcast) else "tf32"
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=upcast, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    return linear_out(x, weight, bias, out)
