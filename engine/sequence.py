"""Sequence: the state of one generated sequence (one of a request's n).

A request with n > 1 has n sequences sharing the prompt's KV blocks (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"            # queued for (re)computation of its known tokens
    RUNNING = "running"            # has blocks, computing prefill chunks or decoding
    # blocks reserved; their KV arrives from outside (scheduler.py holds the deadline)
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    FINISHED = "finished"


class FinishReason(Enum):
    STOP = "stop"        # eos or a stop token id
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"      # cancelled, disconnected or failed


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one chosen token and its top alternatives (raw model logits)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1 = the most likely token (reported for prompt tokens)


@dataclass(slots=True)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # 0..n-1 within its request
    params: SamplingParams
    seed: int  # every token's randomness derives from (seed, index, output position)
    token_ids: list[int]  # prompt then output
    num_prompt_tokens: int
    max_tokens: int  # params.max_tokens resolved against the context limit
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    admitted: bool = False  # admitted once: a re-admission after preemption is not a new hit
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained, one per full block
    # the chain's seed: prefix_hash.chain_seed(model id, cache_salt); empty: the default
    hash_seed: bytes = b""
    tier_stored: int = -1  # leading prompt chunks the KV tier has or was given (-1: unset)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prefill_only: bool = False  # a prefill pod's request: stop after the first token(s)
    # The grammar matcher of a constrained sequence, in the state after its output tokens;
    # made lazily from them (engine.structured_output), so a fork or a decode pod that
    # received the first tokens starts from the right state.
    guide: Any = None
    guide_replica: int = 0  # which of the grammar's templates it copied (engine.mask_fill)
    # Prompt logprobs by position (1..prompt length - 1), when params.prompt_logprobs is set
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
