"""How a step's grammar mask rows are filled: llguidance's call, and the setup that keeps a
fill short on a GPU's host (issue 14).

llguidance's ``LLMatcher.deep_copy`` is shallow: every copy of a template shares its
parser's lexer state behind one mutex, held for a whole mask. Rows of one grammar thus fill
one at a time, and more threads only contend (32 JSON rows on an H200's host: 1.24 ms on one
thread, 1.02 on two, 2.08 on sixteen; bench/grammar_fill.py, bench/RESULTS.md 2026-12-02).
So on a GPU sequences are spread over ``replicas`` templates compiled independently (each
with its own lock and lexer cache) and the rows handed to llguidance grouped by template.
"""

from __future__ import annotations

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
    threads: llguidance threads of a fill of up to SMALL_FILL_ROWS rows."""

    replicas: int = 1
    threads: int = 1

    @classmethod
    def for_device(cls, device: torch.device) -> FillSetup:
        """On a GPU 4 x 4: 32 JSON rows in 0.78 ms against 1.24 with 1 x 1 on an H200's host
        (16 or 32 templates: 0.69-0.73 ms, for four to eight times the compiles). On a CPU
        the forward runs on the engine thread with every core: one template, one thread."""
        return cls(4, 4) if device.type == "cuda" else cls()
