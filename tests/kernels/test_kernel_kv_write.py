"""The Triton KV-cache write scatters K/V into their slots, skips negative slots, and
touches nothing else."""

from __future__ import annotations

import pytest
import torch

from kernels import reference, triton_kv_write


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_cache_matches_reference_and_skips_padding(block_size, dtype, gen):
    num_blocks, hk, dim, tokens = 5, 2, 32, 9
    key = torch.randn(tokens, hk, dim, generator=gen).to(dtype)
    # Value as a strided view (e.g. a slice of a fused qkv output).
    value = torch.randn(tokens, hk, 2 * dim, generator=gen).to(dtype)[:, :, :dim]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].int()
    slots[[2, 7]] = -1
    cache = torch.full((2, num_blocks, block_size, hk, dim), float("nan"), dtype=dtype)
    expected = cache.clone()
    reference.write_kv_cache(key, value, expected, slots)
    triton_kv_write.write_kv_cache(key, value, cache, slots)
    # NaN-filled slots that neither wrote must stay NaN; written ones must match exactly.
    assert torch.equal(cache.isnan(), expected.isnan())
    written = ~expected.isnan()
    assert int(written.sum()) == 2 * (tokens - 2) * hk * dim
    assert torch.equal(cache[written], expected[written])


def test_write_kv_cache_with_every_slot_negative_writes_nothing(gen):
    cache = torch.full((2, 2, 16, 1, 16), float("nan"))
    key = torch.randn(3, 1, 16, generator=gen)
    triton_kv_write.write_kv_cache(key, key, cache, torch.full((3,), -1, dtype=torch.int32))
    assert cache.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [32, 48])
def test_rope_fused_with_the_kv_write_equals_rope_then_write(dtype, dim, gen):
    from kernels import triton_rope

    tokens, hq, hk, block_size, num_blocks = 7, 4, 2, 16, 3
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(dtype)
    views = qkv.split([hq * dim, hk * dim, hk * dim], dim=-1)
    q, k, v = (t.view(tokens, -1, dim) for t in views)
    positions = torch.randint(0, 60, (tokens,), generator=gen)
    half = torch.arange(64, dtype=torch.float32)[:, None] * torch.rand(dim // 2, generator=gen)
    cos_sin = torch.cat((half.cos(), half.sin()), dim=-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].int()
    slots[3] = -1
    cache = torch.full((2, num_blocks, block_size, hk, dim), float("nan"), dtype=dtype)
    want_cache, want_qkv = cache.clone(), qkv.clone()
    wq, wk, wv = (t.view(tokens, -1, dim) for t in want_qkv.split(
        [hq * dim, hk * dim, hk * dim], dim=-1))
    reference.rotary_embedding(wq, wk, positions, cos_sin)
    reference.write_kv_cache(wk, wv, want_cache, slots)
    triton_rope.rotary_embedding_and_write_kv(q, k, v, positions, cos_sin, cache, slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(qkv.float(), want_qkv.float(), atol=tol, rtol=tol)
    assert torch.equal(cache.isnan(), want_cache.isnan())  # padding slot untouched
    written = ~want_cache.isnan()
    assert torch.allclose(cache[written].float(), want_cache[written].float(), atol=tol,
                          rtol=tol)
