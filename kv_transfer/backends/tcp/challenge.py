"""The tcp backend's admission check: a sender proves it holds the shared service token.

When the pods have a token (``--grpc-token-file``), the receiver opens every accepted
connection with a fresh random challenge; the sender must answer with
HMAC-SHA256(token, label + challenge) before any frame is read, or the connection is
closed. The token itself never crosses the wire, and an answer cannot be replayed on
another connection. The KV bytes that follow are not encrypted (TLS would cut the
transfer rate); keep the KV network private, as the gRPC links' TLS does not cover it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket

from kv_transfer.aio import recv_into, send_buffers

CHALLENGE_BYTES = 32
_LABEL = b"pdserve-kv-tcp-v1:"


def _proof(token: str, challenge: bytes) -> bytes:
    return hmac.new(token.encode(), _LABEL + challenge, hashlib.sha256).digest()


async def admit(loop: asyncio.AbstractEventLoop, sock: socket.socket, token: str,
                timeout: float) -> bool:
    """Receiver side: challenge the peer; True if it answered with the right proof."""
    challenge = os.urandom(CHALLENGE_BYTES)
    answer = bytearray(CHALLENGE_BYTES)

    async def exchange() -> None:
        await send_buffers(loop, sock, [challenge])
        await recv_into(loop, sock, memoryview(answer))

    try:
        await asyncio.wait_for(exchange(), timeout)
    except (TimeoutError, OSError):
        return False
    return hmac.compare_digest(bytes(answer), _proof(token, challenge))


async def prove(loop: asyncio.AbstractEventLoop, sock: socket.socket, token: str,
                timeout: float) -> None:
    """Sender side: answer the receiver's challenge (ConnectionError if none comes)."""
    challenge = bytearray(CHALLENGE_BYTES)
    try:
        await asyncio.wait_for(recv_into(loop, sock, memoryview(challenge)), timeout)
    except TimeoutError:
        raise ConnectionError("the KV receiver sent no token challenge (does it have "
                              "--grpc-token-file?)") from None
    await send_buffers(loop, sock, [_proof(token, bytes(challenge))])
