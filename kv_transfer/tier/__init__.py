"""The shared KV tier: 256-token chunks of KV in host memory and in Redis, keyed by the
prefix chain hash (engine/prefix_hash.py), checked by a binary codec, never pickled.

``KVTier`` (tier.py) is the interface the pods use; ``codec`` defines the value bytes and
moves chunks between a KV cache and payloads; ``host`` and ``redis_level`` are the levels.
"""

from __future__ import annotations

from kv_transfer.tier.codec import (
    ChunkSpec,
    CorruptReason,
    CorruptValue,
    decode_value,
    encode_value,
    pack_chunk,
    payload_layer,
    scatter_chunk,
)
from kv_transfer.tier.host import HostTier
from kv_transfer.tier.metrics import TierMetrics
from kv_transfer.tier.redis_level import RedisTierConfig, redis_key
from kv_transfer.tier.tier import KVTier, TierConfig

__all__ = [
    "ChunkSpec",
    "CorruptReason",
    "CorruptValue",
    "HostTier",
    "KVTier",
    "RedisTierConfig",
    "TierConfig",
    "TierMetrics",
    "decode_value",
    "encode_value",
    "pack_chunk",
    "payload_layer",
    "redis_key",
    "scatter_chunk",
]
