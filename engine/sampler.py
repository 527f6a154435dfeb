"""Sampler: turns one step's logits into one token per sequence, for the whole batch at once.

A batch costs a fixed number of tensor operations whatever its size: per-row parameters
(temperature, top-k/p, min-p, penalties, seeds) travel to the device as two small tensors,
penalties and the grammar bitmask are applied with batched scatters and masks, and every
row is drawn by inverse-CDF sampling from one uniform per row. Nothing loops over the
sequences on the device, and no ``torch.Generator`` is made per token. On a GPU, rows that
are greedy or temperature-only (mask included) are drawn by kernels.triton_sampler in two
launches; which path draws a row depends on the row alone.

Randomness is counter-based: the uniform behind a sequence's k-th output token is a hash
of (request seed, sequence index, k) computed on the host with exact 64-bit integer
arithmetic (numpy, wrapping by definition). So a seeded request gives the same tokens
whether it ran colocated, was preempted and recomputed, shared its batch with anything
else, or had its first token sampled on a prefill pod and the rest on a decode pod.

Any parameters SamplingParams accepts sample sanely: a temperature below SAMPLING_EPS is
greedy; penalised logits are clamped (engine.logits_processors), so no temperature makes
them inf and no softmax NaN; a row that min_tokens' ban (and a grammar) leaves with no
token at all falls back (``revive_dead_rows`` there). A row whose model logits hold NaN
raises ``RowSamplingError`` naming it, so the engine fails that request alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.counter_uniforms import counter_uniforms
from engine.device import to_device
from engine.errors import PdserveError
from engine.logits_processors import (
    apply_bitmask,
    apply_min_tokens_ban,
    apply_penalties,
    open_empty_rows,
    revive_dead_rows,
)
from engine.sampling_params import SAMPLING_EPS
from engine.sequence import Sequence, TokenLogprob
from kernels import ops

log = logging.getLogger(__name__)
_NEG_INF = float("-inf")


class RowSamplingError(PdserveError):
    """Rows of a batch that cannot be sampled (their model logits hold NaN)."""

    def __init__(self, message: str, rows: list[int], tokens: list[int] | None = None
                 ) -> None:
        super().__init__(message)
        self.rows = rows
        self.tokens = tokens  # every row's token (those of ``rows`` meaningless)


class TokenMasks(Protocol):
    """Allowed-token bitmasks for the rows of a batch (engine.structured_output)."""

    def bitmask(self, seqs: Seq[Sequence], device: torch.device) -> torch.Tensor | None:
        """[len(seqs), ceil(vocab / 32)] int32, bit t of a row set = token t allowed
        (unconstrained rows all ones); None when no row is constrained. The rows may
        still be being written when it returns if the device waits for them."""
        ...

    def settle(self) -> list[int]:
        """Before the draw's tokens are read: the rows (of ``bitmask``'s ``seqs``) whose
        masks could not be made, so whose tokens must not be used."""
        ...


@dataclass(slots=True)
class _Rows:
    """The batch's per-row parameters, gathered on the host in one pass."""

    temperature: list[float]
    top_k: list[int]  # vocab when off
    top_p: list[float]
    min_p: list[float]
    uniform: np.ndarray
    any_random: bool
    any_top_p: bool
    any_min_p: bool
    # every sampled row has a top-k: draw among the max top-k candidates only
    candidates: int | None
    # sampled rows with a top-k, top-p or min-p: their CDF runs in descending order
    filtered: list[bool]
    any_penalty: bool
    any_min_tokens: bool
    # greedy or temperature-only rows without a min_tokens ban this step: on a GPU they
    # are drawn by kernels.triton_sampler (same draw, two launches), whatever their batch
    plain: list[bool]

    @classmethod
    def of(cls, seqs: Seq[Sequence], vocab: int) -> _Rows:
        # one pass (this runs on the host for every step, on a GPU between launches)
        temps: list[float] = []
        top_k: list[int] = []
        top_p: list[float] = []
        min_p: list[float] = []
        filtered: list[bool] = []
        plain: list[bool] = []
        outputs: list[int] = []
        sampled_k: list[int] = []
        any_top_p = any_min_p = any_penalty = any_min_tokens = False
        for seq in seqs:
            p = seq.params
            # below the epsilon: exactly greedy, on the host and on the device alike
            t = p.temperature if p.temperature >= SAMPLING_EPS else 0.0
            k = p.top_k if 0 < p.top_k < vocab else vocab
            n = seq.num_output_tokens
            banned = n < p.min_tokens
            f = False
            if t > 0.0:
                sampled_k.append(k)
                any_top_p |= p.top_p < 1.0
                any_min_p |= p.min_p > 0.0
                f = k < vocab or p.top_p < 1.0 or p.min_p > 0.0
            any_penalty |= (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                            or p.presence_penalty != 0.0)
            any_min_tokens |= banned
            temps.append(t)
            top_k.append(k)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            filtered.append(f)
            plain.append(not f and not banned)
            outputs.append(n)
        any_random = bool(sampled_k)
        return cls(
            temperature=temps, top_k=top_k, top_p=top_p, min_p=min_p,
            uniform=counter_uniforms([s.seed for s in seqs], [s.index for s in seqs], outputs)
            if any_random else np.zeros(len(seqs), dtype=np.float32),
            any_random=any_random, any_top_p=any_top_p, any_min_p=any_min_p,
            candidates=max(sampled_k) if sampled_k and max(sampled_k) < vocab else None,
            filtered=filtered, any_penalty=any_penalty, any_min_tokens=any_min_tokens,
            plain=plain)


def _device_list(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def _top_p_keep(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """On probabilities sorted in descending order: a token is dropped when the mass before
    it already reaches top_p (so at least one is kept)."""
    return (torch.cumsum(probs, dim=-1) - probs) < top_p.unsqueeze(1)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative mass exceeds u * total ([batch, 1]). A
    position of zero probability never starts a new step of the CDF, so it is never picked
    (except past the end by rounding, which the caller checks)."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)


def _draw_sorted(scaled: torch.Tensor, rows: _Rows, uniform: torch.Tensor,
                 top_p: torch.Tensor, min_p: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row drawn over its tokens in descending order, after its top-k, min-p and
    top-p: (tokens [batch, 1], whether the drawn position had mass [batch, 1])."""
    dev = scaled.device
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    if rows.any_top_p or any(k < scaled.shape[1] for k in rows.top_k):
        top_k = _device_list(rows.top_k, torch.int64, dev)
        floor = ordered.gather(1, (top_k - 1).unsqueeze(1))
        if rows.any_min_p:
            floor = torch.maximum(floor, ordered[:, :1] + torch.log(min_p).unsqueeze(1))
        if rows.any_top_p:
            kept = torch.softmax(ordered.masked_fill(ordered < floor, _NEG_INF), dim=-1)
            count = _top_p_keep(kept, top_p).sum(dim=-1, keepdim=True).clamp(min=1)
            floor = torch.maximum(floor, ordered.gather(1, count - 1))
        ordered = ordered.masked_fill(ordered < floor, _NEG_INF)
    elif rows.any_min_p:
        floor = ordered[:, :1] + torch.log(min_p).unsqueeze(1)
        ordered = ordered.masked_fill(ordered < floor, _NEG_INF)
    probs = torch.softmax(ordered, dim=-1)
    at = _inverse_cdf(probs, uniform)
    return order.gather(1, at), probs.gather(1, at) > 0


def _draw(logits: torch.Tensor, rows: _Rows, greedy: torch.Tensor) -> torch.Tensor:
    """Tokens for every row: greedy rows keep ``greedy``; the others sample, after
    temperature, top-k, then min-p (relative to the best token), then top-p."""
    dev = logits.device
    floats = torch.tensor(np.stack([np.asarray(rows.temperature, dtype=np.float32),
                                    np.asarray(rows.top_p, dtype=np.float32),
                                    np.asarray(rows.min_p, dtype=np.float32),
                                    rows.uniform]), dtype=torch.float32)
    floats = to_device(floats, dev)
    temperature, top_p, min_p, uniform = floats[0], floats[1], floats[2], floats[3]
    is_greedy = temperature == 0.0
    scaled = logits / torch.where(is_greedy, 1.0, temperature).unsqueeze(1)
    if rows.candidates is not None:
        drawn, ok = _draw_candidates(scaled, rows, uniform, top_p, min_p)
    else:
        drawn, ok = _draw_full(scaled, rows, uniform, top_p, min_p)
    # rounding at the very top of the CDF (or a row with nothing allowed): the argmax
    drawn = torch.where(ok, drawn, greedy.unsqueeze(1)).squeeze(1)
    return torch.where(is_greedy, greedy, drawn)


def _draw_candidates(scaled: torch.Tensor, rows: _Rows, uniform: torch.Tensor,
                     top_p: torch.Tensor, min_p: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sampled row keeps at most k tokens: one top-k pass over the vocabulary, then
    everything else happens on [batch, k] (already sorted, descending)."""
    dev = scaled.device
    k = rows.candidates
    assert k is not None
    values, ids = torch.topk(scaled, k, dim=-1)
    top_k = _device_list(rows.top_k, torch.int64, dev)
    drop = torch.arange(k, device=dev).unsqueeze(0) >= top_k.unsqueeze(1)
    if rows.any_min_p:
        drop |= values < values[:, :1] + torch.log(min_p).unsqueeze(1)
    probs = torch.softmax(values.masked_fill(drop, _NEG_INF), dim=-1)
    if rows.any_top_p:
        probs = probs * _top_p_keep(probs, top_p)
    at = _inverse_cdf(probs, uniform)
    return ids.gather(1, at), probs.gather(1, at) > 0


def _draw_full(scaled: torch.Tensor, rows: _Rows, uniform: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the whole vocabulary. A filtered row's CDF runs over its tokens in descending
    order, as top-k's does (its token for a given uniform must not depend on which path its
    batch took); an unfiltered row's runs in token order, the same whatever its batch, and
    needs no sort of the vocabulary (at 128k tokens the sort was most of a CPU step)."""
    sampled = [t > 0.0 for t in rows.temperature]
    want_sorted = any(rows.filtered)
    want_plain = any(s and not f for s, f in zip(sampled, rows.filtered, strict=True))
    if want_sorted:
        drawn_sorted, ok_sorted = _draw_sorted(scaled, rows, uniform, top_p, min_p)
        if not want_plain:
            return drawn_sorted, ok_sorted
    probs = torch.softmax(scaled, dim=-1)
    drawn = _inverse_cdf(probs, uniform)
    ok = probs.gather(1, drawn) > 0
    if not want_sorted:
        return drawn, ok
    pick = _device_list(rows.filtered, torch.bool, scaled.device).unsqueeze(1)
    return torch.where(pick, drawn_sorted, drawn), torch.where(pick, ok_sorted, ok)


@dataclass(slots=True)
class DrawnTokens:
    """A batch's tokens, drawn on the device and on their way to the host.

    ``tokens`` can feed the next step's inputs at once (engine.step_pipeline); ``result``
    waits for the host copy."""

    tokens: torch.Tensor  # [rows] int64, on the logits' device
    host: torch.Tensor  # [2, rows]: the tokens and a NaN flag per row (pinned on a GPU)
    ready: torch.cuda.Event | None  # recorded after the copy to ``host`` (GPU only)
    raw_logprobs: torch.Tensor | None
    want: list[int | None]  # each row's logprobs count (None: none)
    masks: TokenMasks | None = None

    def result(self) -> list[tuple[int, TokenLogprob | None]]:
        """The tokens (and logprobs); raises RowSamplingError, naming the rows, if the
        model's logits of some rows hold NaN or their grammar masks failed (the other rows'
        tokens are in it: a row is drawn the same whatever else is in its batch)."""
        no_mask = self.masks.settle() if self.masks is not None else []
        if self.ready is not None:
            self.ready.synchronize()  # waits with the GIL released
        token_list, bad = self.host.tolist()
        if any(bad) or no_mask:
            nan = [i for i, b in enumerate(bad) if b]
            why = [f"the model's logits hold NaN for {len(nan)} row(s)"] if nan else []
            why += [f"the grammar masks of {len(no_mask)} row(s) failed"] if no_mask else []
            raise RowSamplingError("; ".join(why), sorted(set(nan) | set(no_mask)),
                                   token_list)
        if self.raw_logprobs is None:
            return [(t, None) for t in token_list]
        return list(zip(token_list, _logprobs(self.raw_logprobs, self.tokens, token_list,
                                              self.want), strict=True))


def draw(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: Seq[int],
         masks: TokenMasks | None = None, plain_kernel: bool = True) -> DrawnTokens:
    """logits: [len(seqs), vocab] float32, one row per sequence to sample for; they may be
    modified in place (penalties, masks). Queues the whole draw and returns without
    waiting for the device.

    Logprobs are those of the raw model logits (before penalties, masks and temperature),
    as vLLM reports them by default. ``plain_kernel=False``: plain rows too by the torch
    path (bench/sampler_bench.py's baseline).
    """
    vocab = logits.shape[1]
    rows = _Rows.of(seqs, vocab)
    want = [s.params.logprobs for s in seqs]
    raw_logprobs = (torch.log_softmax(logits, dim=-1)
                    if any(k is not None for k in want) else None)
    # Greedy rows are the same token either way (the first maximum): a batch of greedy rows
    # without masks keeps torch's argmax, three launches that cost less host time than
    # Triton's two (bench/sampler_bench.py on an H200: 0.25 against 0.54 ms at batch 1).
    drawn_plain = any(p and t > 0.0 for p, t in zip(rows.plain, rows.temperature, strict=True))
    fused = (plain_kernel and any(rows.plain) and (drawn_plain or masks is not None)
             and ops.use_triton(logits))
    only_fused = fused and all(rows.plain)
    # read with the tokens: no extra sync (the fused kernel finds NaN rows itself)
    nan_rows = None if only_fused else torch.isnan(logits).any(dim=-1)
    # in place: the raw logits were read above if logprobs need them
    if rows.any_penalty:
        apply_penalties(logits, seqs, eos_ids)
    # The grammar masks are waited for only now, with the work that does not need them
    # already queued behind the forward (their fill runs on a worker meanwhile).
    bitmask = masks.bitmask(seqs, logits.device) if masks is not None else None
    picked = _draw_plain(logits, rows, bitmask) if fused else None
    if only_fused:
        assert picked is not None
        return _queue_copy(picked[0], picked, raw_logprobs, want, masks)
    assert nan_rows is not None
    tokens = _draw_general(logits, rows, bitmask, seqs, eos_ids)
    if picked is not None:
        plain = _device_list(rows.plain, torch.bool, logits.device)
        tokens = torch.where(plain, picked[0], tokens)
    return _queue_copy(tokens, torch.stack([tokens, nan_rows.long()]), raw_logprobs, want,
                       masks)


def _draw_plain(logits: torch.Tensor, rows: _Rows, bitmask: torch.Tensor | None
                ) -> torch.Tensor:
    """[2, rows]: every row drawn as a plain one (kernels.triton_sampler), and NaN flags."""
    floats = torch.tensor(np.stack([np.asarray(rows.temperature, dtype=np.float32),
                                    rows.uniform]), dtype=torch.float32)
    floats = to_device(floats, logits.device)
    return ops.sample_plain(logits, bitmask, floats[0], floats[1])


def _draw_general(logits: torch.Tensor, rows: _Rows, bitmask: torch.Tensor | None,
                  seqs: Seq[Sequence], eos_ids: Seq[int]) -> torch.Tensor:
    """Every row's token by the torch path (masks and the min_tokens ban in place)."""
    vocab = logits.shape[1]
    if bitmask is not None and not rows.any_min_tokens:
        apply_bitmask(logits, open_empty_rows(bitmask, vocab))
    elif rows.any_min_tokens or bitmask is not None:
        before = logits.clone()
        if rows.any_min_tokens:
            apply_min_tokens_ban(logits, seqs, eos_ids)
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        revive_dead_rows(logits, before, bitmask, rows.any_min_tokens)
    greedy = torch.argmax(logits, dim=-1)
    return _draw(logits, rows, greedy) if rows.any_random else greedy


def _queue_copy(tokens: torch.Tensor, both: torch.Tensor, raw_logprobs: torch.Tensor | None,
                want: list[int | None], masks: TokenMasks | None) -> DrawnTokens:
    """``both``: [2, rows] int64, tokens and NaN flags, on their way to the host."""
    if both.device.type != "cuda":
        return DrawnTokens(tokens, both, None, raw_logprobs, want, masks)
    # one copy into pinned memory, queued like a kernel: the host learns the tokens when
    # it asks (DrawnTokens.result), and the next step may be launched before that
    host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
    host.copy_(both, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return DrawnTokens(tokens, host, ready, raw_logprobs, want, masks)


def sample(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: Seq[int],
           masks: TokenMasks | None = None, plain_kernel: bool = True
           ) -> list[tuple[int, TokenLogprob | None]]:
    """``draw`` and wait for its tokens: the step's one sync."""
    return draw(logits, seqs, eos_ids, masks, plain_kernel).result()


def draw_rows(logits: torch.Tensor, rows: list[int], seqs: Seq[Sequence], eos_ids: Seq[int],
              masks: TokenMasks | None = None, plain_kernel: bool = True) -> DrawnTokens:
    """``draw`` of ``logits[rows]`` (``logits`` itself is left as it is)."""
    picked = logits.index_select(0, _device_list(rows, torch.int64, logits.device))
    return draw(picked, seqs, eos_ids, masks, plain_kernel)


def sample_rows(logits: torch.Tensor, rows: list[int], seqs: Seq[Sequence], eos_ids: Seq[int],
                masks: TokenMasks | None = None, plain_kernel: bool = True
                ) -> list[tuple[int, TokenLogprob | None] | Exception]:
    """``draw_rows`` and its tokens; if the batch raises, each row alone -- a row is drawn
    the same either way -- with the exception in place of a row that still fails, so that
    one bad row fails one request."""
    try:
        return list(draw_rows(logits, rows, seqs, eos_ids, masks, plain_kernel).result())
    except Exception:
        log.exception("sampling %d rows failed: sampling them one at a time", len(seqs))
    out: list[tuple[int, TokenLogprob | None] | Exception] = []
    for row, seq in zip(rows, seqs, strict=True):
        try:
            out.append(sample(logits[row:row + 1].clone(), [seq], eos_ids, masks,
                              plain_kernel)[0])
        except Exception as exc:  # the caller fails this row's request alone
            out.append(exc)
    return out


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, token_list: list[int],
              want: list[int | None]) -> list[TokenLogprob | None]:
    chosen = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k = max(w or 0 for w in want)
    top_vals: list[list[float]] = [[] for _ in want]
    top_ids: list[list[int]] = [[] for _ in want]
    if k > 0:
        vals, ids = torch.topk(raw, k, dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    out: list[TokenLogprob | None] = []
    for i, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        out.append(TokenLogprob(token_id=token_list[i], logprob=chosen[i],
                                top=list(zip(top_ids[i][:w], top_vals[i][:w], strict=True))))
    return out
