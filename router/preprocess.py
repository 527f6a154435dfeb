"""From a validated HTTP request to a ``Job``: token ids and sampling parameters per prompt.

Everything that can be wrong with a request is found here, before any pod is contacted:
unknown model (404), unsupported fields, prompts too long for the context, token ids out of
the vocabulary, and the sampling ranges (``SamplingParams`` raises InvalidRequestError,
which the app answers as a 400).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.kv_layout import model_id_from_config
from engine.sampling_params import SamplingParams
from engine.structured_spec import StructuredOutputSpec
from engine.tokenizer import apply_chat_template
from router.errors import APIError, invalid
from router.limits import RequestLimits
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.structured import spec_from_request
from router.tools import ToolConfig, ToolPlan, resolve, template_messages


class JobKind(enum.Enum):
    COMPLETION = "completion"
    CHAT = "chat"


@dataclass(slots=True)
class ModelInfo:
    """What the router knows of the one model it serves."""

    name: str  # the served model name clients must send
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    root: str = ""  # the model as the router was given it (model cards' "root")
    model_id: str = ""  # engine.kv_layout.model_id_from_config: seeds the prefix hashes


@dataclass(slots=True)
class Job:
    """One HTTP generation request, ready to send to the decode pool."""

    kind: JobKind
    request_id: str
    model: str
    created: int
    prompts: list[list[int]]  # one Generate call per prompt
    params: list[SamplingParams]  # per prompt (max_tokens may depend on the prompt length)
    prompt_texts: list[str]  # for completions' echo (may be empty without echo)
    stream: bool
    include_usage: bool
    continuous_usage: bool
    return_token_ids: bool
    echo: bool
    logprobs: int | None  # alternatives per token; None: no logprobs
    skip_special_tokens: bool
    prompt_logprobs: int | None = None  # computed by the pod (asked, or echo with logprobs)
    show_prompt_logprobs: bool = False  # the body carries vLLM's "prompt_logprobs"
    tool_plan: ToolPlan | None = None  # chat with tools

    @property
    def n(self) -> int:
        return self.params[0].n


def read_model_info(model_dir: str | Path, tokenizer: Any, served_name: str | None,
                    max_model_len: int | None) -> ModelInfo:
    """Read config.json for the context length and vocabulary size (no torch, no weights)."""
    path = Path(model_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {str(path / 'config.json')!r}: {exc}") from None
    if max_model_len is None:
        max_model_len = config.get("max_position_embeddings") or config.get("max_seq_len")
    if not isinstance(max_model_len, int) or max_model_len < 2:
        raise ModelLoadError("cannot tell the context length: config.json has no "
                             "max_position_embeddings; pass --max-model-len")
    vocab = config.get("vocab_size")
    vocab_size = vocab if isinstance(vocab, int) and vocab > 0 else len(tokenizer)
    return ModelInfo(served_name or path.resolve().name, tokenizer, max_model_len, vocab_size,
                     str(model_dir), model_id_from_config(config))


def check_model(requested: str | None, info: ModelInfo) -> None:
    if requested is not None and requested != info.name:
        raise APIError(404, f"The model `{requested}` does not exist.", "invalid_request_error",
                       "model", "model_not_found")


def _reject_unsupported(fields: dict[str, bool]) -> None:
    for name, present in fields.items():
        if present:
            raise invalid(f"{name} is not supported", name)


def _prompt_count(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def _prompt_ids(prompt: str | list[str] | list[int] | list[list[int]], info: ModelInfo
                ) -> tuple[list[list[int]], list[str]]:
    tok = info.tokenizer
    if isinstance(prompt, str):
        return [list(tok.encode(prompt))], [prompt]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    if isinstance(prompt[0], str):
        texts: list[str] = prompt
        return [list(tok.encode(t)) for t in texts], texts
    prompts = ([list(prompt)] if isinstance(prompt[0], int)
               else [list(p) for p in prompt])
    for ids in prompts:
        bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {info.vocab_size})",
                          "prompt")
    return prompts, []  # the text is only needed for echo: decoded there


def _check_context(prompt_len: int, max_tokens: int | None, info: ModelInfo, what: str
                   ) -> int:
    """Return max_tokens (filled in up to the context when None) or raise a 400."""
    limit = info.max_model_len
    if prompt_len == 0:
        raise invalid(f"the {what} is empty (no tokens)", what, "empty_prompt")
    if prompt_len >= limit:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, your "
                      f"{what} has {prompt_len} tokens, leaving no room for a completion.",
                      what, "context_length_exceeded")
    if max_tokens is None:
        return limit - prompt_len
    if max_tokens >= 1 and prompt_len + max_tokens > limit:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, you "
                      f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                      f"{what}, {max_tokens} in the completion). Please reduce the length of "
                      f"the {what} or completion.", "max_tokens", "context_length_exceeded")
    return max_tokens  # < 1 is SamplingParams' complaint


def _sampling(req: CompletionRequest | ChatCompletionRequest, logprobs: int | None,
              max_tokens: int | None, spec: StructuredOutputSpec | None,
              prompt_logprobs: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured_outputs=spec,
        cache_salt=req.cache_salt,
    )


def _job(kind: JobKind, req: CompletionRequest | ChatCompletionRequest, info: ModelInfo,
         prompts: list[list[int]], texts: list[str], max_tokens: int | None,
         logprobs: int | None, what: str, echo: bool = False,
         spec: StructuredOutputSpec | None = None, tool_plan: ToolPlan | None = None) -> Job:
    if req.prompt_logprobs is not None and req.stream:
        raise invalid("prompt_logprobs are not available when stream is true",
                      "prompt_logprobs")
    # echo with logprobs shows the prompt's tokens with their logprobs, as vLLM does
    prompt_lps = req.prompt_logprobs
    if echo and logprobs is not None:
        prompt_lps = max(prompt_lps or 0, logprobs)
    # Validate the ranges once with the request's own max_tokens (so max_tokens < 1 is
    # reported as such), then fill in each prompt's limit.
    base = _sampling(req, logprobs, max_tokens, spec, prompt_lps)
    params = [dataclasses.replace(base, max_tokens=_check_context(len(p), max_tokens, info, what))
              for p in prompts]
    options = req.stream_options
    if options is not None and not req.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    prefix = "cmpl" if kind is JobKind.COMPLETION else "chatcmpl"
    return Job(
        kind=kind, request_id=f"{prefix}-{uuid.uuid4().hex}", model=info.name,
        created=int(time.time()), prompts=prompts, params=params, prompt_texts=texts,
        stream=req.stream, include_usage=bool(options and options.include_usage),
        continuous_usage=bool(options and options.continuous_usage_stats),
        return_token_ids=req.return_token_ids, echo=echo, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens, prompt_logprobs=prompt_lps,
        show_prompt_logprobs=prompt_lps is not None, tool_plan=tool_plan,
    )


def prepare_completion(req: CompletionRequest, info: ModelInfo,
                       limits: RequestLimits | None = None) -> Job:
    """The job for a completions request (tokenizes: run it off the event loop)."""
    limits = limits or RequestLimits()
    check_model(req.model, info)
    _reject_unsupported({
        "suffix": bool(req.suffix),
        "logit_bias": bool(req.logit_bias),
        "best_of": req.best_of is not None and req.best_of != req.n,
    })
    limits.check_sampling(n=req.n, max_tokens=req.max_tokens, logprobs=req.logprobs,
                          prompt_logprobs=req.prompt_logprobs, stop=req.stop)
    limits.check_prompt_count(_prompt_count(req.prompt))
    prompts, texts = _prompt_ids(req.prompt, info)
    limits.check_prompt_tokens(sum(len(p) for p in prompts), "prompt")
    if req.echo and not texts:
        texts = [info.tokenizer.decode(ids) for ids in prompts]
    return _job(JobKind.COMPLETION, req, info, prompts, texts, req.max_tokens, req.logprobs,
                "prompt", echo=req.echo, spec=spec_from_request(req))


def prepare_chat(req: ChatCompletionRequest, info: ModelInfo,
                 tool_config: ToolConfig | None = None,
                 limits: RequestLimits | None = None) -> Job:
    """The job for a chat request (templates and tokenizes: run it off the event loop)."""
    limits = limits or RequestLimits()
    check_model(req.model, info)
    _reject_unsupported({"logit_bias": bool(req.logit_bias)})
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.max_tokens
    limits.check_sampling(n=req.n, max_tokens=max_tokens, logprobs=req.top_logprobs,
                          prompt_logprobs=req.prompt_logprobs, stop=req.stop,
                          logprobs_param="top_logprobs")
    spec = spec_from_request(req)
    tools = resolve(req.tools, req.tool_choice, req.parallel_tool_calls,
                    tool_config or ToolConfig())
    if tools.spec is not None:
        if spec is not None:
            raise invalid("a required or named tool_choice cannot be combined with another "
                          "structured output", "tool_choice")
        spec = tools.spec
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    messages = template_messages([m.model_dump(exclude_none=False) for m in req.messages])
    ids = apply_chat_template(info.tokenizer, messages, req.add_generation_prompt,
                              tools.template_tools)
    limits.check_prompt_tokens(len(ids), "messages")
    return _job(JobKind.CHAT, req, info, [ids], [""], max_tokens, logprobs, "messages",
                spec=spec, tool_plan=tools.plan)
