"""The bytes two ``nccl`` ends exchange: the handshake (over gRPC) and the per-layer
header that precedes each layer's data on the link. Parsed strictly with ``struct``;
nothing from a peer is ever executed.

On a link the sender decides the order: for each layer it sends a 128-byte header (which
transfer, which layer, how many blocks; or an abort) and then the layer's blocks packed
``[2, n, block_size, kv_heads, head_dim]``. The receiver reads the header first and posts
the matching receive into a staging buffer, then scatters it into the reserved blocks
(or into scratch, for a transfer it no longer wants) -- so both ranks always agree on the
order of operations, whatever the requests' interleaving.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from engine.errors import KVTransferError

UID_BYTES = 128
_HELLO = struct.Struct("<4sHB1x128s32s64s")  # magic, version, role, uid, fingerprint, name
_HEADER = struct.Struct("<4sHHII64s48x")  # magic, version, kind, layer, blocks, tid
HEADER_BYTES = _HEADER.size
VERSION = 1
DATA, ABORT = 1, 2
ROLE_RECEIVER, ROLE_SENDER = 1, 2


def _text(raw: bytes, what: str) -> str:
    raw = raw.rstrip(b"\0")
    if not raw or not all(0x21 <= c <= 0x7E for c in raw):
        raise KVTransferError(f"bad nccl {what}")
    return raw.decode("ascii")


@dataclass(frozen=True, slots=True)
class Hello:
    """One end's handshake: the communicator's unique id (the receiver makes it), the KV
    layout fingerprint, and the receiver's address (the KVTarget address for it)."""

    role: int
    unique_id: bytes
    fingerprint: str
    address: str

    def encode(self) -> bytes:
        return _HELLO.pack(b"PDNH", VERSION, self.role, self.unique_id,
                           self.fingerprint.encode("ascii"), self.address.encode("ascii"))

    @classmethod
    def decode(cls, raw: bytes, role: int) -> Hello:
        if len(raw) != _HELLO.size:
            raise KVTransferError("bad nccl handshake: wrong size")
        magic, version, got_role, uid, fp, name = _HELLO.unpack(raw)
        if magic != b"PDNH" or version != VERSION or got_role != role:
            raise KVTransferError("bad nccl handshake: wrong magic, version or role")
        return cls(got_role, bytes(uid), _text(fp, "fingerprint"), _text(name, "address"))


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    transfer_id: str
    layer: int = 0
    num_blocks: int = 0

    def encode(self) -> bytes:
        return _HEADER.pack(b"PDNL", VERSION, self.kind, self.layer, self.num_blocks,
                            self.transfer_id.encode("ascii"))

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        magic, version, kind, layer, blocks, tid = _HEADER.unpack(raw)
        if magic != b"PDNL" or version != VERSION or kind not in (DATA, ABORT):
            raise KVTransferError("bad nccl layer header")
        return cls(kind, _text(tid, "transfer id"), layer, blocks)
