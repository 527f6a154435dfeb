"""Plain-torch references of every kernel: the definition of what each computes.

Each function here has exactly the signature of its Triton twin (kernels/triton_*.py).
They run on any device and are what the CPU path uses. Numerics follow HF transformers'
Llama code (RMSNorm in float32, rotate-half RoPE) so that greedy tokens match it.

KV cache per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (engine.kv_layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32."""
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``: the normed input of the next
    sub-layer and the new residual stream."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (GPT-NeoX style) RoPE, as HF Llama applies it.

    q: [T, Hq, D], k: [T, Hk, D], positions: [T] (int), cos_sin_cache: [max_pos, D]
    holding cos(pos * inv_freq) in its first D/2 columns and sin in its last D/2.
    Writes the result into q and k (in place) and returns them.
    """
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1).unsqueeze(1).to(q.dtype)
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1).unsqueeze(1).to(q.dtype)
    q_out = (q * cos) + (_rotate_half(q) * sin)
    k_out = (k * cos) + (_rotate_half(k) * sin)
    q.copy_(q_out)
    k.copy_(k_out)
    return q, k


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x @ weight^T + bias: x [M, K], weight [N, K] (HF's nn.Linear layout)."""
    return F.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2*I] holding gate then up; returns silu(gate) * up, [T, I]."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf wherever the row's bit is clear. bitmask [batch, >= ceil(vocab/32)]
    int32, token t = bit t % 32 of word t // 32 (llguidance's and xgrammar's layout)."""
    t = torch.arange(logits.shape[1], device=logits.device)
    bits = (bitmask[:, t // 32] >> (t % 32)) & 1
    logits.masked_fill_(bits == 0, float("-inf"))


def _plain_logits(logits: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
    """float64 logits with the mask's banned tokens at -inf; a row whose mask allows no
    token below the vocabulary size keeps all of them (it is drawn unmasked)."""
    x = logits.double()
    if bitmask is not None:
        masked = x.clone()
        apply_token_bitmask(masked, bitmask)
        x = torch.where(torch.isneginf(masked).all(dim=-1, keepdim=True), x, masked)
    return x


def _plain_cdf(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    scale = torch.where(temperature == 0, 1.0, temperature).double().unsqueeze(1)
    return torch.cumsum(torch.softmax(x / scale, dim=-1), dim=-1)


def sample_plain(logits: torch.Tensor, bitmask: torch.Tensor | None,
                 temperature: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """[2, rows] int64: each row's token and whether its logits hold NaN. A row of
    temperature 0 takes the first maximum; the others the first token whose cumulative
    probability (in token order, float64 here) exceeds ``uniform`` x the total."""
    x = _plain_logits(logits, bitmask)
    cdf = _plain_cdf(x, temperature)
    target = (uniform.double() * cdf[:, -1]).unsqueeze(1)
    drawn = torch.searchsorted(cdf, target, right=True).clamp(max=x.shape[1] - 1).squeeze(1)
    tokens = torch.where(temperature == 0, x.argmax(dim=-1), drawn)
    return torch.stack([tokens, torch.isnan(logits).any(dim=-1).long()])


def distance_to_cdf_step(logits: torch.Tensor, bitmask: torch.Tensor | None,
                         temperature: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """[rows] float64: how far ``uniform`` x the total lies from the nearest step of the
    row's CDF, relative to the total: within float32 rounding of it, two correct
    implementations may draw neighbouring tokens."""
    cdf = _plain_cdf(_plain_logits(logits, bitmask), temperature)
    target = (uniform.double() * cdf[:, -1]).unsqueeze(1)
    return (cdf - target).abs().min(dim=-1).values / cdf[:, -1]


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter key/value [T, Hk, D] into their slots (block_id * block_size + offset).
    A negative slot marks a padding token and is skipped."""
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))


def _gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ``length`` tokens, [length, Hk, D] each."""
    block_size = kv_cache.shape[2]
    nblocks = (length + block_size - 1) // block_size
    blocks = block_table[:nblocks].long()
    k = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:length]
    v = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:length]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            q_start: int) -> torch.Tensor:
    """q: [n, Hq, D] at positions q_start..q_start+n-1; k, v: [L, Hk, D]. Causal."""
    n, hq, _ = q.shape
    length, hk, _ = k.shape
    group = hq // hk
    qh = q.transpose(0, 1).float()  # [Hq, n, D]
    kh = k.transpose(0, 1).float().repeat_interleave(group, dim=0)  # [Hq, L, D]
    vh = v.transpose(0, 1).float().repeat_interleave(group, dim=0)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale  # [Hq, n, L]
    q_pos = torch.arange(q_start, q_start + n, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vh).transpose(0, 1).to(q.dtype)  # [n, Hq, D]


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to its whole context in the paged cache.

    q: [B, Hq, D]; block_tables: [B, max_blocks] (int32); context_lens: [B] (int32),
    the number of cached tokens each query attends to (its own included).
    Returns [B, Hq, D].
    """
    out = torch.empty_like(q)
    for i, length in enumerate(context_lens.tolist()):
        k, v = _gather_kv(kv_cache, block_tables[i], length)
        out[i] = _attend(q[i : i + 1], k, v, scale, q_start=length - 1)[0]
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a ragged batch of new tokens over a paged cache that already
    holds every sequence's cached prefix *and* the new tokens' K/V.

    q: [T, Hq, D] (sequences concatenated); cu_seqlens_q: [B+1] (int32) offsets into q;
    context_lens: [B] (int32), total tokens of each sequence after this step. Sequence i's
    queries sit at positions context_lens[i] - q_len_i .. context_lens[i] - 1.
    Returns [T, Hq, D].
    """
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for i, length in enumerate(context_lens.tolist()):
        start, end = cu[i], cu[i + 1]
        if end == start:
            continue
        k, v = _gather_kv(kv_cache, block_tables[i], length)
        out[start:end] = _attend(q[start:end], k, v, scale, q_start=length - (end - start))
    return out
