"""Triton paged decode attention (twin of reference.paged_decode_attention).

One query token per sequence attends to its whole context in the paged KV cache
``[2, num_blocks, block_size, num_kv_heads, head_dim]``. A program owns one
(sequence, KV head, split): it loads the KV head's whole query group as one
``[BLOCK_H, D]`` tile, so each K/V byte is read from memory once for all the query heads
that share it (GQA/MQA; MHA is a group of one), and streams the context in tiles of
``block_n`` tokens with an online softmax. Tokens are gathered through the block table a
token at a time, so any block_size works and a context may end mid-block.

Split-KV (flash-decoding): when batch x KV heads is too few programs to fill the GPU, each
sequence's context is dealt out to ``num_splits`` programs (split s takes tiles s, s+S, ...)
that each write a partial (normalised output, log-sum-exp) pair. The last program of a
(sequence, KV head) to finish -- it draws the last ticket from a counter -- merges them, so
the whole call is one kernel (a second merge kernel, launched early by programmatic
dependent launch, remains as the fallback and for comparison). The split
count is picked on the host from shapes alone -- batch x KV heads vs the SM count, and the
longest context the block table can hold -- and each sequence deals out its own context
inside the kernel. Nothing reads a device value on the host, so the call can be captured
in a CUDA graph. Measurements behind the defaults: bench/GPU_NOTES.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# Ticket counters for the in-kernel merge, one per (sequence, KV head) of a split launch.
# Split launches only happen below ~4 programs per SM, far fewer than this.
MAX_TICKETS = 4096


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Launch shapes (tuned on an H200, bench/GPU_NOTES.md). ``num_splits=None`` lets
    choose_num_splits decide; the split path has its own tile shape because its programs
    are short (a tile or two each) and should all be resident at once."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_block_n: int = 64
    split_num_warps: int = 4
    split_num_stages: int = 2  # 1 when every split holds a single tile (nothing to pipeline)
    num_splits: int | None = None
    # Split s takes tiles s, s + S, s + 2S, ...: its first tile's block-table entries can
    # be read before the context length arrives (one memory round trip fewer).
    interleave: bool = True
    # Launch the merge kernel with programmatic dependent launch (Hopper+) when its grid
    # (batch x query heads) fits beside the split kernel: it hides the merge's launch
    # latency; a larger merge grid only squats on SMs the split kernel still needs.
    pdl: bool = True
    # Merge in the split kernel's last-arriving program instead of a second kernel: on an
    # H200 a dependent launch costs ~1.5-2 us inside a graph, a sixth of 1 x 4096.
    merge_in_kernel: bool = True
    merge_chunk: int = 8  # splits merged per step (bounds the merge's registers)
    # Launch by programmatic dependent launch, waiting (griddepcontrol) for the kernel
    # before it and letting the next one launch early: hides launch latency in a chain
    # (1 x 4096 on an H200: 10.8 -> 10.1 us).
    pdl_chain: bool = True
    # About four programs per SM, and no range shorter than one tile.
    waves: float = 4.0
    min_tokens_per_split: int = 64


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split path
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _tickets(device: torch.device) -> torch.Tensor:
    """The in-kernel merge's counters: zero before and after every launch (the merging
    program resets its own), so one buffer per device serves every call and every graph
    replay. Launches on one stream only: two concurrent split launches would share them."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Allocated inside a capture, it would live in the graph's private pool.
        raise RuntimeError("paged decode attention must run once before CUDA graph capture")
    return torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int,
                      cfg: DecodeConfig = DecodeConfig()) -> int:
    """How many ranges to cut each context into: the nearest count that gives about
    ``cfg.waves`` programs per SM (so batch x KV heads >= ~half that already runs unsplit),
    with no range shorter than ``cfg.min_tokens_per_split`` tokens."""
    programs = max(1, batch * num_kv_heads)
    wanted = int(cfg.waves * num_sms / programs + 0.5)
    by_length = max(1, max_context // cfg.min_tokens_per_split)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, stride_kv, off, tmask, d, dmask, qk_scale,
                 EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of the online softmax; ``tmask`` must hold at least one live token."""
    if EVEN_D:
        kv_mask = tmask[:, None]
    else:
        kv_mask = tmask[:, None] & dmask[None, :]
    k = tl.load(k_base + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(k_base + stride_kv + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = tl.where(tmask[None, :], s, float("-inf"))
    # Scores stay unscaled; the scale folds into one FMA inside the exp2 argument.
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, ctx_ptr, out_ptr, mid_o_ptr, mid_lse_ptr, ticket_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kv, stride_blk, stride_tok, stride_kh,
    stride_bt, stride_ob, stride_oh,
    num_splits, max_blocks,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    SPLIT: tl.constexpr, INTERLEAVE: tl.constexpr, UPCAST: tl.constexpr,  # INTERLEAVE: SPLIT
    PRECISION: tl.constexpr, EVEN_D: tl.constexpr, USE_PDL: tl.constexpr,
    MERGE: tl.constexpr, MERGE_H: tl.constexpr, BLOCK_S: tl.constexpr,
    S_CHUNK: tl.constexpr, PDL_CHAIN: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if PDL_CHAIN:
        gdc_launch_dependents()
        gdc_wait()  # q, the cache and the tables come from kernels before this one
    if USE_PDL:
        # Let the merge kernel be scheduled now; it waits (gdc_wait) for our results.
        gdc_launch_dependents()
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    if INTERLEAVE:
        # Issued before the context length is known: table entries are always readable.
        first = split * BLOCK_N + offs_n
        first_page = tl.load(bt_row + tl.minimum(first // PAGE, max_blocks - 1)).to(tl.int64)
    ctx = tl.load(ctx_ptr + b)

    rows = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rows
    hmask = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_base = kv_ptr + kvh * stride_kh

    if INTERLEAVE:
        step = num_splits * BLOCK_N
        end = ctx
        if split * BLOCK_N < ctx:
            off = first_page * stride_blk + (first % PAGE) * stride_tok
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, stride_kv, off, first < ctx,
                                         d, dmask, qk_scale, EVEN_D, UPCAST, PRECISION)
        start = split * BLOCK_N + step
    else:
        step = BLOCK_N
        if SPLIT:
            tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits)
            start = split * tiles_per_split * BLOCK_N
            end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)
        else:
            start = 0
            end = ctx
    for n in range(start, end, step):
        t = n + offs_n
        tmask = t < end
        page = tl.load(bt_row + t // PAGE, mask=tmask, other=0).to(tl.int64)
        off = page * stride_blk + (t % PAGE) * stride_tok
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, stride_kv, off, tmask,
                                     d, dmask, qk_scale, EVEN_D, UPCAST, PRECISION)

    # An empty range (a short sequence's later splits, or context 0) leaves l_i == 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    omask = hmask[:, None] & dmask[None, :]
    if SPLIT:
        row = (b * tl.num_programs(1) * GROUP + heads).to(tl.int64) * num_splits + split
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=omask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=hmask)
        if MERGE:
            # Every thread's partial is stored before the ticket is drawn; the draw is a
            # gpu-scope acquire-release, so the last drawer sees every program's partials.
            tl.debug_barrier()
            ticket = ticket_ptr + b * tl.num_programs(1) + kvh
            if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")  # for the next launch
                mh = tl.arange(0, MERGE_H)
                mheads = kvh * GROUP + mh
                _merge_heads(mid_o_ptr, mid_lse_ptr, out_ptr,
                             b * tl.num_programs(1) * GROUP + mheads,
                             b.to(tl.int64) * stride_ob + mheads * stride_oh, mh < GROUP,
                             num_splits, HEAD_DIM, BLOCK_D, MERGE_H, BLOCK_S, S_CHUNK)
    else:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _merge_heads(mid_o_ptr, mid_lse_ptr, out_ptr, rows, out_offs, hmask, num_splits,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_H: tl.constexpr,
                 BLOCK_S: tl.constexpr, S_CHUNK: tl.constexpr):
    """Merge the split partials of MERGE_H heads (partial rows ``rows``, a row being
    sequence x query heads + head) into ``out``. Partials are read past L1 (.cg): other
    SMs wrote them. Chunks of S_CHUNK splits: one split per fully unrolled step was no
    faster alone and, unrolled 64 times, slowed the 8B decode step by 8% (GPU_NOTES.md)."""
    base = rows.to(tl.int64)[:, None] * num_splits
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(mid_lse_ptr + base + s[None, :], mask=hmask[:, None] & (s < num_splits)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    top = tl.max(lse, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    den = tl.sum(tl.exp2(lse - top[:, None]), axis=1)  # empty splits carry -inf: weight 0
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    c = tl.arange(0, S_CHUNK)
    acc = tl.zeros([MERGE_H, BLOCK_D], tl.float32)
    for s0 in tl.static_range(0, BLOCK_S, S_CHUNK):
        smask = hmask[:, None] & (s0 + c < num_splits)[None, :]
        row = base + s0 + c[None, :]
        w = tl.exp2(tl.load(mid_lse_ptr + row, mask=smask, other=float("-inf"),
                            cache_modifier=".cg") - top[:, None])
        o = tl.load(mid_o_ptr + row[:, :, None] * HEAD_DIM + d[None, None, :],
                    mask=smask[:, :, None] & dmask[None, None, :], other=0.0,
                    cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * o, axis=1)
    res = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    tl.store(out_ptr + out_offs[:, None] + d[None, :], res.to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & dmask[None, :])


@triton.jit
def _merge_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_ob, stride_oh, num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    S_CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if USE_PDL:
        gdc_wait()  # launched early (programmatic dependent launch): wait for the partials
    one = tl.arange(0, 1)
    _merge_heads(mid_o_ptr, mid_lse_ptr, out_ptr, b * num_heads + h + one,
                 b.to(tl.int64) * stride_ob + h * stride_oh + one, one == 0, num_splits,
                 HEAD_DIM, BLOCK_D, 1, BLOCK_S, S_CHUNK)


def decode_attention_out(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, out: torch.Tensor,
    cfg: DecodeConfig = DecodeConfig(),
) -> torch.Tensor:
    """paged_decode_attention writing into ``out`` [B, Hq, D], with an explicit launch
    config (the benchmark's tuning and the tests' forced split/non-split paths use it)."""
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert kv_cache.stride(-1) == 1 and out.stride(-1) == 1
    page = kv_cache.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    if cfg.num_splits is not None:
        splits = max(1, min(cfg.num_splits, MAX_SPLITS))
    else:
        splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * page,
                                   sm_count(q.device), cfg)
    upcast = q.device.type != "cuda"  # the interpreter's dot on bf16 is wrong: use fp32
    # (The interpreter has no grid dependency control.)
    pdl = cfg.pdl and not upcast and batch * num_heads <= sm_count(q.device)
    tiles_per_split = triton.cdiv(block_tables.shape[1] * page, splits * cfg.split_block_n)
    split_stages = 1 if tiles_per_split <= 1 else cfg.split_num_stages
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    block_h = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(head_dim)
    if splits > 1:
        mid_o = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32,
                            device=q.device)
        mid_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused
    split = splits > 1
    merge = split and cfg.merge_in_kernel and batch * num_kv_heads <= MAX_TICKETS
    tickets = _tickets(q.device) if merge else out  # unused unless merging in-kernel
    chain = cfg.pdl_chain and not upcast and (merge or not split)
    block_s = triton.next_power_of_2(splits)
    s_chunk = min(block_s, cfg.merge_chunk)
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, kv_cache, block_tables, context_lens, out, mid_o, mid_lse, tickets,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        splits, block_tables.shape[1],
        GROUP=group, BLOCK_H=block_h, BLOCK_N=cfg.split_block_n if split else cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page, SPLIT=split,
        INTERLEAVE=cfg.interleave and split, UPCAST=upcast, PRECISION=precision,
        EVEN_D=block_d == head_dim, USE_PDL=pdl and split and not merge,
        MERGE=merge, MERGE_H=triton.next_power_of_2(group), BLOCK_S=block_s, S_CHUNK=s_chunk,
        PDL_CHAIN=chain, num_warps=cfg.split_num_warps if split else cfg.num_warps,
        num_stages=split_stages if split else cfg.num_stages,
        **({"launch_pdl": True} if chain else {}),
    )
    if split and not merge:
        _merge_kernel[(batch, num_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1), num_heads, splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, S_CHUNK=s_chunk,
            USE_PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}),
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return decode_attention_out(q, kv_cache, block_tables, context_lens, scale,
                                torch.empty_like(q))
