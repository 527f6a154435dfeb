"""Moving KV between processes: the connector interface, its backends and the wire format.

Pods build their connector ends once over their KV memory with ``make_receiver`` (decode
side) and ``make_sender`` (prefill side); backends are found by name in the registry
(kv_transfer/registry.py), each in its own module under kv_transfer/backends/.
"""

from __future__ import annotations

from kv_transfer.connector import (
    ConnectorConfig,
    KVReceiver,
    KVSender,
    KVTargetSpec,
    PendingTransfer,
    SendHandle,
    TransferStats,
    check_layout,
    introduce,
)
from kv_transfer.registry import (
    Backend,
    all_backends,
    backend_names,
    make_receiver,
    make_sender,
)
from kv_transfer.wire import pack_layer, scatter_layer

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ConnectorConfig",
    "KVReceiver",
    "KVSender",
    "KVTargetSpec",
    "PendingTransfer",
    "SendHandle",
    "TransferStats",
    "all_backends",
    "backend_names",
    "check_layout",
    "introduce",
    "make_receiver",
    "make_sender",
    "pack_layer",
    "scatter_layer",
]
