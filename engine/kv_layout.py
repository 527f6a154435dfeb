"""The one definition of the paged KV cache layout and its fingerprint.

Per layer the cache is one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(K then V) in the model dtype (DESIGN.md, "KV cache layout"). Everything that touches KV
bytes -- the model forward, the connectors, the shared KV tier -- takes its shapes from a
``KVLayout`` and compares ``fingerprint`` before any byte moves.
"""

from __future__ import annotations

import hashlib
import json
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
