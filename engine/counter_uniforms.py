"""Counter-based uniforms: the random number behind a sequence's k-th token is a pure
function of (request seed, sequence index, k), so a seeded request gives the same tokens
wherever and in whatever batch it was sampled (engine.sampler)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64 (wrapping: the caller ignores overflow)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def counter_uniforms(seeds: Seq[int], indices: Seq[int], positions: Seq[int]) -> np.ndarray:
    """One uniform in (0, 1) per row, a pure function of (seed, index, position).

    A chained splitmix64 over the three counters; 24 bits of the result make a float32
    exactly, offset by half a step so that neither 0 nor 1 can come out.
    """
    s = np.array([v & 0xFFFFFFFFFFFFFFFF for v in seeds], dtype=np.uint64)
    i = np.array(indices, dtype=np.uint64)
    p = np.array(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):  # (once: entering it costs more than the arithmetic)
        z = _splitmix64(_splitmix64(_splitmix64(s) ^ i) ^ p)
    return (((z >> _S40).astype(np.float64) + 0.5) / float(1 << 24)).astype(np.float32)
