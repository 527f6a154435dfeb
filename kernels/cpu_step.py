"""The per-step plan of the CPU serving kernels: everything that depends on the batch's
shape and not on the layer, computed once per forward and shared by every layer.

On a CPU a small model's step is dominated by the fixed cost of each operator call (a few
microseconds each), not by arithmetic, so what can be computed once per step is: the RoPE
tables of the step's positions, the cache slots, and for attention the gather indices and
masks. Single-token sequences (decodes) form one padded batch; longer ones (prefill
chunks) are attended one by one, reading the step's own K/V directly when nothing of the
sequence was cached before.

Padded positions of the decode batch gather the sequence's own first token (masked out):
they never read a slot the sequence does not own, so stale or non-finite bytes left in
other blocks cannot reach the result (-inf masking alone does not stop a NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DecodeGroup:
    """The sequences with one new token, attended as one padded batch."""

    rows: slice | torch.Tensor  # their rows in the flat batch (a slice when contiguous)
    num_seqs: int
    length: int  # the longest context among them: the padded key length
    tables: torch.Tensor  # [num_seqs, max_blocks] int32, contiguous (the native kernel's)
    context: torch.Tensor  # [num_seqs] int32
    # for the torch path only (None when the native kernel serves, kernels.cpu_native):
    gather: torch.Tensor | None  # [num_seqs * length] int64 slots, padding -> own first
    mask: torch.Tensor | None  # [num_seqs, 1, 1, length] additive (0 or -inf), model dtype


@dataclass(slots=True)
class PrefillSeq:
    """A sequence with several new tokens (rows ``start:end`` of the flat batch)."""

    start: int
    end: int
    context: int  # tokens after this step; the queries are its last end - start
    table: torch.Tensor  # its block-table row, int32, contiguous (the native kernel's)
    # for the torch path only (gather None: the native kernel serves, kernels.cpu_native):
    gather: torch.Tensor | None  # [context] int64 cache slots of all its tokens
    mask: torch.Tensor | None  # [end - start, context] additive; None: no cached prefix,
    # so plain causal attention over the step's own K/V (which need no gather)


@dataclass(slots=True)
class CpuStepPlan:
    num_tokens: int
    cos: torch.Tensor  # [T, 1, D] cos of each token's position, twice (model dtype)
    sin: torch.Tensor  # [T, 1, D] -sin then +sin: rotate-half folded into the sign
    slots: torch.Tensor  # [T'] int64 cache slot of each token written (T' <= T)
    slot_rows: torch.Tensor | None  # the rows those are (None: every row, in order)
    decode: DecodeGroup | None
    prefills: list[PrefillSeq]
    # whether RoPE + KV write run in C this step (cpu_native.rope_fits): decided at the
    # first layer, since every layer passes alike tensors (None: not yet)
    native_rope: bool | None = None


def _rope_tables(positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())  # float32, as HF computes it
    cos, sin = cs[:, :half], cs[:, half:]
    # Cast after concatenating, as HF casts cos/sin to the activations' dtype: the same
    # rounding, so bf16 RoPE equals HF's bit for bit.
    return (torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1),
            torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1))


def _slots_of(table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length)
    return table_row.long().index_select(0, pos // block_size) * block_size + pos % block_size


def _decode_group(rows: list[int], seqs: list[int], lens: list[int],
                  block_tables: torch.Tensor, block_size: int, dtype: torch.dtype,
                  native: bool) -> DecodeGroup:
    n = len(seqs)
    length = max(lens[i] for i in seqs)
    tables = block_tables if n == block_tables.shape[0] else \
        block_tables.index_select(0, torch.tensor(seqs))
    ctx = torch.tensor([lens[i] for i in seqs], dtype=torch.int32)
    row_index: slice | torch.Tensor = slice(rows[0], rows[0] + n) \
        if rows == list(range(rows[0], rows[0] + n)) else torch.tensor(rows)
    native_tables = tables.to(torch.int32).contiguous()
    if native:
        return DecodeGroup(row_index, n, length, native_tables, ctx, None, None)
    pos = torch.arange(length)
    slots = tables.long().index_select(1, pos // block_size) * block_size + pos % block_size
    valid = pos[None, :] < ctx[:, None]
    slots = torch.where(valid, slots, slots[:, :1])
    mask = torch.zeros(n, 1, 1, length, dtype=dtype).masked_fill_(
        ~valid[:, None, None, :], float("-inf"))
    return DecodeGroup(row_index, n, length, native_tables, ctx, slots.flatten(), mask)


def _prefill_seq(start: int, end: int, context: int, table_row: torch.Tensor,
                 block_size: int, dtype: torch.dtype, native: bool) -> PrefillSeq:
    n = end - start
    table = table_row.to(torch.int32).contiguous()
    if native:
        return PrefillSeq(start, end, context, table, None, None)
    slots = _slots_of(table_row, context, block_size)
    if context == n:  # no cached prefix: its K/V are all in this step's batch
        return PrefillSeq(start, end, context, table, slots, None)
    q_pos = torch.arange(context - n, context)[:, None]
    mask = torch.zeros(n, context, dtype=dtype).masked_fill_(
        torch.arange(context)[None, :] > q_pos, float("-inf"))
    return PrefillSeq(start, end, context, table, slots, mask)


def plan_step(positions: torch.Tensor, cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor,
              block_tables: torch.Tensor, context_lens: torch.Tensor,
              cu_seqlens_q: torch.Tensor, block_size: int, dtype: torch.dtype,
              native: bool = False) -> CpuStepPlan:
    """The plan for one forward over a flat batch (the arguments of the reference kernels:
    see kernels.reference.paged_prefill_attention). ``native``: attention will run
    kernels.cpu_native's kernels, which read the block tables themselves (no gather plan)."""
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    cos, sin = _rope_tables(positions, cos_sin_cache, dtype)
    slots = slot_mapping.long()
    slot_rows = None
    if len(lens) and int(slots.min()) < 0:  # padding tokens write nothing
        slot_rows = torch.nonzero(slots >= 0).flatten()
        slots = slots.index_select(0, slot_rows)
    dec_rows: list[int] = []
    dec_seqs: list[int] = []
    prefills: list[PrefillSeq] = []
    for i, length in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        if end - start == 1:
            dec_rows.append(start)
            dec_seqs.append(i)
        elif end > start:
            prefills.append(_prefill_seq(start, end, length, block_tables[i], block_size, dtype,
                                         native))
    decode = _decode_group(dec_rows, dec_seqs, lens, block_tables, block_size, dtype,
                           native) if dec_seqs else None
    return CpuStepPlan(cu[-1] if cu else 0, cos, sin, slots, slot_rows, decode, prefills)
