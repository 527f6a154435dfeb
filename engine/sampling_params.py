"""SamplingParams: the one definition of how a completion is sampled.

Shaped like vLLM's so users feel at home. The router builds it from OpenAI fields, the
services carry it over gRPC (converted in ``protos.convert``), the sampler reads it.
Stop *strings* are applied where text exists (the LLM facade and the router); the engine
itself stops on token ids, eos and max_tokens.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.structured_spec import StructuredOutputSpec

MAX_LOGPROBS = 20
MAX_N = 16
INT32_MAX = (1 << 31) - 1
# Temperatures below this are greedy, as in vLLM: dividing logits by a smaller one
# overflows float32 (1e-40 made every row of the batch inf/nan).
SAMPLING_EPS = 1e-5
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty")


def as_float32(value: float) -> float:
    """``value`` as the gRPC messages carry it (proto ``float``); inf where it overflows."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # k alternatives per generated token (0: only the chosen)
    prompt_logprobs: int | None = None  # k alternatives per prompt token (0: only the token)
    # output constrained to a schema, regex, choice or grammar (engine.structured_output)
    structured_outputs: StructuredOutputSpec | None = None
    # vLLM's cache_salt: seeds the prefix chain hash (engine/prefix_hash.py), so requests
    # with different salts never share cached KV (pod cache, host tier or Redis)
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidRequestError(msg, param=param)

        # Fields the gRPC messages carry as float must stay finite (and a positive one
        # positive) as float32: NaN slips past every range check below, and an inf
        # temperature or penalty turns logits into NaN.
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(as_float32(value)):
                bad(f"{name} must be a finite number, got {value}", name)
        # Fields the gRPC messages carry as int32 must fit it (protos/pdserve.proto).
        for name in ("top_k", "max_tokens", "min_tokens"):
            value = getattr(self, name)
            if value is not None and not -INT32_MAX <= value <= INT32_MAX:
                bad(f"{name} is out of range: {value}", name)
        if self.cache_salt is not None and not self.cache_salt:
            bad("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
        if any(isinstance(t, int) and t > INT32_MAX for t in self.stop_token_ids):
            bad("stop_token_ids must be token ids of this model", "stop_token_ids")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be at least 1, got {self.n}", "n")
        if self.n > MAX_N:
            bad(f"n must be at most {MAX_N}, got {self.n}", "n")
        if self.temperature < 0.0:
            bad(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            bad(f"top_k must be -1 (disable) or at least 1, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if as_float32(self.repetition_penalty) <= 0.0:
            bad(f"repetition_penalty must be positive, got {self.repetition_penalty}",
                "repetition_penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
                "frequency_penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
                "presence_penalty")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0 or (self.max_tokens is not None
                                   and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            bad(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                "prompt_logprobs")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputSpec):
            bad("structured_outputs must be a StructuredOutputSpec", "structured_outputs")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or not -(1 << 63) <= self.seed < (1 << 63)):
            bad("seed must be an integer that fits in 64 bits (signed)", "seed")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative token ids", "stop_token_ids")
