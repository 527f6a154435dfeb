"""LLM: the offline API, shaped like vLLM's.

    from engine import LLM, SamplingParams
    llm = LLM("models/default")
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields
from itertools import count
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.llm_engine import EngineArgs, LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then one each
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(slots=True)
class _Tracking:
    prompt: list[int]
    params: SamplingParams
    detoks: list[IncrementalDetokenizer]
    texts: list[list[str]]
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprob]]
    finish: list[str | None]
    cached: int = 0
    done: list[bool] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "float32",
                 show_progress: bool = False, **engine_args: Any) -> None:
        names = {f.name for f in fields(EngineArgs)}
        unknown = set(engine_args) - names
        if unknown:
            raise InvalidRequestError(f"unknown engine argument(s) {sorted(unknown)}; "
                                      f"known: {sorted(names - {'device', 'dtype'})}")
        self.tokenizer = load_tokenizer(model)  # first: a bad directory fails fast
        self.engine = LLMEngine(model, EngineArgs(device=device, dtype=dtype, **engine_args),
                                show_progress)
        self._ids = count()

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("a prompt must be a string or a list of token ids")
        return list(prompt)

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 on_delta: Callable[[int, int, str], None] | None = None,
                 ) -> list[GenerationResult]:
        """Generate for every prompt (a string or a list of token ids); one result each.

        on_delta(prompt_index, seq_index, new_text) is called as text arrives (streaming).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[assignment]  # one prompt: a list of one
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError("give one SamplingParams, or one per prompt")
        encoded = [self.encode(p) for p in prompts]  # type: ignore[arg-type]
        tracks: dict[str, tuple[int, _Tracking]] = {}
        try:  # a refused prompt, an error or Ctrl-C must not leave earlier prompts queued
            for i, (ids, p) in enumerate(zip(encoded, plist, strict=False)):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, ids, p)
                tracks[rid] = (i, _Tracking(
                    ids, p,
                    [IncrementalDetokenizer(self.tokenizer, ids, p.stop,
                                            p.include_stop_str_in_output,
                                            stop_token_ids=p.stop_token_ids)
                     for _ in range(p.n)],
                    [[] for _ in range(p.n)], [[] for _ in range(p.n)],
                    [[] for _ in range(p.n)], [None] * p.n, done=[False] * p.n))
            while self.engine.has_work():
                for out in self.engine.step():
                    self._absorb(out, tracks, on_delta)
                failed = self.engine.take_failures()
                if failed:  # offline, one call: its first failed request fails the call
                    raise failed[0][1]
        except BaseException:
            for rid in tracks:
                self.engine.abort(rid)
            raise
        results: list[GenerationResult | None] = [None] * len(prompts)
        for rid, (i, t) in tracks.items():
            results[i] = GenerationResult(rid, t.prompt, [
                CompletionOutput(k, "".join(t.texts[k]), t.token_ids[k], t.finish[k],
                                 t.logprobs[k] if t.params.logprobs is not None else None)
                for k in range(t.params.n)], t.cached, t.prompt_logprobs)
        return results  # type: ignore[return-value]

    def _absorb(self, out: RequestOutput, tracks: dict[str, tuple[int, _Tracking]],
                on_delta: Callable[[int, int, str], None] | None) -> None:
        i, t = tracks[out.request_id]
        t.cached = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            t.prompt_logprobs = [None, *out.prompt_logprobs]
        for d in out.deltas:
            k = d.index
            if t.done[k]:
                continue
            detok = t.detoks[k].add(d.token_ids)
            t.token_ids[k] += d.token_ids[:detok.num_tokens]
            t.logprobs[k] += d.logprobs[:detok.num_tokens]
            text = detok.text
            if detok.stopped:  # a stop string: the sequence ends here
                t.finish[k], t.done[k] = "stop", True
                self.engine.abort_sequence(out.request_id, k)
            elif d.finish_reason is not None:
                text += t.detoks[k].flush()
                t.finish[k], t.done[k] = d.finish_reason.value, True
            t.texts[k].append(text)
            if on_delta is not None and text:
                on_delta(i, k, text)
