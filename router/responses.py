"""OpenAI response bodies and SSE chunks, built from ``router.serving`` events.

Completions (``text_completion``) and chat (``chat.completion`` / ``chat.completion.chunk``)
share one path: both collect or stream the same ``ChoiceDelta`` events, so streamed text is
the non-streamed text cut into pieces. Logprobs follow each API's shape: completions'
``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``; chat's ``content`` list of
``{token, logprob, bytes, top_logprobs}``.
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

DONE = "data: [DONE]\n\n"
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


class _Formatter:
    """Shapes a job's events into its API's JSON (both streamed and not)."""

    def __init__(self, job: Job, token_bytes: TokenBytes) -> None:
        self.job = job
        self.tb = token_bytes
        self.choices = [_Choice() for _ in range(len(job.prompts) * job.n)]
        self.chat = job.kind is JobKind.CHAT
        if job.echo:  # completions' text_offset counts the echoed prompt too
            for i, choice in enumerate(self.choices):
                choice.text_offset = len(job.prompt_texts[i // job.n])

    def _header(self, obj: str) -> dict:
        return {"id": self.job.request_id, "object": obj, "created": self.job.created,
                "model": self.job.model}

    def logprobs(self, choice: _Choice, lps: list[pb.Logprobs]) -> dict | None:
        if self.job.logprobs is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(lp) for lp in lps], "refusal": None}
        tokens, token_lps, tops, offsets = [], [], [], []
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

    def final(self, usage: dict) -> dict:
        """The non-streamed response body."""
        job = self.job
        out = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text)
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "logprobs": self.logprobs(c, c.logprobs),
                          "finish_reason": c.finish_reason}
            else:
                if job.echo:
                    text = job.prompt_texts[i // job.n] + text
                choice = {"index": i, "text": text, "logprobs": self.logprobs(c, c.logprobs),
                          "finish_reason": c.finish_reason}
                if job.return_token_ids:
                    choice["prompt_token_ids"] = job.prompts[i // job.n]
            if job.return_token_ids:
                choice["token_ids"] = c.token_ids
            out.append(choice)
        body = {**self._header("chat.completion" if self.chat else "text_completion"),
                "choices": out, "usage": usage, "system_fingerprint": None}
        if self.chat and job.return_token_ids:
            body["prompt_token_ids"] = job.prompts[0]
        return body

    # --- streaming -------------------------------------------------------------------
    def _sse(self, choices: list[dict], usage: dict | None) -> str:
        obj = {**self._header("chat.completion.chunk" if self.chat else "text_completion"),
               "choices": choices}
        if self.job.include_usage or self.job.continuous_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def chunk(self, ev: ChoiceDelta, usage: dict) -> str | None:
        """The SSE chunk for one delta, or None when it has nothing to show."""
        job = self.job
        c = self.choices[ev.index]
        first = not c.started
        c.started = True
        text = ev.text
        if job.echo and first:
            text = job.prompt_texts[ev.index // job.n] + text
        shows_tokens = ev.token_ids and (job.logprobs is not None or job.return_token_ids)
        if not (text or ev.finish_reason or shows_tokens or (first and self.chat)):
            return None
        lps = self.logprobs(c, ev.logprobs) if ev.token_ids else None
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or not ev.finish_reason else {})
            choice = {"index": ev.index, "delta": delta, "logprobs": lps,
                      "finish_reason": ev.finish_reason}
        else:
            choice = {"index": ev.index, "text": text, "logprobs": lps,
                      "finish_reason": ev.finish_reason}
            if job.return_token_ids and first:
                choice["prompt_token_ids"] = job.prompts[ev.index // job.n]
        if job.return_token_ids:
            choice["token_ids"] = ev.token_ids
        return self._sse([choice], usage if job.continuous_usage else None)

    def usage_chunk(self, usage: dict) -> str:
        return self._sse([], usage)


async def collect(gen: Generation, token_bytes: TokenBytes) -> dict:
    """Run the generation to its end; the non-streamed response body."""
    fmt = _Formatter(gen.job, token_bytes)
    async with aclosing(gen.events()) as events:
        async for ev in events:
            if isinstance(ev, ChoiceDelta):
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
                    continue
                chunk = fmt.chunk(ev, gen.usage.to_dict())
                if chunk is not None:
                    sent = True
                    yield chunk
        except APIError as exc:
            if not sent:
                raise
            yield f"data: {json.dumps(exc.body())}\n\n"
            yield DONE
            return
    if gen.job.include_usage:
        yield fmt.usage_chunk(gen.usage.to_dict())
    yield DONE
