"""Request models of the OpenAI-compatible endpoints (pydantic, strict).

Strict types: a string where a number belongs is a 400, never coerced (``"5"`` is not 5,
``true`` is not 1). NaN and infinities are refused. Unknown fields are ignored, as vLLM
does, so clients that send extra OpenAI fields keep working. Range checks live in
``engine.sampling_params.SamplingParams``; the conversion is in ``router.preprocess``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    # vLLM's extension: every chunk carries the usage so far.
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share: sampling, stopping, streaming, vLLM's extensions."""

    model_config = _STRICT

    model: str | None = None  # None: the one served model (as vLLM allows)
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Structured output (router.structured): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's extension: logprobs of the prompt tokens (k alternatives each).
    prompt_logprobs: int | None = None
    # vLLM's extension: isolates a tenant's prefix caches (seeds the prefix chain hash).
    cache_salt: str | None = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions; None: up to the context
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, ...) pass through to the chat template.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    role: str
    # Parts are checked (text only) where the template is applied: engine.tokenizer.
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered by the template."""

    model_config = _STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = _STRICT

    model: str | None = None
    tokens: list[int]
