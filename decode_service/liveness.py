"""Whether a prefill pod still answers, while a decode pod waits on it.

A Prefill call answers only once the prompt's KV has been computed and sent, so its own
deadline (``--prefill-timeout``, a minute by default) must allow for a long prompt on a busy
pod. A pod that stopped answering altogether -- SIGSTOP, a hung host, a lost network -- would
hold every request sent to it for that whole minute. So while requests wait on a prefill
pod, one pinger per pod sends it a standard health check; each must be answered within
``timeout_s`` (any answer will do: a draining pod is alive). The first unanswered ping wakes
every request waiting on that pod, which then prefill locally. A pod that is merely busy
answers its pings (the gRPC server runs beside the engine thread), so it is waited for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Ping = Callable[[str, float], Awaitable[None]]  # (endpoint, timeout_s); raises if unanswered


@dataclass(slots=True)
class _Watch:
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: int = 0
    task: asyncio.Task | None = None


class PeerLiveness:
    def __init__(self, ping: Ping, timeout_s: float) -> None:
        self.ping = ping
        self.timeout_s = timeout_s
        self._watches: dict[str, _Watch] = {}

    async def stalled(self, endpoint: str) -> None:
        """Returns once ``endpoint`` has left a ping unanswered for ``timeout_s``; until then
        it waits (cancel it when the call it guards is over)."""
        watch = self._watches.get(endpoint)
        if watch is None or watch.stalled.is_set():
            watch = self._watches[endpoint] = _Watch()
            watch.task = asyncio.create_task(self._pinger(endpoint, watch))
        watch.waiters += 1
        try:
            await watch.stalled.wait()
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and watch.task is not None and not watch.stalled.is_set():
                watch.task.cancel()  # nobody waits on this pod any more
                if self._watches.get(endpoint) is watch:
                    del self._watches[endpoint]

    async def _pinger(self, endpoint: str, watch: _Watch) -> None:
        while True:
            try:
                await self.ping(endpoint, self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unanswered (or refused): the pod is not there
                log.warning("prefill pod %s left a ping unanswered for %.1f s (%s)",
                            endpoint, self.timeout_s, exc)
                watch.stalled.set()
                return
            await asyncio.sleep(self.timeout_s / 2)
