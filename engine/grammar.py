"""Grammars for constrained decoding: a request's spec compiled by llguidance into a template
matcher, cached and bounded in time, over the model's tokenizer.

The engine (engine.structured_output) copies a template per sequence; the router compiles
the same way to refuse a bad spec with a 400 before any pod sees it (router/structured.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.structured_spec import StructuredOutputSpec

COMPILE_TIMEOUT_S = 10.0
CACHE_ENTRIES = 256


class GrammarCompiler:
    """Spec -> template matcher in its initial state, cached (LRU) and bounded in time.

    Compiles run on a worker thread so that a pathological grammar costs at most
    ``timeout_s`` of the caller's time; llguidance's own parser limits (lexer fuel,
    grammar size) bound the work itself. Thread-safe (the router validates from threads).
    """

    def __init__(self, tokenizer_factory: Callable[[], Any], timeout_s: float = COMPILE_TIMEOUT_S,
                 max_entries: int = CACHE_ENTRIES) -> None:
        self._factory = tokenizer_factory
        self._tokenizer: Any = None
        self.timeout_s = timeout_s
        self.max_entries = max_entries
        # (spec, replica) -> template; replicas > 0 are the same grammar compiled again,
        # each with a lexer state of its own (engine.mask_fill)
        self._cache: OrderedDict[tuple[StructuredOutputSpec, int], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self.compiles = 0  # cache misses that compiled (for tests and metrics)

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._factory()
            return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def compile(self, spec: StructuredOutputSpec, replica: int = 0) -> Any:
        """The template matcher of ``spec``; InvalidRequestError (a 400) when it is invalid
        or does not compile in time. Never advance the template: deep_copy it. Each
        ``replica`` is compiled on its own (copies of one template share a lock)."""
        key = (spec, replica)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = spec.grammar_text()
        tokenizer = self.tokenizer
        future = self._pool.submit(_build_matcher, tokenizer, grammar)
        try:
            matcher = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise InvalidRequestError(
                f"the {spec.kind.value} took longer than {self.timeout_s:g} s to compile; "
                "simplify it", param="structured_outputs") from None
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {_what(spec)}: {first_line(matcher.get_error())}",
                                      param="structured_outputs")
        with self._lock:
            self.compiles += 1
            self._cache[key] = matcher
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _build_matcher(tokenizer: Any, grammar: str) -> Any:
    from llguidance import LLMatcher

    return LLMatcher(tokenizer, grammar, log_level=0)


def _what(spec: StructuredOutputSpec) -> str:
    return {"json": "JSON schema", "json_object": "JSON object spec", "regex": "regex",
            "choice": "choice", "grammar": "grammar"}[spec.kind.value]


def first_line(message: str) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:4])[:500] if lines else "it does not compile"


def llguidance_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_ids: Seq[int],
                         slices: str = "json") -> Any:
    """An llguidance tokenizer over a fast HF tokenizer whose masks cover the model's whole
    vocabulary (padding rows of the LM head included: they are never allowed).

    ``slices``: which of llguidance's precomputed token subsets speed up a mask (the masks
    are the same either way). Its JSON slices by default, as most constrained requests are
    JSON (response_format, tools): on an H200's host a 32-row fill of a JSON schema took
    1.01-1.05 ms against 1.06-1.31 with the general ones (bench/RESULTS.md, 2026-12-01)."""
    from llguidance import LLTokenizer
    from llguidance.hf import from_tokenizer

    n_vocab = max(vocab_size, len(hf_tokenizer))
    chosen = LLTokenizer.json_slices() if slices == "json" else LLTokenizer.general_slices()
    return from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=list(eos_ids) or None
                          ).with_slices(chosen)


def tokenizer_factory_for(model_dir: str | Path, vocab_size: int, eos_ids: Seq[int],
                          slices: str = "json") -> Callable[[], Any]:
    def make() -> Any:
        from engine.tokenizer import load_tokenizer

        return llguidance_tokenizer(load_tokenizer(model_dir), vocab_size, eos_ids, slices)

    return make
