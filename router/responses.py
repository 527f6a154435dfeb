"""OpenAI response bodies and SSE chunks, built from ``router.serving`` events.

Completions (``text_completion``) and chat (``chat.completion`` / ``chat.completion.chunk``)
share one path: both collect or stream the same ``ChoiceDelta`` events, so streamed text is
the non-streamed text cut into pieces. Logprobs follow each API's shape: completions'
``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``; chat's ``content`` list of
``{token, logprob, bytes, top_logprobs}``; vLLM's ``prompt_logprobs`` (a list starting with
null, then ``{token id: {logprob, rank, decoded_token}}`` per prompt token).

Streams look as OpenAI's (and vLLM's) do: a chat stream opens every choice with a role-only
chunk, chunks carry ``usage`` only when it was asked for them, and a chat with tools streams
``tool_calls`` deltas (router.tool_parsers) with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from engine.tokenizer import TokenBytes
from protos import pdserve_pb2 as pb
from router.errors import APIError
from router.preprocess import Job, JobKind
from router.serving import ChoiceDelta, Generation, PromptStart
from router.tool_parsers import ParseStep, ToolStream

DONE = "data: [DONE]\n\n"
# Characters JSON leaves unescaped that Python's str.splitlines() -- and so httpx's
# aiter_lines(), which many SSE clients read with -- takes for line ends: in a sampled text
# (a random model emits them) they cut a chunk's JSON in two on the client.
_LINE_BREAKS_UNESCAPED = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028",
                                        "\u2029": "\\u2029"})


def sse_data(obj: object) -> str:
    """One server-sent event of ``obj`` as compact JSON, on one line for every reader."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text.translate(_LINE_BREAKS_UNESCAPED)}\n\n"


# JSON has no -inf; vLLM reports impossible tokens' logprob as -9999.0 too.
_MIN_LOGPROB = -9999.0


def _lp(value: float) -> float:
    return value if value == value and value > _MIN_LOGPROB else _MIN_LOGPROB


@dataclass(slots=True)
class _Choice:
    """One choice's output so far (non-streamed), or its stream state (streamed)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.Logprobs] = field(default_factory=list)
    finish_reason: str | None = None
    text_offset: int = 0  # completions' logprobs: where the next token's text starts
    started: bool = False  # streamed: the choice's first chunk was sent
    tools: ToolStream | None = None  # chat with tools: the choice's tool-call parser


class _Formatter:
    """Shapes a job's events into its API's JSON (both streamed and not)."""

    def __init__(self, job: Job, token_bytes: TokenBytes) -> None:
        self.job = job
        self.tb = token_bytes
        self.chat = job.kind is JobKind.CHAT
        plan = job.tool_plan
        self.choices = [_Choice(tools=plan.stream() if plan is not None else None)
                        for _ in range(len(job.prompts) * job.n)]
        self.prompt_logprobs: dict[int, list[pb.Logprobs]] = {}

    def _header(self, obj: str) -> dict:
        return {"id": self.job.request_id, "object": obj, "created": self.job.created,
                "model": self.job.model}

    # --- logprobs ----------------------------------------------------------------------
    def logprobs(self, choice: _Choice, lps: list[pb.Logprobs],
                 prompt: int | None = None) -> dict | None:
        """The choice's logprobs object; ``prompt``: echo that prompt's tokens first."""
        if self.job.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(lp) for lp in lps], "refusal": None}
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict | None] = []
        offsets: list[int] = []
        if prompt is not None:
            first = self.job.prompts[prompt][0]
            text = self.tb.get(first)[0]
            tokens.append(text)
            token_lps.append(None)
            tops.append(None)
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
            lps = self.prompt_logprobs.get(prompt, []) + lps
        for lp in lps:
            text, _ = self.tb.get(lp.chosen.token_id)
            tokens.append(text)
            token_lps.append(_lp(lp.chosen.logprob))
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
            # vLLM's shape: the chosen token plus the k most likely ones.
            top = {text: _lp(lp.chosen.logprob)}
            top.update({self.tb.get(t.token_id)[0]: _lp(t.logprob) for t in lp.top})
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_entry(self, lp: pb.Logprobs) -> dict:
        def one(t: pb.TokenLogprob) -> dict:
            text, raw = self.tb.get(t.token_id)
            return {"token": text, "logprob": _lp(t.logprob), "bytes": list(raw)}
        return {**one(lp.chosen), "top_logprobs": [one(t) for t in lp.top]}

    def prompt_logprobs_body(self, prompt: int) -> list[dict | None] | None:
        """vLLM's ``prompt_logprobs``: null for the first token, then one dict per token."""
        if not self.job.show_prompt_logprobs:
            return None
        out: list[dict | None] = [None]
        for lp in self.prompt_logprobs.get(prompt, []):
            entry = {str(lp.chosen.token_id): {
                "logprob": _lp(lp.chosen.logprob), "rank": lp.rank or None,
                "decoded_token": self.tb.get(lp.chosen.token_id)[0]}}
            for rank, t in enumerate(lp.top, 1):
                entry.setdefault(str(t.token_id), {
                    "logprob": _lp(t.logprob), "rank": rank,
                    "decoded_token": self.tb.get(t.token_id)[0]})
            out.append(entry)
        return out

    # --- tools ---------------------------------------------------------------------------
    def _message(self, c: _Choice, text: str) -> tuple[dict, str | None]:
        """A chat choice's message and finish reason (tool calls parsed out of the text)."""
        plan, tools = self.job.tool_plan, c.tools
        message: dict = {"role": "assistant", "content": text, "refusal": None}
        if plan is None or tools is None:
            return message, c.finish_reason
        tools.feed(text)
        tools.finish()
        if tools.calls and not tools.failed:
            message["content"] = tools.content if tools.content.strip() else None
            message["tool_calls"] = [call.to_dict() for call in tools.calls]
        return message, plan.finish_reason(tools, c.finish_reason)

    def final(self, usage: dict) -> dict:
        """The non-streamed response body."""
        job = self.job
        out = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            prompt = i // job.n
            if self.chat:
                message, finish = self._message(c, text)
                choice = {"index": i, "message": message,
                          "logprobs": self.logprobs(c, c.logprobs), "finish_reason": finish,
                          "stop_reason": None}
            else:
                echo_lps = prompt if job.echo and job.logprobs is not None else None
                if job.echo:
                    text = job.prompt_texts[prompt] + text
                choice = {"index": i, "text": text,
                          "logprobs": self.logprobs(c, c.logprobs, echo_lps),
                          "finish_reason": c.finish_reason, "stop_reason": None}
                if job.show_prompt_logprobs:
                    choice["prompt_logprobs"] = self.prompt_logprobs_body(prompt)
                if job.return_token_ids:
                    choice["prompt_token_ids"] = job.prompts[prompt]
            if job.return_token_ids:
                choice["token_ids"] = c.token_ids
            out.append(choice)
        body = {**self._header("chat.completion" if self.chat else "text_completion"),
                "choices": out, "usage": usage, "system_fingerprint": None}
        if self.chat and job.show_prompt_logprobs:
            body["prompt_logprobs"] = self.prompt_logprobs_body(0)
        if self.chat and job.return_token_ids:
            body["prompt_token_ids"] = job.prompts[0]
        return body

    # --- streaming -------------------------------------------------------------------
    def _sse(self, choices: list[dict], usage: dict | None) -> str:
        obj = {**self._header("chat.completion.chunk" if self.chat else "text_completion"),
               "choices": choices}
        if usage is not None:  # OpenAI sends no "usage": null on chunks without usage
            obj["usage"] = usage
        return sse_data(obj)

    def start(self, ev: PromptStart, usage: dict) -> list[str]:
        """A prompt was accepted: keep its prompt logprobs; a chat stream opens each of its
        choices with a role-only chunk, as OpenAI's and vLLM's servers do."""
        self.prompt_logprobs[ev.prompt_index] = ev.prompt_logprobs
        if not self.chat:
            return []
        live = usage if self.job.continuous_usage else None
        first = ev.prompt_index * self.job.n
        return [self._sse([{"index": i, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}], live)
                for i in range(first, first + self.job.n)]

    def chunk(self, ev: ChoiceDelta, usage: dict) -> str | None:
        """The SSE chunk for one delta, or None when it has nothing to show."""
        job = self.job
        c = self.choices[ev.index]
        first = not c.started
        c.started = True
        prompt = ev.index // job.n
        text = ev.text
        shows_tokens = ev.token_ids and (job.logprobs is not None or job.return_token_ids)
        if self.chat:
            delta, finish = self._chat_delta(c, ev)
            if not (delta or finish or shows_tokens):
                return None
            lps = self.logprobs(c, ev.logprobs) if ev.token_ids else None
            choice: dict = {"index": ev.index, "delta": delta, "logprobs": lps,
                            "finish_reason": finish}
        else:
            echo = job.echo and first
            if echo:
                text = job.prompt_texts[prompt] + text
            if not (text or ev.finish_reason or shows_tokens):
                return None
            echo_lps = prompt if echo and job.logprobs is not None else None
            lps = self.logprobs(c, ev.logprobs, echo_lps) \
                if ev.token_ids or echo_lps is not None else None
            choice = {"index": ev.index, "text": text, "logprobs": lps,
                      "finish_reason": ev.finish_reason}
            if job.return_token_ids and first:
                choice["prompt_token_ids"] = job.prompts[prompt]
        if job.return_token_ids:
            choice["token_ids"] = ev.token_ids
        return self._sse([choice], usage if job.continuous_usage else None)

    def _chat_delta(self, c: _Choice, ev: ChoiceDelta) -> tuple[dict, str | None]:
        if c.tools is None:
            return ({"content": ev.text} if ev.text else {}), ev.finish_reason
        step = c.tools.feed(ev.text) if ev.text else ParseStep()
        if ev.finish_reason:
            step.add(c.tools.finish())
        delta: dict = {}
        if step.content:
            delta["content"] = step.content
        if step.tool_deltas:
            delta["tool_calls"] = [d.to_dict() for d in step.tool_deltas]
        finish = ev.finish_reason
        if finish is not None and self.job.tool_plan is not None:
            finish = self.job.tool_plan.finish_reason(c.tools, finish)
        return delta, finish

    def usage_chunk(self, usage: dict) -> str:
        return self._sse([], usage)


async def collect(gen: Generation, token_bytes: TokenBytes) -> dict:
    """Run the generation to its end; the non-streamed response body."""
    fmt = _Formatter(gen.job, token_bytes)
    async with aclosing(gen.events()) as events:
        async for ev in events:
            if isinstance(ev, PromptStart):
                fmt.prompt_logprobs[ev.prompt_index] = ev.prompt_logprobs
            elif isinstance(ev, ChoiceDelta):
                c = fmt.choices[ev.index]
                c.text.append(ev.text)
                c.token_ids.extend(ev.token_ids)
                c.logprobs.extend(ev.logprobs)
                c.finish_reason = ev.finish_reason or c.finish_reason
    return fmt.final(gen.usage.to_dict())


async def sse_stream(gen: Generation, token_bytes: TokenBytes) -> AsyncIterator[str]:
    """SSE text of the streamed response, ending in ``data: [DONE]``.

    An error before anything was sent raises (the app answers it with a proper HTTP
    status); after that it becomes an error event in the stream, as vLLM sends it.
    """
    fmt = _Formatter(gen.job, token_bytes)
    sent = False
    async with aclosing(gen.events()) as events:
        try:
            async for ev in events:
                if isinstance(ev, PromptStart):
                    for chunk in fmt.start(ev, gen.usage.to_dict()):
                        sent = True
                        yield chunk
                    continue
                one = fmt.chunk(ev, gen.usage.to_dict())
                if one is not None:
                    sent = True
                    yield one
        except APIError as exc:
            if not sent:
                raise
            yield sse_data(exc.body())
            yield DONE
            return
    if gen.job.include_usage:
        yield fmt.usage_chunk(gen.usage.to_dict())
    yield DONE
