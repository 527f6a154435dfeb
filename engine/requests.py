"""What the engine keeps per request and hands back per step, and the limits it reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.external_kv import KVSend
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence, TokenLogprob


@dataclass(slots=True, frozen=True)
class EngineLimits:
    """What a pod can hold: the one source of truth the router validates against."""

    max_model_len: int
    block_size: int
    num_blocks: int
    block_bytes: int  # one block of KV, every layer, K and V

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_model_len - 1  # at least one token must be left to generate


@dataclass(slots=True)
class SequenceDelta:
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None


@dataclass(slots=True)
class RequestOutput:
    """What one step added to a request."""

    request_id: str
    deltas: list[SequenceDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # positions 1.., with the first output
    # seconds from add_request to the first step that computed any of it (phase timings)
    queue_seconds: float = 0.0


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``later`` appended to ``first`` (which is updated and returned): what a stream that
    fell behind its request sends as one message instead of several, as vLLM's output
    collector does. Each sequence's tokens and logprobs stay in order."""
    mine = {d.index: d for d in first.deltas}
    for d in later.deltas:
        m = mine.get(d.index)
        if m is None:
            first.deltas.append(d)
            mine[d.index] = d
        else:
            m.token_ids = m.token_ids + d.token_ids
            m.logprobs = m.logprobs + d.logprobs
            m.finish_reason = d.finish_reason or m.finish_reason
    first.finished = later.finished
    if first.prompt_logprobs is None:
        first.prompt_logprobs = later.prompt_logprobs
    return first


@dataclass(slots=True)
class Request:
    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    kv_send: KVSend | None = None  # a prefill pod's outbound transfer of the prompt's KV
    pending: dict[int, SequenceDelta] = field(default_factory=dict)
    arrived_at: float = field(default_factory=time.monotonic)
    queue_seconds: float | None = None  # set by the first step that schedules it

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)
