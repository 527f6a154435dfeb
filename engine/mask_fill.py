"""How a step's grammar mask rows are filled: llguidance's call, and the setup that makes a
fill short enough to hide under a GPU forward (issue 14).

Two things kept a 32-row JSON fill at ~1.2 ms on an H200's host whatever the thread count
(bench/grammar_fill.py, bench/RESULTS.md 2026-12-02):
- llguidance's ``LLMatcher.deep_copy`` is shallow: every copy of a template shares its
  parser's lexer state behind one mutex, held for a whole mask. Rows of one grammar thus
  fill one at a time, and more threads only contend (16 threads: 2.1 ms). Sequences are
  therefore spread over ``replicas`` templates compiled independently (each with its own
  lock and lexer cache) and the rows handed to llguidance grouped by template.
- The mask worker needs the GIL back when llguidance returns, before it can open the host
  gate; while the engine thread runs Python that takes a switch interval (0.64 ms at a GPU
  pod's 0.5 ms, bench/gil_handoff.py on the H200's host). The interval is lowered while a
  fill runs (``FillWindow``) and restored by the worker once it has the GIL again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


def fill_rows(executor: Any, pairs: list[tuple[Any, int]], out: torch.Tensor) -> None:
    """Fill row i of ``out`` (contiguous int32, host) from each (matcher, i), in parallel
    on llguidance's threads without the GIL. (llguidance.torch wraps the same call, but
    importing it sets up torch.compile, which costs seconds.)"""
    assert out.dtype == torch.int32 and out.is_contiguous() and out.device.type == "cpu"
    executor.unsafe_compute_mask_ptr(pairs, out.data_ptr(), out.shape[1] * 4, out.shape[0])


@dataclass(frozen=True, slots=True)
class FillSetup:
    """replicas: templates compiled per grammar, sequences spread over them round-robin;
    threads: llguidance threads of a fill of up to SMALL_FILL_ROWS rows; switch_interval_s:
    Python's switch interval while a fill runs on the worker (None: left alone)."""

    replicas: int = 1
    threads: int = 1
    switch_interval_s: float | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> FillSetup:
        """On a GPU: 4 x 4 (32 JSON rows in 0.78 ms against 1.24 with 1 x 1 on an H200's
        host; 16 templates gained 0.05 ms more for four times the compiles) and a 50 us
        switch interval during the fill. On a CPU the forward runs on the engine thread
        with every core: one fill thread, nothing changed."""
        return cls(4, 4, 5e-5) if device.type == "cuda" else cls()


class FillWindow:
    """Python's GIL switch interval lowered from a fill's start until its worker holds the
    GIL again (interpreter-wide state: at most one fill runs at a time)."""

    def __init__(self) -> None:
        self._restore: float | None = None  # the interval to go back to

    def open(self, interval_s: float | None) -> None:
        if interval_s is None:
            return
        if self._restore is None:
            self._restore = sys.getswitchinterval()
        sys.setswitchinterval(interval_s)

    def close(self) -> None:
        if self._restore is not None:
            sys.setswitchinterval(self._restore)
            self._restore = None
