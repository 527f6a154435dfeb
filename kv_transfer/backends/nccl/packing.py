"""One NCCL message per group of layers: the blocks of several layers packed together.

Every NCCL send or receive costs a fixed few microseconds of its own on the GPU, and a
group of many small ones costs their sum: on two H200s one 16 MiB message took 97 us and
the same bytes as 16 messages 295 us (bench/RESULTS.md, issue 9), while the connector sent
two messages (K and V) per layer. So each end packs a group's layers into one contiguous
buffer -- ``[layers, 2, blocks, block_size, kv_heads, head_dim]``, layer-major, K before V,
blocks in the order the request names them -- and moves it as one message. Packing is one
copy per layer (a slice copy for a run of consecutive blocks, an ``index_select`` or
``index_copy_`` otherwise), queued on the caller's stream: memory-bound and far cheaper on
the GPU than the messages it saves.

Plain torch, the same on any device: the CPU tests check it against block-by-block copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def empty_packed(layer_cache: torch.Tensor, num_layers: int, num_blocks: int) -> torch.Tensor:
    """A packed buffer for ``num_layers`` layers of ``num_blocks`` blocks, given one layer's
    cache ``[2, pool_blocks, ...]``: its dtype and device, on the current stream."""
    return torch.empty((num_layers, 2, num_blocks, *layer_cache.shape[2:]),
                       dtype=layer_cache.dtype, device=layer_cache.device)


def pack(layers: Sequence[torch.Tensor], index: torch.Tensor | None, run_start: int | None,
         num_blocks: int, out: torch.Tensor) -> None:
    """Copy the named blocks of each cache in ``layers`` into ``out[i]`` (``empty_packed``).
    ``run_start``: the first block when they are one run of consecutive ids (then
    ``index`` is not read); else ``index`` holds the block ids (int64, on the caches'
    device)."""
    for i, cache in enumerate(layers):
        if run_start is not None:
            out[i].copy_(cache[:, run_start:run_start + num_blocks])
        else:
            assert index is not None
            torch.index_select(cache, 1, index, out=out[i])


def unpack(packed: torch.Tensor, layers: Sequence[torch.Tensor], index: torch.Tensor | None,
           run_start: int | None) -> None:
    """The reverse of ``pack``: ``packed[i]`` into the named blocks of ``layers[i]``."""
    num_blocks = packed.shape[2]
    for i, cache in enumerate(layers):
        if run_start is not None:
            cache[:, run_start:run_start + num_blocks].copy_(packed[i])
        else:
            assert index is not None
            cache.index_copy_(1, index, packed[i])
