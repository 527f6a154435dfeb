"""What the sampler does to a batch's logits before drawing: repetition, frequency and
presence penalties, the min_tokens ban of EOS and stop tokens, and grammar bitmasks -- each
a fixed number of batched scatters or masks, whatever the batch (engine.sampler draws).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from engine.device import to_device
from engine.sequence import Sequence
from kernels import ops

_NEG_INF = float("-inf")
# Penalties may push a logit to +-inf (a repetition penalty of 1e-40 or 1e38): clamped to
# this, a logit divided by any temperature >= SAMPLING_EPS stays below float32's 3.4e38.
LOGIT_BOUND = 1e30


def _flat_positions(rows: list[int], lists: list[list[int]], vocab: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Positions row * vocab + token in a flattened [batch, vocab] for every token of each
    row's list (duplicates kept), and the index into ``rows`` each position came from;
    built with numpy, not per element."""
    tokens: list[int] = []
    for ids in lists:
        tokens.extend(ids)
    owner = np.repeat(np.arange(len(rows)), [len(ids) for ids in lists])
    flat = np.asarray(rows, dtype=np.int64)[owner] * vocab + np.asarray(tokens, dtype=np.int64)
    return flat, owner


def _to(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.from_numpy(array).to(dtype), device)


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: Seq[int]) -> None:
    """In place on [len(seqs), vocab]: repetition (prompt and output tokens), frequency and
    presence (output tokens) penalties, the result clamped to +-LOGIT_BOUND.

    Only the logits of the tokens concerned are touched: token lists are flattened on the
    host, and on the device each kind is a gather and a scatter over those positions. A
    token listed twice needs no deduplication: the repetition and presence scatters write
    the same value for every copy of a position, and frequency accumulates per occurrence.
    """
    vocab = logits.shape[1]
    dev = logits.device
    rep_rows: list[int] = []
    rep_lists: list[list[int]] = []
    rep: list[float] = []
    out_rows: list[int] = []
    out_lists: list[list[int]] = []
    freq: list[float] = []
    pres: list[float] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            rep_rows.append(i)
            rep_lists.append(seq.token_ids)
            rep.append(p.repetition_penalty)
        if seq.num_output_tokens and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
            out_rows.append(i)
            out_lists.append(seq.output_token_ids)
            freq.append(p.frequency_penalty)
            pres.append(p.presence_penalty)
    flat = logits.view(-1)
    if rep_rows:
        at, owner = _flat_positions(rep_rows, rep_lists, vocab)
        index = _to(at, torch.int64, dev)
        r = _to(np.asarray(rep, dtype=np.float32)[owner], logits.dtype, dev)
        vals = flat.index_select(0, index)
        flat.index_copy_(0, index, torch.where(vals > 0, vals / r, vals * r))
    if out_rows:
        at, owner = _flat_positions(out_rows, out_lists, vocab)
        index = _to(at, torch.int64, dev)
        if any(pres):
            pr = _to(np.asarray(pres, dtype=np.float32)[owner], logits.dtype, dev)
            flat.index_copy_(0, index, flat.index_select(0, index) - pr)
        if any(freq):
            fr = _to(np.asarray(freq, dtype=np.float32)[owner], logits.dtype, dev)
            flat.index_add_(0, index, -fr)
    logits.clamp_(-LOGIT_BOUND, LOGIT_BOUND)


def apply_min_tokens_ban(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: Seq[int]) -> None:
    """In place: -inf on eos and the stop token ids of rows that have not yet produced
    their min_tokens."""
    vocab = logits.shape[1]
    ban_rows: list[int] = []
    ban_lists: list[list[int]] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            ban_rows.append(i)
            ban_lists.append(sorted(set(p.stop_token_ids)
                                    | (set() if p.ignore_eos else set(eos_ids))))
    if ban_rows:
        at, _ = _flat_positions(ban_rows, ban_lists, vocab)
        logits.view(-1).index_fill_(0, _to(at, torch.int64, logits.device), _NEG_INF)


def revive_dead_rows(logits: torch.Tensor, before: torch.Tensor,
                      bitmask: torch.Tensor | None, banned: bool) -> None:
    """In place: a row the ban and the mask left without a single allowed token gets its
    logits from before the ban (the grammar's mask kept), else from before both.

    Why: when every token the grammar allows (or the whole vocabulary) is a stop token,
    min_tokens cannot be met by a non-stop token. Sampling among the stop tokens keeps the
    length promise -- the engine does not end a sequence on a stop token before its
    min_tokens -- where an all -inf row would make NaN probabilities. A grammar that allows
    nothing at all is its own error: the row is sampled unmasked and the grammar refuses
    the token. No host sync: torch.where over every row.
    """
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    fallback = before
    if bitmask is not None and banned:
        masked = before.clone()
        apply_bitmask(masked, bitmask)
        fallback = torch.where(torch.isneginf(masked).all(dim=-1, keepdim=True), before, masked)
    logits.copy_(torch.where(dead, fallback, logits))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf wherever the row's bit is clear. bitmask: [batch, ceil(vocab / 32)]
    int32 on logits' device (llguidance/xgrammar layout: token t is bit t % 32 of word
    t // 32). One Triton launch on a GPU, one C pass on the CPU (kernels.ops)."""
    ops.apply_token_bitmask(logits, bitmask)


def open_empty_rows(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The mask with every bit set in the rows that allow no token below ``vocab``.

    Such a row (a grammar that allows nothing) is sampled unmasked and the grammar then
    refuses the token, as ``revive_dead_rows`` does; found on the [batch, vocab / 32]
    words instead of on the logits, so the common case (no min_tokens ban) needs no copy
    of the logits and no pass over them."""
    full, rest = divmod(vocab, 32)
    allows = (bitmask[:, :full] != 0).any(dim=1)
    if rest:
        allows |= (bitmask[:, full] & ((1 << rest) - 1)) != 0
    return bitmask.masked_fill(~allows.unsqueeze(1), -1)
