"""Channels between pods (protos/channels.py): one per peer, reused, and closed once idle
-- so a prefill pod that left its pool does not keep a decode pod's channel alive."""

from __future__ import annotations

import asyncio

from protos.channels import ChannelCache


def test_a_channel_is_reused_while_used_and_closed_once_idle() -> None:
    async def main() -> None:
        cache = ChannelCache(idle_s=0.2)
        first = await cache.get("127.0.0.1:1")
        assert await cache.get("127.0.0.1:1") is first  # one channel per peer
        await asyncio.sleep(0.3)
        await cache.get("127.0.0.1:2")  # any use sweeps the idle ones
        assert cache.addresses() == ["127.0.0.1:2"]
        again = await cache.get("127.0.0.1:1")
        assert again is not first  # the old one was closed; a new one is opened
        await cache.drop("127.0.0.1:1")  # a peer that failed goes at once
        assert cache.addresses() == ["127.0.0.1:2"]
        await cache.close()
        assert cache.addresses() == []

    asyncio.run(main())
