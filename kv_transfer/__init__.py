"""Moving KV between processes: the connector interface, its backends and the wire format.

Services call ``make_receiver`` (decode side) and ``make_sender`` (prefill side); the
backends (``tcp``, ``local``) live in their own modules and are chosen by name.
"""

from __future__ import annotations

from kv_transfer.connector import (
    KVReceiver,
    KVSender,
    KVTargetSpec,
    PendingTransfer,
    SendHandle,
    TransferStats,
    make_receiver,
    make_sender,
)
from kv_transfer.local import LocalHub
from kv_transfer.wire import pack_layer, scatter_layer

__version__ = "0.1.0"

__all__ = [
    "KVReceiver",
    "KVSender",
    "KVTargetSpec",
    "LocalHub",
    "PendingTransfer",
    "SendHandle",
    "TransferStats",
    "make_receiver",
    "make_sender",
    "pack_layer",
    "scatter_layer",
]
