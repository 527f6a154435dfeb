"""The bytes two ``nccl`` ends exchange: the handshake (over gRPC) and the per-layer
header that precedes each layer's data on the link. Parsed strictly with ``struct``;
nothing from a peer is ever executed.

On a link the sender decides the order. Its headers travel on the link's TCP control
connection (control.py), its data on NCCL. Right after the communicator is up it sends one
HELLO header and a 128-byte NCCL message, so the link's lazy connection is made while both
ends are waiting for it (not when the first request comes, possibly long after). Then, for
each batch of consecutive layers of one transfer whose compute has finished, it sends a
128-byte header (which transfer, the first layer and how many, how many blocks; or an
abort) followed, per group of up to ``LAYERS_PER_GROUP`` of those layers (link.py), by
exactly one NCCL message: the group's blocks packed layer-major, K before V, in the order
the request names them (packing.py; version 3 sent two messages per layer, and each NCCL
message has a fixed cost). Each end packs or unpacks from its own blocks, so both ranks
always agree on the order and size of operations, whatever the requests' interleaving.
The receiver reads a header before it posts the receives it announces (into a buffer it
drops, for a transfer it no longer wants), so no receive is ever pending on its GPU for
bytes that are not on their way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import KVTransferError

UID_BYTES = 128
# magic, version, role, uid, fingerprint, name, control address, secret
_HELLO = struct.Struct("<4sHB1x128s32s64s64s32s")
# magic, version, kind, first layer, layers, blocks, tid
_HEADER = struct.Struct("<4sHHIII64s44x")
HEADER_BYTES = _HEADER.size
VERSION = 4
DATA, ABORT, HELLO = 1, 2, 3
ROLE_RECEIVER, ROLE_SENDER = 1, 2


def _text(raw: bytes, what: str) -> str:
    raw = raw.rstrip(b"\0")
    if not raw or not all(0x21 <= c <= 0x7E for c in raw):
        raise KVTransferError(f"bad nccl {what}")
    return raw.decode("ascii")


@dataclass(frozen=True, slots=True)
class Hello:
    """One end's handshake: the communicator's unique id (the receiver makes it), the KV
    layout fingerprint, the receiver's address (the KVTarget address for it), and, from the
    receiver, where its control listener is and the secret a sender presents there
    (control.py); a sender's answer carries "-" and no secret."""

    role: int
    unique_id: bytes
    fingerprint: str
    address: str
    control: str = "-"
    secret: bytes = b""

    def encode(self) -> bytes:
        return _HELLO.pack(b"PDNH", VERSION, self.role, self.unique_id,
                           self.fingerprint.encode("ascii"), self.address.encode("ascii"),
                           self.control.encode("ascii"), self.secret)

    @classmethod
    def decode(cls, raw: bytes, role: int) -> Hello:
        if len(raw) != _HELLO.size:
            raise KVTransferError("bad nccl handshake: wrong size")
        magic, version, got_role, uid, fp, name, control, secret = _HELLO.unpack(raw)
        if magic != b"PDNH" or version != VERSION or got_role != role:
            raise KVTransferError("bad nccl handshake: wrong magic, version or role")
        return cls(got_role, bytes(uid), _text(fp, "fingerprint"), _text(name, "address"),
                   _text(control, "control address"), bytes(secret))

    @property
    def key(self) -> bytes:
        """What a sender presents on the receiver's control connection."""
        return self.unique_id + self.secret


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    transfer_id: str
    layer: int = 0  # the first layer of the batch
    num_layers: int = 0
    num_blocks: int = 0

    def encode(self) -> bytes:
        return _HEADER.pack(b"PDNL", VERSION, self.kind, self.layer, self.num_layers,
                            self.num_blocks, self.transfer_id.encode("ascii"))

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        magic, version, kind, layer, layers, blocks, tid = _HEADER.unpack(raw)
        if magic != b"PDNL" or version != VERSION or kind not in (DATA, ABORT, HELLO):
            raise KVTransferError("bad nccl layer header")
        return cls(kind, _text(tid, "transfer id"), layer, layers, blocks)


def one_run(block_ids: Sequence[int]) -> int | None:
    """The first id when ``block_ids`` are consecutive (one run: K and V each one
    contiguous region of a layer), else None."""
    if not block_ids:
        return None
    first = block_ids[0]
    return first if list(block_ids) == list(range(first, first + len(block_ids))) else None
