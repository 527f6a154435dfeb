"""Paged attention for CPU serving: a batch's decodes in one fused attention call.

What the serving path runs on CPU (kernels.reference stays the definition they are tested
against). Per layer: single-token sequences gather their K/V from the paged cache once,
into a padded batch, and go through one ``scaled_dot_product_attention`` call (GQA
without repeating K/V);
prefill chunks are attended one sequence at a time with causal SDPA and native GQA,
reading the step's own K/V when the sequence has no cached prefix. PyTorch's CPU
attention kernel accumulates in float32 whatever the input dtype.

The plan (gather indices, masks) is made once per step by kernels.cpu_step.plan_step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_native
from kernels.cpu_step import CpuStepPlan, DecodeGroup, PrefillSeq, plan_step


def _gather(kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """K and V of the given cache slots: [2, len(slots), Hk, D]."""
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    return flat.index_select(1, slots)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, g: DecodeGroup, scale: float
            ) -> torch.Tensor:
    """q: [n, Hq, D] -> [n, Hq, D]."""
    if g.gather is None or g.mask is None:  # planned for the native kernel
        return cpu_native.paged_decode_attention(q, kv_cache, g.tables, g.context, scale)
    n, hq, d = q.shape
    hk = kv_cache.shape[3]
    kv = _gather(kv_cache, g.gather).view(2, n, g.length, hk, d).transpose(2, 3)
    # Keys [n, Hk, L, D]; the mask [n, 1, 1, L] hides each sequence's padding. Each KV
    # head's query heads are folded into the query length ([n, Hk, G, D]) rather than
    # left to the kernel's enable_gqa: the same result, 3-5x faster in bf16 (in fp32 within
    # 1.4x either way; torch 2.13 CPU: bench/cpu_attention_shapes.py).
    out = F.scaled_dot_product_attention(q.reshape(n, hk, hq // hk, d), kv[0], kv[1],
                                         attn_mask=g.mask, scale=scale)
    return out.reshape(n, hq, d)


def _prefill(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
             kv_cache: torch.Tensor, p: PrefillSeq, scale: float) -> torch.Tensor:
    """One sequence's queries q [n, Hq, D] -> [n, Hq, D]."""
    if p.mask is None and k is not None and v is not None:
        keys, values = k[p.start:p.end], v[p.start:p.end]  # no cached prefix: no gather
    else:
        assert p.gather is not None
        keys, values = _gather(kv_cache, p.gather).unbind(0)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0), attn_mask=p.mask, is_causal=p.mask is None,
        scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                    kv_cache: torch.Tensor, plan: CpuStepPlan, scale: float) -> torch.Tensor:
    """Attention of every new token of a step: q [T, Hq, D] -> [T, Hq, D].

    kv_cache already holds the step's K/V. k, v [T, Hk, D]: the step's own keys and values
    (after RoPE), read directly for prefills without a cached prefix; None: read the cache.
    """
    g = plan.decode
    if g is not None and not plan.prefills and isinstance(g.rows, slice) \
            and g.num_seqs == plan.num_tokens:
        return _decode(q, kv_cache, g, scale)  # a pure decode step: no copy into an output
    out = q.new_empty(q.shape)
    if g is not None:
        q_dec = q[g.rows] if isinstance(g.rows, slice) else q.index_select(0, g.rows)
        out[g.rows] = _decode(q_dec, kv_cache, g, scale)
    for p in plan.prefills:
        if p.gather is None:  # planned for the native kernel: it writes into out's rows
            cpu_native.paged_prefill_attention(q[p.start:p.end], kv_cache, p.table, p.context,
                                               scale, out[p.start:p.end])
        else:
            out[p.start:p.end] = _prefill(q[p.start:p.end], k, v, kv_cache, p, scale)
    return out


# -- the reference kernels' signatures (tests compare these with kernels.reference) -------

def _plan(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
          cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, native: bool | None
          ) -> CpuStepPlan:
    t = q.shape[0]
    positions = torch.zeros(t, dtype=torch.int64)  # RoPE tables are not used here
    return plan_step(positions, torch.zeros(1, q.shape[2]), torch.zeros(t, dtype=torch.int64),
                     block_tables, context_lens, cu_seqlens_q, kv_cache.shape[2], q.dtype,
                     cpu_native.serves(kv_cache) if native is None else native)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           native: bool | None = None) -> torch.Tensor:
    """kernels.reference.paged_decode_attention, served by the CPU kernels (``native``:
    force the C kernel or the torch path; None: the C kernel where it is built)."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_attention(q, None, None, kv_cache,
                           _plan(q, kv_cache, block_tables, cu, context_lens, native), scale)


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, native: bool | None = None) -> torch.Tensor:
    """kernels.reference.paged_prefill_attention, served by the CPU kernels (K/V read from
    the cache for every sequence; ``native`` as for decode, for the decodes of a mix)."""
    return paged_attention(q, None, None, kv_cache,
                           _plan(q, kv_cache, block_tables, cu_seqlens_q, context_lens,
                                 native), scale)
