"""How much one request may ask of the system: the router's per-request limits.

Each limit is a ``pdserve router`` flag (generated from ``RequestLimits`` by
``pdserve.flags``) and each breach is a 400 that names the limit and
its flag, found before any pod works on the request (the prompt-token total right after
tokenizing, the rest before). Without them one request could carry
20,000 prompts (10 s of pod work, then a 500), a megabyte of stop strings checked after every
token, or ask for more logprobs than a pod computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.sampling_params import MAX_LOGPROBS, MAX_N
from router.errors import APIError


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_body_bytes: int = field(default=32 * 1024 * 1024,
                                metadata=_doc("largest request body in bytes"))
    max_json_depth: int = field(default=32, metadata=_doc(
        "deepest nesting of arrays and objects in a request body"))
    max_prompts: int = field(default=128, metadata=_doc(
        "most prompts in one /v1/completions request (each is its own generation)"))
    max_prompt_tokens: int = field(default=262_144, metadata=_doc(
        "most prompt tokens in one request, all its prompts together"))
    max_n: int = field(default=MAX_N, metadata=_doc(
        f"most choices (n) per prompt (at most {MAX_N}, the pods' limit)"))
    max_tokens: int = field(default=32_768, metadata=_doc(
        "most tokens one choice may generate (max_tokens / max_completion_tokens); the "
        "context length still applies"))
    max_logprobs: int = field(default=MAX_LOGPROBS, metadata=_doc(
        f"most alternatives in logprobs, top_logprobs and prompt_logprobs (at most "
        f"{MAX_LOGPROBS})"))
    max_stop_strings: int = field(default=16, metadata=_doc("most stop strings per request"))
    max_stop_string_chars: int = field(default=256, metadata=_doc(
        "longest stop string, in characters"))

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"--{_flag(f.name)} must be at least 1")
        if self.max_n > MAX_N:
            raise ValueError(f"--max-n must be at most {MAX_N} (the pods' limit)")
        if self.max_logprobs > MAX_LOGPROBS:
            raise ValueError(f"--max-logprobs must be at most {MAX_LOGPROBS}")

    def check_sampling(self, *, n: int, max_tokens: int | None, logprobs: int | None,
                       prompt_logprobs: int | None, stop: str | list[str] | None,
                       logprobs_param: str = "logprobs") -> None:
        """The limits a request breaks before any tokenizing (cheap checks first)."""
        _at_most(n, self.max_n, "n", "max_n", "choices")
        if max_tokens is not None:
            _at_most(max_tokens, self.max_tokens, "max_tokens", "max_tokens", "tokens")
        if logprobs is not None:
            _at_most(logprobs, self.max_logprobs, logprobs_param, "max_logprobs",
                     "alternatives")
        if prompt_logprobs is not None:
            _at_most(prompt_logprobs, self.max_logprobs, "prompt_logprobs", "max_logprobs",
                     "alternatives")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        _at_most(len(stops), self.max_stop_strings, "stop", "max_stop_strings", "stop strings")
        longest = max((len(s) for s in stops), default=0)
        _at_most(longest, self.max_stop_string_chars, "stop", "max_stop_string_chars",
                 "characters in a stop string")

    def check_prompt_count(self, count: int) -> None:
        _at_most(count, self.max_prompts, "prompt", "max_prompts", "prompts")

    def check_prompt_tokens(self, total: int, param: str) -> None:
        _at_most(total, self.max_prompt_tokens, param, "max_prompt_tokens", "prompt tokens")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _at_most(value: int, limit: int, param: str, name: str, what: str) -> None:
    if value > limit:
        raise APIError(400, f"{param}: {value} {what}, over this server's limit of {limit} "
                       f"(--{_flag(name)})", "invalid_request_error", param, name)

