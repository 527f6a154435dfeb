"""The one definition of the paged KV cache layout and its fingerprint.

Per layer the cache is one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K then V) in the model dtype (DESIGN.md, "KV cache layout"). Everything that touches KV
bytes -- the model forward, the connectors, the shared KV tier -- takes its shapes from a
``KVLayout`` and compares ``fingerprint`` before any byte moves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


@dataclass(frozen=True, slots=True)
class KVLayout:
    model_id: str  # hash of the model's config.json content: same model, same id
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    def layer_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of one block in one layer, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def packed_layer_bytes(self, num_blocks: int) -> int:
        """Size of one layer's packed buffer for ``num_blocks`` blocks (the wire format)."""
        return num_blocks * self.block_bytes_per_layer

    @property
    def fingerprint(self) -> str:
        fields = [
            self.model_id, self.dtype, self.block_size, self.num_layers,
            self.num_kv_heads, self.head_dim, self.tp_rank, self.tp_size,
        ]
        return hashlib.blake2b(json.dumps(fields).encode(), digest_size=8).hexdigest()


def model_id_from_config(config_dict: dict) -> str:
    """A stable id for a model's identity: its config.json content, key-sorted."""
    blob = json.dumps(config_dict, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


@dataclass(frozen=True, slots=True)
class LayerRegion:
    """Where one layer's cache lives: what a transport registers (NIXL, NCCL) or views."""

    address: int  # data_ptr() of the layer's tensor
    nbytes: int
    strides: tuple[int, ...]  # in elements, of [2, num_blocks, block_size, kv_heads, head_dim]


@dataclass(frozen=True, slots=True)
class KVMemory:
    """A pod's KV cache, described once at start-up and handed to its connector once.

    The connector's worker side keeps it for the pod's life: per request only block ids
    travel. ``layers`` are the engine's own cache tensors (never copies), so the connector
    is the only other code that reads or writes them, and only the blocks a request names.
    """

    layout: KVLayout
    layers: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.layers) != self.layout.num_layers:
            raise ValueError(f"{len(self.layers)} cache tensors for "
                             f"{self.layout.num_layers} layers")
        first = self.layers[0]
        for kv in self.layers:
            if (kv.dim() != 5 or kv.shape[0] != 2 or kv.shape[1] != first.shape[1]
                    or tuple(kv.shape[2:]) != self.layout.layer_shape(0)[2:]):
                raise ValueError(f"cache of shape {tuple(kv.shape)} does not fit {self.layout}")
            if kv.dtype != self.layout.torch_dtype or kv.device != first.device:
                raise ValueError("cache tensors must share the layout's dtype and one device")
            if not kv.is_contiguous():
                raise ValueError("cache tensors must be contiguous")

    @property
    def num_blocks(self) -> int:
        return int(self.layers[0].shape[1])

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint

    def regions(self) -> list[LayerRegion]:
        return [LayerRegion(kv.data_ptr(), kv.numel() * kv.element_size(), tuple(kv.stride()))
                for kv in self.layers]

    def check_block_ids(self, block_ids: Sequence[int]) -> list[int]:
        """Block ids as a list of distinct ints within the cache; ValueError otherwise."""
        ids = [int(b) for b in block_ids]
        if not ids:
            raise ValueError("a transfer needs at least one block id")
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.num_blocks:
            raise ValueError(f"block ids must be distinct and within 0..{self.num_blocks - 1}")
        return ids
