"""The sampler as it was before the vectorized rewrite (commit 121b7b6), kept unchanged
(lint aside) as the baseline of bench/sampler_bench.py: one Python iteration per sequence,
a torch.Generator per sampled token. Not used by pdserve itself.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from engine.sequence import Sequence, TokenLogprob


def draw_seed(seed: int, index: int, position: int) -> int:
    digest = hashlib.blake2b(struct.pack("<qqq", seed, index, position), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def apply_penalties(row: torch.Tensor, seq: Sequence, eos_ids: list[int]) -> torch.Tensor:
    p = seq.params
    out_ids = seq.output_token_ids
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                vals * p.repetition_penalty)
    if out_ids and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        counts = torch.bincount(torch.tensor(out_ids, device=row.device),
                                minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    if seq.num_output_tokens < p.min_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    return row


def filter_logits(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k, top-p and min-p exclude."""
    if top_k > 0 and top_k < row.shape[0]:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return row


def needs_processing(seq: Sequence) -> bool:
    p = seq.params
    return (not p.greedy or p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
            or p.presence_penalty != 0.0 or seq.num_output_tokens < p.min_tokens)


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]
           ) -> list[tuple[int, TokenLogprob | None]]:
    """logits: [len(seqs), vocab] float32, one row per sequence to sample for."""
    greedy_ids = torch.argmax(logits, dim=-1).tolist()
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    results: list[tuple[int, TokenLogprob | None]] = []
    for i, seq in enumerate(seqs):
        token = greedy_ids[i]
        if needs_processing(seq):
            p = seq.params
            row = apply_penalties(logits[i].clone(), seq, eos_ids)
            if p.greedy:
                token = int(torch.argmax(row))
            else:
                row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
                probs = torch.softmax(row, dim=-1)
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(draw_seed(seq.seed, seq.index, seq.num_output_tokens))
                token = int(torch.multinomial(probs, 1, generator=gen))
        lp = None
        if raw_logprobs is not None and seq.params.logprobs is not None:
            lp = token_logprob(raw_logprobs[i], token, seq.params.logprobs)
        results.append((token, lp))
    return results


def token_logprob(logprobs_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = torch.topk(logprobs_row, k)
        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(logprobs_row[token]), top=top)
