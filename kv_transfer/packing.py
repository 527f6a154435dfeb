"""Packing layers of a pod's registered KV memory off the engine thread.

The forward only says "layer i of these blocks is written" (``SendHandle.layer_written``);
a ``LayerPacker`` -- one thread per sender, and on CUDA its own stream -- then gathers the
blocks into one contiguous buffer (the wire format of kv_transfer/wire.py), after waiting
on the layer's ready event, and hands it to the backend. So the engine thread never copies
and never waits for a transfer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv_layout import KVMemory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    layer: int
    block_ids: list[int]
    ready: Any | None  # torch.cuda.Event on CUDA
    deliver: Callable[[torch.Tensor], None]
    fail: Callable[[BaseException], None]


class LayerPacker:
    """Gathers ``memory.layers[layer][:, block_ids]`` on a thread of its own.

    ``to_host``: packed layers of a device cache are copied to (pinned) host memory, for
    backends that move bytes through the host (tcp)."""

    def __init__(self, memory: KVMemory, name: str, *, to_host: bool = False) -> None:
        self.memory = memory
        self.to_host = to_host and memory.device.type != "cpu"
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stream = torch.cuda.Stream(memory.device) if memory.device.type == "cuda" \
            else None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, layer: int, block_ids: Sequence[int], ready: Any | None,
               deliver: Callable[[torch.Tensor], None],
               fail: Callable[[BaseException], None]) -> None:
        """Queue one layer; ``deliver(packed)`` or ``fail(error)`` runs on the packer thread.
        Cheap and non-blocking: the engine thread calls it inside the forward."""
        self._jobs.put(_Job(layer, list(block_ids), ready, deliver, fail))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                packed = self._pack(job)
            except Exception as exc:  # the transfer fails; the packer serves the next
                log.exception("packing layer %d failed", job.layer)
                job.fail(exc)
                continue
            try:
                job.deliver(packed)
            except Exception as exc:
                log.exception("delivering layer %d failed", job.layer)
                job.fail(exc)

    def _pack(self, job: _Job) -> torch.Tensor:
        kv = self.memory.layers[job.layer]
        if self._stream is None:
            idx = torch.tensor(job.block_ids, dtype=torch.long)
            return kv.index_select(1, idx)
        with torch.cuda.stream(self._stream):
            if job.ready is not None:
                self._stream.wait_event(job.ready)
            idx = torch.tensor(job.block_ids, dtype=torch.long).to(kv.device, non_blocking=True)
            packed = kv.index_select(1, idx)
            if self.to_host:
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                packed = host
            self._stream.synchronize()  # this thread waits, never the engine's
        return packed
