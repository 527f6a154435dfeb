"""Paged decode and prefill attention equal their references in Triton's interpreter:
ragged batches, contexts ending mid-block, block sizes 16 and 32, GQA and MHA, and both
the split-KV and the single-pass decode paths."""

from __future__ import annotations

import pytest
import torch

from kernels import ops, reference
from kernels.triton_decode_attention import DecodeConfig, choose_num_splits, decode_attention_out
from kernels.triton_prefill_attention import PrefillConfig, prefill_attention_out

HEAD_DIM = 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("num_splits,interleave,merge_in_kernel",
                         [(1, False, True), (3, False, True), (3, True, True),
                          (3, True, False)],
                         ids=["single", "split-ranges", "split-interleaved",
                              "split-merge-kernel"])
def test_decode_matches_reference(dtype, block_size, heads, num_splits, interleave,
                                  merge_in_kernel, gen, rel_err, paged_kv, tol):
    hq, hk = heads
    # Ragged, ending mid-block, one exactly on a block edge, one shorter than a tile.
    lens = [block_size * 2 + 5, 3, block_size, 71]
    kv = paged_kv(lens, block_size, hk, HEAD_DIM, dtype, gen)
    q = torch.randn(len(lens), hq, HEAD_DIM, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    decode_attention_out(q, kv.kv_cache, kv.block_tables, kv.context_lens, 0.17, out,
                         DecodeConfig(block_n=16, split_block_n=16, num_splits=num_splits,
                                      interleave=interleave, merge_in_kernel=merge_in_kernel))
    ref = reference.paged_decode_attention(q, kv.kv_cache, kv.block_tables,
                                           kv.context_lens, 0.17)
    assert rel_err(out, ref) < tol[dtype]


def test_decode_bf16_through_the_dispatcher(gen, rel_err, paged_kv):
    # MQA; long enough that the default config splits (interpreter: 4 "SMs").
    kv = paged_kv([140, 9], 16, 1, HEAD_DIM, torch.bfloat16, gen)
    q = torch.randn(2, 4, HEAD_DIM, generator=gen).to(torch.bfloat16)
    out = ops.paged_decode_attention(q, kv.kv_cache, kv.block_tables, kv.context_lens, 0.2)
    ref = reference.paged_decode_attention(q, kv.kv_cache, kv.block_tables,
                                           kv.context_lens, 0.2)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("merge_in_kernel", [True, False])
def test_decode_merges_more_splits_than_one_merge_chunk(merge_in_kernel, gen, rel_err,
                                                        paged_kv):
    # 5 splits merged 2 at a time (a ragged last chunk); twice, so the in-kernel merge's
    # ticket counters must have been reset by the first call.
    kv = paged_kv([150, 40, 1], 16, 2, HEAD_DIM, torch.float32, gen)
    cfg = DecodeConfig(split_block_n=16, num_splits=5, merge_in_kernel=merge_in_kernel,
                       merge_chunk=2)
    for _ in range(2):
        q = torch.randn(3, 4, HEAD_DIM, generator=gen)
        out = torch.full_like(q, float("nan"))
        decode_attention_out(q, kv.kv_cache, kv.block_tables, kv.context_lens, 0.2, out, cfg)
        want = reference.paged_decode_attention(q, kv.kv_cache, kv.block_tables,
                                                kv.context_lens, 0.2)
        assert rel_err(out, want) < 1e-4
    from kernels.triton_decode_attention import _tickets
    assert int(_tickets(q.device).abs().sum()) == 0


def test_split_heuristic_splits_small_batches_of_long_contexts_only():
    sms = 132
    assert choose_num_splits(1, 8, 4096, sms) > 1
    assert choose_num_splits(16, 8, 4096, sms) > 1
    assert choose_num_splits(64, 8, 4096, sms) == 1
    assert choose_num_splits(256, 8, 16384, sms) == 1
    assert choose_num_splits(1, 8, 64, sms) == 1  # too short to be worth a merge
    assert choose_num_splits(1, 8, 1 << 20, sms) <= 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_prefill_with_cached_prefix_matches_reference(dtype, block_size, heads, gen, rel_err,
                                                      paged_kv, tol):
    hq, hk = heads
    # (new tokens, cached prefix): a fresh prompt, prefix hits ending mid-block and on a
    # block edge, a sequence with no new tokens, and one longer than a query tile.
    plan = [(20, 0), (5, 13), (0, 7), (9, block_size), (40, 3)]
    lens = [n + p for n, p in plan]
    kv = paged_kv(lens, block_size, hk, HEAD_DIM, dtype, gen)
    cu = torch.tensor([0, *torch.tensor([n for n, _ in plan]).cumsum(0).tolist()],
                      dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, HEAD_DIM, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    prefill_attention_out(q, kv.kv_cache, kv.block_tables, cu, kv.context_lens, 0.21, out,
                          PrefillConfig(block_m=16, block_n=16))
    ref = reference.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                            kv.context_lens, 0.21)
    assert rel_err(out, ref) < tol[dtype]


def test_prefill_bf16_through_the_dispatcher_with_default_tiles(gen, rel_err, paged_kv):
    plan = [(37, 20), (70, 0)]
    kv = paged_kv([n + p for n, p in plan], 16, 2, HEAD_DIM, torch.bfloat16, gen)
    cu = torch.tensor([0, 37, 107], dtype=torch.int32)
    q = torch.randn(107, 8, HEAD_DIM, generator=gen).to(torch.bfloat16)
    out = ops.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu, kv.context_lens,
                                      0.2)
    ref = reference.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                            kv.context_lens, 0.2)
    assert rel_err(out, ref) < 1e-2


def test_decode_and_prefill_with_a_head_dim_that_is_not_a_power_of_two(gen, rel_err,
                                                                        paged_kv):
    dim = 48
    kv = paged_kv([21, 50], 16, 2, dim, torch.float32, gen)
    q = torch.randn(2, 4, dim, generator=gen)
    for splits, interleave in ((1, True), (2, False), (2, True)):
        out = torch.full_like(q, float("nan"))
        cfg = DecodeConfig(block_n=16, split_block_n=16, num_splits=splits,
                           interleave=interleave)
        decode_attention_out(q, kv.kv_cache, kv.block_tables, kv.context_lens, 0.15, out, cfg)
        want = reference.paged_decode_attention(q, kv.kv_cache, kv.block_tables,
                                                kv.context_lens, 0.15)
        assert rel_err(out, want) < 1e-3
    cu = torch.tensor([0, 6, 26], dtype=torch.int32)
    qp = torch.randn(26, 4, dim, generator=gen)
    out = torch.full_like(qp, float("nan"))
    prefill_attention_out(qp, kv.kv_cache, kv.block_tables, cu, kv.context_lens, 0.15, out,
                          PrefillConfig(block_m=16, block_n=16))
    want = reference.paged_prefill_attention(qp, kv.kv_cache, kv.block_tables, cu,
                                             kv.context_lens, 0.15)
    assert rel_err(out, want) < 1e-3
