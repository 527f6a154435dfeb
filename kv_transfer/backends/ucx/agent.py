"""A NIXL agent and the one thread that makes every call on it.

NIXL's agents are not thread-safe unless built so, and the callers here are many (the
engine thread queues layers, gRPC tasks register transfers, waits time out anywhere), so
each connector end owns one ``AgentLoop``: callers queue commands, and the loop thread
runs them between polls of the agent's notifications and of its owner's transfers. It
polls often while transfers are in flight and sleeps on its queue otherwise.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from engine.errors import KVTransferError
from engine.kv_layout import KVMemory
from kv_transfer.backends.ucx.protocol import Notif

log = logging.getLogger(__name__)
T = TypeVar("T")

# What NIXL's users set against UCX's memory growth (vLLM's NixlConnector does the same);
# users may override them, and pass UCX_TLS / UCX_NET_DEVICES as they like.
UCX_DEFAULTS = {"UCX_RCACHE_MAX_UNRELEASED": "1024", "UCX_MEM_MMAP_HOOK_MODE": "none"}
_BUSY_POLL_S = 0.0002
_IDLE_POLL_S = 0.05


def nixl_missing() -> str | None:
    """Why NIXL cannot be used here, or None."""
    try:
        import nixl._api  # noqa: F401
    except ImportError as exc:
        return (f"NIXL is not installed ({exc}); install it with "
                "`pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1`")
    return None


class AgentLoop:
    def __init__(self, name: str, memory: KVMemory,
                 on_notif: Callable[[str, Notif], None], on_tick: Callable[[], bool],
                 staging: torch.Tensor | None = None) -> None:
        """``on_notif(agent, notif)`` handles a peer's notification and ``on_tick()`` checks
        the owner's transfers (returning whether any is in flight); both on the loop thread.
        ``staging``: a byte buffer registered beside the KV memory (staging.py).
        """
        why = nixl_missing()
        if why is not None:
            raise KVTransferError(why)
        for key, value in UCX_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = name
        # No NIXL progress thread: it spins without pause (pthrDelay 0), a whole core on a
        # small machine. This loop drives progress instead, through its own polls.
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False,
                                                        backends=["UCX"]))
        self.mem_type = "VRAM" if memory.device.type == "cuda" else "DRAM"
        regions = list(memory.layers) + ([staging] if staging is not None
                                         and staging.numel() else [])
        self._registered = self.agent.register_memory(regions)
        self.metadata: bytes = self.agent.get_agent_metadata()
        self._on_notif = on_notif
        self._on_tick = on_tick
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"nixl-{name}", daemon=True)
        self._thread.start()

    # -- callers' side ----------------------------------------------------------------

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread soon (never blocks)."""
        self._commands.put(fn)

    def run(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            done.set()

        self._commands.put(job)
        if not done.wait(timeout):
            raise KVTransferError(f"the NIXL agent {self.name} did not answer in {timeout:g}s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def notify(self, agent: str, notif: Notif) -> None:
        """Send ``notif`` to a peer agent (loop thread only); a failure is logged."""
        try:
            self.agent.send_notif(agent, notif.encode())
        except Exception as exc:  # a dead or unknown peer: its transfers time out
            log.warning("ucx %s: notifying %s of %s failed: %s", self.name, agent, notif, exc)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=5)
        try:
            self.agent.deregister_memory(self._registered)
        except Exception:  # the process is going away; the OS reclaims it
            log.exception("ucx %s: deregistering memory failed", self.name)
        del self.agent  # the agent's own threads and UCX workers end with it

    # -- the loop thread --------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while True:
            try:
                cmd = self._commands.get(timeout=_BUSY_POLL_S if busy else _IDLE_POLL_S)
            except queue.Empty:
                cmd = _NOTHING
            while cmd is not _NOTHING:
                if cmd is None:
                    return
                try:
                    cmd()
                except Exception:
                    log.exception("ucx %s: a command failed", self.name)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = _NOTHING
            try:
                self._poll_notifs()
                busy = self._on_tick()
            except Exception:
                log.exception("ucx %s: polling failed", self.name)

    def _poll_notifs(self) -> None:
        for agent, messages in self.agent.get_new_notifs().items():
            peer = agent.decode("ascii", "replace") if isinstance(agent, bytes) else agent
            for raw in messages:
                try:
                    notif = Notif.decode(raw)
                except KVTransferError as exc:  # junk from a peer: dropped, never executed
                    log.warning("ucx %s: ignoring a notification from %s: %s", self.name,
                                peer, exc)
                    continue
                self._on_notif(peer, notif)


def _nothing() -> None:
    pass


_NOTHING: Callable[[], None] = _nothing
