"""Encoding and decoding long texts in worker processes, so the router's loop stays responsive.

Requests are prepared (templated, tokenized) on a few threads (``RouterState.off_loop``), but
threads alone did not keep /health fast: tokenizers holds the GIL while it turns a long
encoding into Python objects, and on a loaded machine the loop then waits for the GIL behind
the tokenizing threads (ten 1 MB prompts: /health up to 0.4 s; docs/RELIABILITY.md has the
figures). Long texts and long id lists therefore go to a small pool of processes, each with
its own copy of the tokenizer, started on first use and run at a lower CPU priority; ids
travel as packed arrays, not pickled lists. Short ones (nearly all requests) stay in the
calling thread, where the round trip would cost more than the work.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from array import array
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# Above these sizes a text is encoded, or an id list decoded, in a worker process.
OFFLOAD_MIN_CHARS = 64 * 1024
OFFLOAD_MIN_IDS = 16 * 1024

# The worker process's tokenizer: set once by the pool's initializer. A process pool can
# hand state to its workers only this way; it lives in the worker processes alone.
_worker_tokenizer: Any = None


def _init_worker(model_dir: str) -> None:
    global _worker_tokenizer
    from engine.tokenizer import load_tokenizer

    # Slightly behind the router under CPU contention, so its loop goes first, but not so
    # far that other busy processes on the machine starve the tokenizing (a risk at nice 10)
    os.nice(3)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _worker_tokenizer = load_tokenizer(model_dir)


def _exit_with_parent(parent: int) -> None:
    """End this worker once the router is gone, however it went (even SIGKILL): the pool's
    queues give a worker no end-of-file, since each worker holds both ends of its pipe."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _encode(text: str, add_special_tokens: bool) -> array:
    return array("i", _worker_tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _decode(ids: array, kwargs: dict[str, Any]) -> str:
    return str(_worker_tokenizer.decode(ids.tolist(), **kwargs))


class OffloadingTokenizer:
    """The model's tokenizer, with ``encode``/``decode`` of long inputs sent to processes.

    Every other attribute is the wrapped tokenizer's. Call it from a worker thread, never
    from the event loop: it blocks until a process has answered.
    """

    def __init__(self, tokenizer: Any, model_dir: str, processes: int) -> None:
        self._tokenizer = tokenizer
        self._model_dir = model_dir
        self._processes = processes  # 0 (or no model_dir to load from): never offload
        self._pool: ProcessPoolExecutor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def _enabled(self) -> bool:
        return self._processes > 0 and bool(self._model_dir)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: forking a process that runs gRPC and threads is unsafe
            self._pool = ProcessPoolExecutor(
                self._processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self._model_dir,))
        return self._pool

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if (kwargs or not self._enabled() or not isinstance(text, str)
                or len(text) < OFFLOAD_MIN_CHARS):
            return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens,
                                               **kwargs))
        return self._executor().submit(_encode, text, add_special_tokens).result().tolist()

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        if not self._enabled() or len(ids) < OFFLOAD_MIN_IDS:
            return str(self._tokenizer.decode(ids, **kwargs))
        return self._executor().submit(_decode, array("i", ids), kwargs).result()

    def close(self) -> None:
        """Stop the workers (waits for an encode in progress, a second or two at most), so
        that none outlives the router."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
