"""The CPU serving norms and RoPE + KV write equal kernels.reference: RoPE bit for bit in
bf16 (where HF rounds, it rounds), the norms within one rounding step of the dtype (they
sum in another order); K/V land in exactly their slots, padding slots (-1) write nothing,
and q/k/v may be views of one fused projection (the serving case) or separate tensors.
Each runs twice: in C (kernels/cpu_elementwise.c, what serves where it builds) and with
the C library taken away (the torch operators that serve where it does not)."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_elementwise, cpu_native, reference
from kernels.cpu_step import plan_step


@pytest.fixture(params=["c", "torch"])
def path(request, monkeypatch):
    if request.param == "c":
        assert cpu_native.elementwise_library() is not None, "the C kernels did not build"
    else:
        monkeypatch.setattr(cpu_native, "elementwise_library", lambda: None)
    return request.param


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    if out.dtype == torch.bfloat16:
        return torch.equal(out, ref)
    return torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


def _within_a_rounding_step(out: torch.Tensor, ref: torch.Tensor) -> bool:
    eps = torch.finfo(out.dtype).eps
    tol = eps if out.dtype == torch.bfloat16 else 8 * eps  # bf16: one ulp after the weight
    return torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [96, 255])
def test_norms_equal_reference(dtype, hidden, gen, path):
    x = (3 * torch.randn(37, hidden, generator=gen)).to(dtype)
    res = torch.randn(37, hidden, generator=gen).to(dtype)
    w = torch.rand(hidden, generator=gen).to(dtype) + 0.5
    assert _within_a_rounding_step(cpu_elementwise.rms_norm(x, w, 1e-5),
                                   reference.rms_norm(x, w, 1e-5))
    out, summed = cpu_elementwise.fused_add_rms_norm(x, res, w, 1e-6)
    want, want_summed = reference.fused_add_rms_norm(x, res, w, 1e-6)
    assert _within_a_rounding_step(out, want) and torch.equal(summed, want_summed)


def _inputs(tokens, hq, hk, dim, dtype, fused, gen):
    if fused:
        qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(dtype)
        return tuple(t.view(tokens, -1, dim)
                     for t in qkv.split([hq * dim, hk * dim, hk * dim], dim=-1))
    # separate tensors, k non-contiguous: the un-fused fallback
    return (torch.randn(tokens, hq, dim, generator=gen).to(dtype),
            torch.randn(tokens, hk, 2 * dim, generator=gen).to(dtype)[:, :, :dim],
            torch.randn(tokens, hk, dim, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["qkv-views", "separate"])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("padding", [False, True])
def test_rope_and_kv_write_equal_reference(dtype, fused, heads, padding, gen, path):
    tokens, dim, block_size, num_blocks = 11, 32, 16, 4
    hq, hk = heads
    q, k, v = _inputs(tokens, hq, hk, dim, dtype, fused, gen)
    want_q, want_k, want_v = q.clone(), k.clone(), v.clone()
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    angles = torch.arange(128, dtype=torch.float32)[:, None] * torch.rand(dim // 2,
                                                                          generator=gen)
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    if padding:
        slots[[0, 6]] = -1
    cache = torch.full((2, num_blocks, block_size, hk, dim), float("nan"), dtype=dtype)
    want_cache = cache.clone()
    reference.rotary_embedding(want_q, want_k, positions, cos_sin)
    reference.write_kv_cache(want_k, want_v, want_cache, slots)
    plan = plan_step(positions, cos_sin, slots, torch.zeros(1, 1, dtype=torch.int32),
                     torch.tensor([tokens], dtype=torch.int32),
                     torch.tensor([0, tokens], dtype=torch.int32), block_size, dtype)
    cpu_elementwise.rotary_embedding_and_write_kv(q, k, v, cache, plan)
    assert _same(q, want_q) and _same(k, want_k) and torch.equal(v, want_v)
    assert torch.equal(cache.isnan(), want_cache.isnan())  # nothing else was touched
    written = ~want_cache.isnan()
    assert int(written.sum()) == 2 * (tokens - 2 * padding) * hk * dim
    assert _same(cache[written], want_cache[written])


def test_native_kv_write_refuses_a_slot_outside_the_cache(gen):
    tokens, hq, hk, dim = 3, 4, 2, 32
    q, k, v = _inputs(tokens, hq, hk, dim, torch.bfloat16, True, gen)
    cache = torch.zeros((2, 2, 16, hk, dim), dtype=torch.bfloat16)
    cos = torch.ones(tokens, 1, dim, dtype=torch.bfloat16)
    slots = torch.tensor([0, 5, 32])  # 2 blocks of 16: slot 32 is past the end
    assert cpu_native.rope_fits(q, k, v, cache, cos, cos, slots)
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_native.rope_and_write_kv(q, k, v, cache, cos, cos, slots)
    assert not cache.any()  # nothing was written
