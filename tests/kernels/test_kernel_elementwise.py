"""RMSNorm (plain and fused with the residual add), RoPE and SiLU-and-mul equal their
references in Triton's interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import ops, reference, triton_activation, triton_norm, triton_rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 48)])
def test_rms_norm_matches_reference(dtype, shape, gen, rel_err, tol):
    x = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    triton_norm.rms_norm_out(x, w, 1e-5, out)
    assert rel_err(out, reference.rms_norm(x, w, 1e-5)) < tol[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm_matches_reference_and_leaves_inputs(dtype, gen, rel_err, tol):
    x = torch.randn(7, 96, generator=gen).to(dtype)
    res = torch.randn(7, 96, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    x0, res0 = x.clone(), res.clone()
    out = torch.full_like(x, float("nan"))
    summed = torch.full_like(x, float("nan"))
    triton_norm.fused_add_rms_norm_out(x, res, w, 1e-6, out, summed)
    ref_out, ref_sum = reference.fused_add_rms_norm(x, res, w, 1e-6)
    assert rel_err(out, ref_out) < tol[dtype]
    assert rel_err(summed, ref_sum) < tol[dtype]
    assert torch.equal(x, x0) and torch.equal(res, res0)


def _cos_sin_cache(max_pos: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_rotates_views_of_a_fused_qkv_in_place(dtype, gen, rel_err, tol):
    tokens, hq, hk, dim = 6, 4, 2, 32
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(dtype)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)
    k = qkv[:, hq * dim : (hq + hk) * dim].view(tokens, hk, dim)
    v_before = qkv[:, (hq + hk) * dim :].clone()
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    cache = _cos_sin_cache(128, dim, torch.float32)
    ref_q, ref_k = reference.rotary_embedding(q.clone(), k.clone(), positions, cache)
    out_q, out_k = triton_rope.rotary_embedding(q, k, positions, cache)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert rel_err(q, ref_q) < tol[dtype]
    assert rel_err(k, ref_k) < tol[dtype]
    assert torch.equal(qkv[:, (hq + hk) * dim :], v_before), "v must be untouched"


def test_rope_at_position_zero_is_identity(gen):
    q = torch.randn(1, 2, 16, generator=gen)
    k = torch.randn(1, 1, 16, generator=gen)
    q0, k0 = q.clone(), k.clone()
    triton_rope.rotary_embedding(q, k, torch.zeros(1, dtype=torch.int32),
                                 _cos_sin_cache(4, 16, torch.float32))
    assert torch.allclose(q, q0) and torch.allclose(k, k0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_reference(dtype, gen, rel_err, tol):
    x = torch.randn(2, 3, 2 * 40, generator=gen).to(dtype)
    out = torch.full((2, 3, 40), float("nan"), dtype=dtype)
    triton_activation.silu_and_mul_out(x, out)
    assert rel_err(out, reference.silu_and_mul(x)) < tol[dtype]


def test_dispatcher_runs_triton_under_the_interpreter(gen, rel_err):
    assert ops.use_triton(torch.empty(1))
    x = torch.randn(4, 64, generator=gen)
    w = torch.randn(64, generator=gen)
    assert rel_err(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)) < 1e-5
    y = torch.randn(3, 2 * 24, generator=gen)
    assert rel_err(ops.silu_and_mul(y), reference.silu_and_mul(y)) < 1e-5
    assert math.isfinite(float(ops.fused_add_rms_norm(x, x, w, 1e-5)[0].sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,bias,block_k", [(40, 96, False, 32), (48, 300, True, 64),
                                              (33, 256, True, 64), (7, 64, False, 64)])
def test_gemv_matches_reference(dtype, n, k, bias, block_k, gen, rel_err, tol):
    # Several K steps, K that is not a multiple of the tile, and a ragged last row tile.
    from kernels import triton_gemv

    x = torch.randn(1, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = torch.full((1, n), float("nan"), dtype=dtype)
    triton_gemv.linear_out(x, w, b, out, triton_gemv.GemvConfig(block_n=4, block_k=block_k))
    ref = reference.linear(x.float(), w.float(), None if b is None else b.float())
    assert rel_err(out.float(), ref) < tol[dtype]


def test_the_dispatcher_takes_the_gemv_for_a_batch_of_one_when_enabled(
        gen, rel_err, tol, monkeypatch):
    from kernels import triton_gemv

    monkeypatch.setattr(triton_gemv, "MAX_WEIGHT_ELEMENTS", 32 << 20)
    assert triton_gemv.prefers_gemv(1, 32, 64)
    assert not triton_gemv.prefers_gemv(2, 32, 64)
    assert not triton_gemv.prefers_gemv(1, 1 << 16, 1 << 10)  # over the size limit
    w = torch.randn(32, 64, generator=gen)
    for rows in (1, 3):  # one row: the GEMV; more: the reference path
        x = torch.randn(rows, 64, generator=gen)
        assert rel_err(ops.linear(x, w), reference.linear(x, w)) < tol[torch.float32]
