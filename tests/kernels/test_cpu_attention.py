"""The CPU serving attention equals kernels.reference on random paged caches: decode
batches padded to their longest context, prefills with and without a cached prefix, both
mixed in one step, over shuffled (non-contiguous) block tables, for MHA, GQA and MQA and
odd lengths. The fixture fills every slot a sequence does not own with NaN, so reading
past a context (the padding of the decode batch) shows up as NaN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu_attention, cpu_native, reference
from kernels.cpu_step import plan_step

HEAD_DIM = 32
HEADS = [(4, 2), (3, 3), (4, 1)]
HEAD_IDS = ["gqa", "mha", "mqa"]
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


# the decode paths: torch's SDPA over a gathered batch, and kernels.cpu_native's C kernel
NATIVE = [pytest.param(False, id="torch"),
          pytest.param(True, id="native", marks=pytest.mark.skipif(
              cpu_native.library() is None, reason="no C compiler to build the kernel"))]


def _plan(q, kv, cu, native=False):
    t = q.shape[0]
    return plan_step(torch.zeros(t, dtype=torch.int64), torch.zeros(1, HEAD_DIM),
                     torch.zeros(t, dtype=torch.int64), kv.block_tables, kv.context_lens,
                     cu, kv.kv_cache.shape[2], q.dtype, native)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_decode_batch_matches_reference(native, dtype, block_size, heads, gen, rel_err,
                                        paged_kv):
    hq, hk = heads
    # one token, mid-block, exactly a block, several blocks and odd: padded to the longest
    lens = [1, block_size * 3 + 7, block_size, 5, 2 * block_size + 1]
    kv = paged_kv(lens, block_size, hk, HEAD_DIM, dtype, gen)
    q = torch.randn(len(lens), hq, HEAD_DIM, generator=gen).to(dtype)
    out = cpu_attention.paged_decode_attention(q, kv.kv_cache, kv.block_tables,
                                               kv.context_lens, 0.17, native=native)
    ref = reference.paged_decode_attention(q, kv.kv_cache, kv.block_tables, kv.context_lens,
                                           0.17)
    assert rel_err(out, ref) < _tol(dtype)


@pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler to build the kernel")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 48, 64, 96, 128])
@pytest.mark.parametrize("bf16_scores", [True, False], ids=["bf16-dot", "f32-scores"])
def test_native_decode_matches_reference_at_every_head_size_it_takes(dtype, head_dim,
                                                                      bf16_scores, gen,
                                                                      rel_err, paged_kv):
    # 64 and 128 are compiled as constants, 16, 48 and 96 take the general loop; long
    # contexts whose scores spread widely exercise the softmax's exp; in bf16 with heads of
    # a multiple of 32 the scores take the bf16 dot product unless told not to (16 tokens
    # at a time: 300 and 77 end in partial groups)
    lens = [300, 1, 77]
    kv = paged_kv(lens, 16, 2, head_dim, dtype, gen)
    q = (4 * torch.randn(len(lens), 6, head_dim, generator=gen)).to(dtype)
    out = cpu_native.paged_decode_attention(
        q, kv.kv_cache, kv.block_tables.to(torch.int32).contiguous(),
        kv.context_lens.to(torch.int32), head_dim ** -0.5, bf16_scores)
    ref = reference.paged_decode_attention(q, kv.kv_cache, kv.block_tables, kv.context_lens,
                                           head_dim ** -0.5)
    assert rel_err(out, ref) < _tol(dtype)


@pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler to build the kernel")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 48, 64, 128])
def test_native_prefill_matches_reference_at_every_head_size_it_takes(dtype, head_dim, gen,
                                                                       rel_err, paged_kv):
    # a long fresh prompt (rows in tiles, the last one partial: 7 tokens x 3 heads of a
    # group of 3), one after a cached prefix, and q as strided rows of a fused projection
    news, prefixes = [7, 150, 40], [0, 0, 90]
    lens = [n + p for n, p in zip(news, prefixes, strict=True)]
    kv = paged_kv(lens, 16, 2, head_dim, dtype, gen)
    cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
    qkv = (4 * torch.randn(int(cu[-1]), 10 * head_dim, generator=gen)).to(dtype)
    q = qkv[:, :6 * head_dim].view(-1, 6, head_dim)
    out = cpu_attention.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                                kv.context_lens, head_dim ** -0.5, native=True)
    ref = reference.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                            kv.context_lens, head_dim ** -0.5)
    assert rel_err(out, ref) < _tol(dtype)


@pytest.mark.skipif(cpu_native.amx_library() is None, reason="no AMX-BF16 on this CPU")
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("heads", [(8, 4), (3, 3), (4, 1)], ids=HEAD_IDS)
def test_amx_prefill_matches_reference(head_dim, heads, gen, rel_err, paged_kv):
    # a fresh prompt of rows in partial tiles of 16, a long one after a cached prefix
    # ending mid-block, one token after a prefix; q as strided rows of a fused projection.
    # The output rounds probabilities to bf16 (as torch's CPU flash attention does).
    hq, hk = heads
    news, prefixes = [7, 150, 1], [0, 45, 33]
    lens = [n + p for n, p in zip(news, prefixes, strict=True)]
    kv = paged_kv(lens, 16, hk, head_dim, torch.bfloat16, gen)
    total = sum(news)
    qkv = (2 * torch.randn(total, (hq + 2) * head_dim, generator=gen)).to(torch.bfloat16)
    q = qkv[:, :hq * head_dim].view(-1, hq, head_dim)
    scale = head_dim ** -0.5
    start = 0
    for i, n in enumerate(news):
        rows = q[start:start + n]
        out = torch.full_like(rows, float("nan"))
        table = kv.block_tables[i].contiguous()
        cpu_native.paged_prefill_attention(rows, kv.kv_cache, table, lens[i], scale, out,
                                           use_amx=True)
        cu = torch.tensor([0, n], dtype=torch.int32)
        ref = reference.paged_prefill_attention(rows, kv.kv_cache, kv.block_tables[i:i + 1],
                                                cu, kv.context_lens[i:i + 1], scale)
        assert rel_err(out, ref) < 1e-2, (i, n)
        start += n


def test_native_decode_declines_head_sizes_it_does_not_take(gen, paged_kv):
    kv = paged_kv([5], 16, 1, 40, torch.float32, gen)
    assert not cpu_native.serves(kv.kv_cache)
    kv = paged_kv([5], 16, 1, 32, torch.float16, gen)
    assert not cpu_native.serves(kv.kv_cache)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_prefill_with_and_without_cached_prefix_matches_reference(native, dtype, heads, gen,
                                                                  rel_err, paged_kv):
    hq, hk = heads
    # (new tokens, cached prefix): fresh prompts, prefixes ending mid-block and on a block
    # edge, a sequence with no new tokens this step, odd lengths
    plan = [(21, 0), (5, 13), (0, 7), (9, 16), (3, 0), (33, 3)]
    lens = [n + p for n, p in plan]
    kv = paged_kv(lens, 16, hk, HEAD_DIM, dtype, gen)
    cu = torch.tensor([0, *torch.tensor([n for n, _ in plan]).cumsum(0).tolist()],
                      dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, HEAD_DIM, generator=gen).to(dtype)
    out = cpu_attention.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                                kv.context_lens, 0.21, native=native)
    ref = reference.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                            kv.context_lens, 0.21)
    assert rel_err(out, ref) < _tol(dtype)


def _own_kv(kv, lens: list[int], news: list[int], block_size: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's new tokens' K and V read from the cache, concatenated: [T, Hk, D]."""
    ks, vs = [], []
    for i, (length, n) in enumerate(zip(lens, news, strict=False)):
        for pos in range(length - n, length):
            block = int(kv.block_tables[i, pos // block_size])
            ks.append(kv.kv_cache[0, block, pos % block_size])
            vs.append(kv.kv_cache[1, block, pos % block_size])
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_a_mixed_step_with_decodes_between_prefills_matches_reference(native, dtype, heads,
                                                                       gen, rel_err, paged_kv):
    hq, hk = heads
    # decode rows are not contiguous in the flat batch; prefills read their own K/V
    plan = [(1, 40), (12, 0), (1, 3), (7, 20), (1, 0), (18, 0)]
    news = [n for n, _ in plan]
    lens = [n + p for n, p in plan]
    kv = paged_kv(lens, 16, hk, HEAD_DIM, dtype, gen)
    cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
    # q as the serving path has it: a strided view of a fused projection's rows
    qkv = torch.randn(int(cu[-1]), (hq + 2 * hk) * HEAD_DIM, generator=gen).to(dtype)
    q = qkv[:, :hq * HEAD_DIM].view(-1, hq, HEAD_DIM)
    k, v = _own_kv(kv, lens, news, 16)
    step = _plan(q, kv, cu, native)
    assert step.decode is not None and not isinstance(step.decode.rows, slice)
    assert (step.decode.gather is None) == native
    ref = reference.paged_prefill_attention(q, kv.kv_cache, kv.block_tables, cu,
                                            kv.context_lens, 0.19)
    for own_k, own_v in ((k, v), (None, None)):  # the step's own K/V, or the cache's
        out = cpu_attention.paged_attention(q, own_k, own_v, kv.kv_cache, step, 0.19)
        assert rel_err(out, ref) < _tol(dtype)


def test_without_a_compiler_the_native_kernel_is_absent_and_decodes_take_torch(tmp_path):
    # a fresh cache (nothing built yet) and a compiler that fails: library() says None,
    # with a warning, and the plan falls back to the gather + SDPA path
    code = ("import logging, torch; logging.basicConfig();"
            "from kernels import cpu_native;"
            "print(cpu_native.library(), cpu_native.serves(torch.zeros(2, 1, 16, 1, 32)),"
            " cpu_native.elementwise_library())")
    env = {**os.environ, "PDSERVE_KERNEL_CACHE": str(tmp_path), "CC": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "False", "None"]
    assert "native CPU kernels of cpu_paged_attention.c unavailable" in done.stderr
    assert "native CPU kernels of cpu_elementwise.c unavailable" in done.stderr
    assert not list(tmp_path.glob("*.so"))
