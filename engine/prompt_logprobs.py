"""Prompt logprobs: the log-probability of every prompt token given the tokens before it.

A request asks with ``SamplingParams.prompt_logprobs = k``. Each step, ``plan`` lists the
rows of the flat batch whose logits predict a prompt token (position p predicts p + 1);
the model runner hands the final hidden states to ``PromptLogprobPlan.capture``, which runs
the LM head on those rows alone (in slices, so a long prompt chunk never holds a
[tokens, vocab] tensor at once) and stores a TokenLogprob (value, rank, top k) per position
on the sequence. Chunked prefill fills them chunk by chunk; they leave the engine with the
request's first output (``take``). Such a request must compute its whole prompt: the
scheduler gives it no prefix-cache hits, and a decode pod prefills it itself.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.sequence import Sequence, TokenLogprob

_ROWS_PER_SLICE = 256


@dataclass(slots=True)
class PromptLogprobPlan:
    rows: list[int]  # flat batch rows whose logits are needed
    owners: list[tuple[Sequence, int]]  # per row: the sequence and the position predicted
    logits_fn: Callable[[torch.Tensor], torch.Tensor]  # hidden rows -> logits (LM head)

    def capture(self, hidden: torch.Tensor) -> None:
        """The runner's hidden-state hook: compute and store this step's prompt logprobs."""
        for start in range(0, len(self.rows), _ROWS_PER_SLICE):
            rows = self.rows[start:start + _ROWS_PER_SLICE]
            owners = self.owners[start:start + _ROWS_PER_SLICE]
            index = torch.tensor(rows, dtype=torch.int64, device=hidden.device)
            logprobs = torch.log_softmax(self.logits_fn(hidden.index_select(0, index)).float(),
                                         dim=-1)
            _store(logprobs, owners)


def _store(logprobs: torch.Tensor, owners: list[tuple[Sequence, int]]) -> None:
    targets = torch.tensor([seq.token_ids[pos] for seq, pos in owners], dtype=torch.int64,
                           device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, targets)
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    k = max(seq.params.prompt_logprobs or 0 for seq, _ in owners)
    top_vals: list[list[float]] = [[] for _ in owners]
    top_ids: list[list[int]] = [[] for _ in owners]
    if k > 0:
        vals, ids = torch.topk(logprobs, k, dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    for i, (value, rank, (seq, pos)) in enumerate(zip(chosen.squeeze(1).tolist(),
                                                      ranks.tolist(), owners, strict=True)):
        want = seq.params.prompt_logprobs or 0
        seq.prompt_logprobs[pos] = TokenLogprob(
            token_id=seq.token_ids[pos], logprob=value,
            top=list(zip(top_ids[i][:want], top_vals[i][:want], strict=True)), rank=rank)


def plan(seqs: Seq[Sequence], num_new_tokens: Seq[int],
         logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptLogprobPlan | None:
    """The rows of this step (in the runner's flat order) that predict a prompt token of a
    request asking for prompt logprobs; None when there are none."""
    rows: list[int] = []
    owners: list[tuple[Sequence, int]] = []
    offset = 0
    for seq, n in zip(seqs, num_new_tokens, strict=True):
        # a sequence with output already delivered its prompt logprobs with its first token
        if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0:
            start = seq.num_computed_tokens
            for pos in range(start, min(start + n, seq.num_prompt_tokens - 1)):
                rows.append(offset + pos - start)
                owners.append((seq, pos + 1))
        offset += n
    return PromptLogprobPlan(rows, owners, logits_fn) if rows else None


def take(seq: Sequence) -> list[TokenLogprob] | None:
    """A sequence's prompt logprobs (positions 1..prompt length - 1), once; None when the
    request did not ask or they were taken already."""
    if seq.params.prompt_logprobs is None or not seq.prompt_logprobs:
        return None
    out = [seq.prompt_logprobs[p] for p in sorted(seq.prompt_logprobs)]
    seq.prompt_logprobs = {}
    return out
