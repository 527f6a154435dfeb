"""The ``tcp`` backend: KV frames over plain asyncio sockets, through host memory.

Always available (CPU and GPU caches alike); the CPU test default. sender.py describes the
protocol, receiver.py the listening end.
"""

from __future__ import annotations

from kv_transfer.backends.tcp.receiver import TcpReceiver
from kv_transfer.backends.tcp.sender import TcpSender
from kv_transfer.registry import Backend

BACKEND = Backend(
    name="tcp", summary="asyncio sockets through host memory (always available)",
    receiver=TcpReceiver, sender=TcpSender)

__all__ = ["BACKEND", "TcpReceiver", "TcpSender"]
