"""Kernel tests run the Triton kernels in Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any
kernels module is imported. Fixtures build random paged KV caches whose unused slots and
unused block-table entries point at NaN-filled memory: a kernel that reads past a context
turns its output into NaN instead of passing by luck.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written"
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp_min(1e-30))


@pytest.fixture
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return _rel_err


@pytest.fixture
def gen() -> torch.Generator:
    # Fresh inputs every run; g.initial_seed() recovers a failing draw.
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


@pytest.fixture
def tol() -> dict[torch.dtype, float]:
    """The issue's bar: relative error < 1e-3 in fp32, < 1e-2 in fp16/bf16."""
    return {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(slots=True)
class PagedKV:
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hk, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32


def make_paged_kv(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, g: torch.Generator, spare_blocks: int = 3) -> PagedKV:
    """Random K/V for each sequence's first ``lens[i]`` tokens in shuffled blocks; every
    other cache slot (block tails, spare blocks) and every unused table entry is NaN."""
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + spare_blocks + 1
    poison_block = num_blocks - 1
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                       dtype=dtype)
    max_blocks = max([*need, 1]) + 1
    tables = torch.full((len(lens), max_blocks), poison_block, dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1, generator=g)
    used = 0
    for i, n in enumerate(lens):
        ids = perm[used:used + need[i]]
        used += need[i]
        tables[i, :need[i]] = ids.int()
        flat = cache[:, ids.long()].flatten(1, 2)  # [2, need*bs, Hk, D] copy
        flat[:, :n] = torch.randn((2, n, num_kv_heads, head_dim), generator=g).to(dtype)
        cache[:, ids.long()] = flat.view(2, need[i], block_size, num_kv_heads, head_dim)
    return PagedKV(cache, tables, torch.tensor(lens, dtype=torch.int32))


@pytest.fixture
def paged_kv() -> Callable[..., PagedKV]:
    return make_paged_kv
