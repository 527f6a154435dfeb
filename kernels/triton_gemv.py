"""Triton GEMV (twin of reference.linear) for a batch of one: y = x @ W^T + b, x [1, K].

At batch 1 a projection is one read of W, so its speed is the memory bandwidth. On an H200
cuBLAS read the small decode projections of an 8B model (qkv 6144x4096, o 4096x4096) at
only 2.7-3.1 TB/s, against 4.1 TB/s for the large ones (bench/GPU_NOTES.md): it picks
64-wide tiles and split-K with a second reduce kernel. Here a program streams BLOCK_N whole
rows of W in [BLOCK_N, BLOCK_K] tiles, multiplies them by x on the CUDA cores and keeps the
products in a register tile, reducing across K once at the end: no tensor-core padding of
the single row, no split-K, no second kernel. ``prefers_gemv`` says where it replaces
cuBLAS; the configs and the rule come from bench/gpu_gemv.py's sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """The H200 sweep's choice (bench/gpu_gemv.py): one row per program, 2048-wide K steps,
    8 warps. On every 8B-shaped weight it took 74-96% of cuBLAS's time (o and qkv gain most),
    and 94-100% on the LM head."""

    block_n: int = 1
    block_k: int = 2048
    num_warps: int = 8
    num_stages: int = 1


DEFAULT_CONFIG = GemvConfig()
# Weights of at most this many elements take the GEMV at batch 1: up to the largest one
# measured winning, Llama-3-8B's LM head (128256 x 4096). 0 would keep cuBLAS everywhere.
MAX_WEIGHT_ELEMENTS = 128256 * 4096


def prefers_gemv(m: int, n: int, k: int) -> bool:
    return m == 1 and n * k <= MAX_WEIGHT_ELEMENTS


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    # The last tile's missing rows re-read row N-1 instead of masking every load.
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            x = tl.load(x_ptr + kk)
            w = tl.load(w_rows + kk[None, :])
        else:
            kmask = kk < K
            x = tl.load(x_ptr + kk, mask=kmask, other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


def linear_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor, cfg: GemvConfig | None = None) -> torch.Tensor:
    """x: [1, K]; weight: [N, K] with contiguous rows; writes x @ weight^T + bias into
    out [1, N] (contiguous)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m == 1 and weight.shape[1] == k and weight.stride(-1) == 1
    assert out.shape == (1, n) and out.is_contiguous()
    x = x.contiguous()
    cfg = cfg or DEFAULT_CONFIG
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)
    return linear_out(x, weight, bias, out)
