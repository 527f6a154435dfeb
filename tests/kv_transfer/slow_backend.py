"""A test-only KV connector backend, ``slowtcp``: the tcp backend whose receiver holds each
transfer's first frame for ``PDSERVE_SLOW_KV_DELAY_S`` seconds (default 0.05) before it
lands -- a slow network or a busy peer, on demand.

It lives outside kv_transfer/ and is registered only by naming this module in
``PDSERVE_KV_BACKENDS`` (with tests/kv_transfer on PYTHONPATH): the registry test uses it
to show that a backend needs no edit anywhere else, and the cadence test to keep a transfer
in flight while other requests decode.
"""

from __future__ import annotations

import os
import time

import torch

from engine.kv_layout import KVMemory
from kv_transfer import ConnectorConfig
from kv_transfer.backends.tcp import TcpReceiver, TcpSender
from kv_transfer.registry import Backend
from kv_transfer.table import Reply, TransferTable
from kv_transfer.wire import FrameHeader


class _SlowTable(TransferTable):
    def __init__(self, memory: KVMemory, delay_s: float, **kwargs: object) -> None:
        super().__init__(memory, **kwargs)  # type: ignore[arg-type]
        self._delay_s = delay_s
        self._seen: set[str] = set()

    def deliver(self, header: FrameHeader, payload: torch.Tensor | None, source: object | None,
                reply: Reply | None) -> None:
        if header.transfer_id not in self._seen:
            self._seen.add(header.transfer_id)
            time.sleep(self._delay_s)  # on the receiver's own thread, as a slow link would
        super().deliver(header, payload, source, reply)


class SlowTcpReceiver(TcpReceiver):
    def __init__(self, memory: KVMemory, config: ConnectorConfig) -> None:
        super().__init__(memory, config)
        delay = float(os.environ.get("PDSERVE_SLOW_KV_DELAY_S", "0.05"))
        self._table = _SlowTable(memory, delay, early_grace_s=config.early_grace_s,
                                 max_early_bytes=config.max_early_bytes)


BACKEND = Backend(name="slowtcp", summary="tcp with a receiver that delays (tests only)",
                  receiver=SlowTcpReceiver, sender=TcpSender)
