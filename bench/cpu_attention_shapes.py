"""How the CPU attention paths compare at serving's shapes (issue 15).

Decode (one query token per sequence over a random paged cache): the C kernel
(kernels/cpu_native.py, reading the cache directly) against the torch path with its gather
into a padded batch, both with SDPA's own ``enable_gqa`` and with each KV head's query heads
folded into the query length ([n, Hk, G, D], what kernels/cpu_attention.py does when the C
kernel is absent). Prefill (one causal sequence of new tokens): the C kernel against SDPA
with ``enable_gqa`` and with K/V repeated per query head. Every variant is checked against
the first on the same random inputs (max abs difference printed); one thread, bf16 and
fp32:

    .venv/bin/python bench/cpu_attention_shapes.py [--heads 8 --kv-heads 4 --head-dim 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import cpu_native

BLOCK = 16


def _time_us(fn: Callable[[], torch.Tensor], iters: int) -> float:
    for _ in range(max(3, iters // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def _paged(contexts: list[int], hk: int, d: int, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random cache, each sequence's blocks shuffled: (cache, tables int32, contexts)."""
    need = [(c + BLOCK - 1) // BLOCK for c in contexts]
    cache = torch.randn(2, sum(need) + 1, BLOCK, hk, d).to(dtype)
    perm = torch.randperm(sum(need)).int()
    tables = torch.zeros(len(contexts), max(need), dtype=torch.int32)
    used = 0
    for i, k in enumerate(need):
        tables[i, :k] = perm[used:used + k]
        used += k
    return cache, tables, torch.tensor(contexts, dtype=torch.int32)


def decode_variants(n: int, length: int, hq: int, hk: int, d: int, dtype: torch.dtype
                    ) -> dict[str, Callable[[], torch.Tensor]]:
    g = hq // hk
    cache, tables, ctx = _paged([length] * n, hk, d, dtype)
    q = torch.randn(n, hq, d, dtype=dtype)
    pos = torch.arange(length)
    slots = (tables.long()[:, pos // BLOCK] * BLOCK + pos % BLOCK).flatten()
    mask = torch.ones(n, 1, 1, length, dtype=torch.bool)
    scale = d ** -0.5

    def gathered() -> torch.Tensor:
        flat = cache.view(2, -1, hk, d)
        return flat.index_select(1, slots).view(2, n, length, hk, d).transpose(2, 3)

    def gqa() -> torch.Tensor:
        kv = gathered()
        return F.scaled_dot_product_attention(q.view(n, hq, 1, d), kv[0], kv[1],
                                              attn_mask=mask, scale=scale,
                                              enable_gqa=True).view(n, hq, d)

    def folded() -> torch.Tensor:
        kv = gathered()
        return F.scaled_dot_product_attention(q.view(n, hk, g, d), kv[0], kv[1],
                                              attn_mask=mask, scale=scale).view(n, hq, d)

    variants = {"gather+enable_gqa": gqa, "gather+folded": folded}
    if cpu_native.serves(cache):
        variants["C kernel"] = lambda: cpu_native.paged_decode_attention(q, cache, tables, ctx,
                                                                        scale)
    return variants


def prefill_variants(length: int, hq: int, hk: int, d: int, dtype: torch.dtype
                     ) -> dict[str, Callable[[], torch.Tensor]]:
    cache, tables, _ = _paged([length], hk, d, dtype)
    pos = torch.arange(length)
    slots = tables.long()[0, pos // BLOCK] * BLOCK + pos % BLOCK
    k, v = cache.view(2, -1, hk, d).index_select(1, slots).transpose(1, 2).unsqueeze(1)
    q = torch.randn(length, hq, d, dtype=dtype)
    qt = q.transpose(0, 1).unsqueeze(0)
    g = hq // hk
    variants = {
        "enable_gqa": lambda: F.scaled_dot_product_attention(
            qt, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1),
        "repeat_kv": lambda: F.scaled_dot_product_attention(
            qt, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
            is_causal=True)[0].transpose(0, 1),
    }
    if cpu_native.serves(cache):
        out = torch.empty_like(q)

        def native() -> torch.Tensor:
            cpu_native.paged_prefill_attention(q, cache, tables[0], length, d ** -0.5, out)
            return out

        variants["C kernel"] = native
    return variants


def report(name: str, variants: dict[str, Callable[[], torch.Tensor]], iters: int) -> None:
    first = None
    cells = []
    for label, fn in variants.items():
        out = fn().float()
        first = out if first is None else first
        err = (out - first).abs().max().item()
        cells.append(f"{label} {_time_us(fn, iters):8.0f} us (diff {err:.1e})")
    print(f"{name:28s} " + " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hq, hk, d = args.heads, args.kv_heads, args.head_dim
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).removeprefix("torch.")
        for n, length in ((1, 96), (4, 560), (16, 96), (16, 560), (64, 200)):
            report(f"decode {tag} n={n} L={length}",
                   decode_variants(n, length, hq, hk, d, dtype), args.iters)
        for length in (64, 523, 1024):
            report(f"prefill {tag} T={length}", prefill_variants(length, hq, hk, d, dtype),
                   max(5, args.iters // 10))


if __name__ == "__main__":
    main()
