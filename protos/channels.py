"""gRPC client channels between pods: their options, and a cache that closes what is idle.

One channel per peer address, reused by every call. A peer that leaves (a prefill pod
scaled away, a DNS name that stopped resolving to it) must not keep a channel -- and its
reconnect attempts -- alive forever, so channels unused for ``idle_s`` are closed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from protos.security import LinkSecurity

# KV never travels over gRPC, but token lists of long prompts (and n long sequences with
# top-20 logprobs) can pass gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A pod that is down (or not up yet) must be retried within about a second, not after
    # gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def open_channel(address: str, security: LinkSecurity | None = None) -> grpc.aio.Channel:
    """A channel to ``address``: TLS and the service token when ``security`` has them."""
    security = security or LinkSecurity()
    options = [*CHANNEL_OPTIONS, *security.channel_options()]
    interceptors = security.client_interceptors() or None
    credentials = security.channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


@dataclass(slots=True)
class ChannelCache:
    idle_s: float = 60.0
    security: LinkSecurity | None = None
    _channels: dict[str, tuple[grpc.aio.Channel, float]] = field(default_factory=dict)

    async def get(self, address: str) -> grpc.aio.Channel:
        """The channel to ``address`` (opened on first use); closes those idle too long."""
        now = time.monotonic()
        for other, (channel, used) in list(self._channels.items()):
            if other != address and now - used > self.idle_s:
                del self._channels[other]
                await channel.close()
        entry = self._channels.get(address)
        channel = entry[0] if entry is not None else open_channel(address, self.security)
        self._channels[address] = (channel, now)
        return channel

    async def drop(self, address: str) -> None:
        """Close the channel to a peer that failed or left."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            await entry[0].close()

    def addresses(self) -> list[str]:
        return list(self._channels)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close()
