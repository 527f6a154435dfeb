"""What two ``ucx`` ends tell each other, as bytes: the peer info exchanged once per peer
(over the gRPC handshake), the short notifications that steer each transfer, and the
descriptor lists of a layer's blocks.

Everything here is parsed strictly from bytes (``struct``, ASCII fields checked): a peer's
bytes are data, never code.

A transfer, in notifications (``|``-separated ASCII; transfer ids are printable ASCII
without ``|``):
- sender -> receiver ``B|tid``: may I write? (sent at begin; nothing is written before...)
- receiver -> sender ``G|tid``: ...go (the transfer is expected, its blocks are reserved;
  ``G|tid|offset``: write every layer packed into this slot of my staging area),
  or ``C|tid|reason``: no (cancelled, unknown, or the receiver gave up later);
- sender -> receiver, with each WRITE of one layer or of consecutive layers (NIXL delivers
  it after the data): ``D|tid|layer`` or ``D|tid|first-last``;
- receiver -> sender ``K|tid``: every layer is in (the sender's success);
- sender -> receiver ``A|tid|reason``: the sender gave up;
- sender -> receiver ``Q|tid``: after a failure, none of its writes is in flight any more
  (the receiver may free the blocks).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from engine.errors import KVTransferError
from engine.kv_layout import KVMemory

MAGIC = b"PDUX"
VERSION = 2
# magic, version, mem type (0 DRAM, 1 VRAM), device id, layers, blocks, bytes per K (or V)
# block, fingerprint (32 bytes, NUL padded), agent name length, metadata length, staging
# area address and size (staging.py)
_HEAD = struct.Struct("<4sHBxiIIQ32sHIQQ")
MAX_LAYERS = 4096
MAX_NAME = 128
MAX_METADATA = 64 << 20
MEM_TYPES = ("DRAM", "VRAM")
KINDS = frozenset(b"BGDKACQ")
MAX_NOTIF = 1024


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One end's registered KV memory and NIXL agent, as its peers need them."""

    agent: str
    metadata: bytes  # the agent's NIXL metadata (add_remote_agent)
    fingerprint: str
    mem_type: str  # "DRAM" or "VRAM"
    device: int
    num_blocks: int
    block_bytes: int  # bytes of one block's K (or V) in one layer
    bases: tuple[int, ...]  # per layer: the address of its [2, num_blocks, ...] tensor
    staging: int = 0  # the address of its registered staging area
    staging_bytes: int = 0

    @classmethod
    def of(cls, memory: KVMemory, agent: str, metadata: bytes, staging: int = 0,
           staging_bytes: int = 0) -> PeerInfo:
        layout = memory.layout
        return cls(agent=agent, metadata=metadata, fingerprint=memory.fingerprint,
                   mem_type="VRAM" if memory.device.type == "cuda" else "DRAM",
                   device=memory.device.index or 0, num_blocks=memory.num_blocks,
                   block_bytes=layout.block_bytes_per_layer // 2,
                   bases=tuple(r.address for r in memory.regions()), staging=staging,
                   staging_bytes=staging_bytes)

    def encode(self) -> bytes:
        name = self.agent.encode("ascii")
        head = _HEAD.pack(MAGIC, VERSION, MEM_TYPES.index(self.mem_type), self.device,
                          len(self.bases), self.num_blocks, self.block_bytes,
                          self.fingerprint.encode("ascii"), len(name), len(self.metadata),
                          self.staging, self.staging_bytes)
        return head + struct.pack(f"<{len(self.bases)}Q", *self.bases) + name + self.metadata

    @classmethod
    def decode(cls, raw: bytes) -> PeerInfo:
        def bad(why: str) -> KVTransferError:
            return KVTransferError(f"bad ucx peer info: {why}")

        if len(raw) < _HEAD.size:
            raise bad("too short")
        (magic, version, mem, device, layers, blocks, block_bytes, fingerprint, name_len,
         md_len, staging, staging_bytes) = _HEAD.unpack_from(raw)
        if magic != MAGIC or version != VERSION:
            raise bad("wrong magic or version")
        if mem >= len(MEM_TYPES) or not 0 < layers <= MAX_LAYERS or blocks == 0 \
                or block_bytes == 0 or not 0 < name_len <= MAX_NAME or md_len > MAX_METADATA:
            raise bad("field out of range")
        end = _HEAD.size + 8 * layers + name_len + md_len
        if len(raw) != end:
            raise bad(f"{len(raw)} bytes where its header says {end}")
        bases = struct.unpack_from(f"<{layers}Q", raw, _HEAD.size)
        at = _HEAD.size + 8 * layers
        name = _ascii(raw[at:at + name_len], "agent name")
        fp = _ascii(fingerprint.rstrip(b"\0"), "fingerprint")
        return cls(agent=name, metadata=bytes(raw[at + name_len:]), fingerprint=fp,
                   mem_type=MEM_TYPES[mem], device=device, num_blocks=blocks,
                   block_bytes=block_bytes, bases=tuple(bases), staging=staging,
                   staging_bytes=staging_bytes)


def _ascii(raw: bytes, what: str) -> str:
    if not raw.isascii() or not all(0x21 <= c <= 0x7E for c in raw):
        raise KVTransferError(f"bad ucx peer info: malformed {what}")
    return raw.decode("ascii")


@dataclass(frozen=True, slots=True)
class Notif:
    kind: str  # one of B G D K A C Q
    transfer_id: str
    arg: str = ""  # D: the layer; A, C: the reason

    def encode(self) -> bytes:
        parts = [self.kind, self.transfer_id] + ([self.arg] if self.arg else [])
        return "|".join(parts).encode("utf-8", errors="replace")[:MAX_NOTIF]

    @classmethod
    def decode(cls, raw: bytes) -> Notif:
        """Raises KVTransferError for anything that is not a notification of ours."""
        if not 3 <= len(raw) <= MAX_NOTIF or raw[0] not in KINDS or raw[1:2] != b"|":
            raise KVTransferError("not a pdserve ucx notification")
        tid, _, arg = raw[2:].partition(b"|")
        if not tid or len(tid) > 64 or not all(0x21 <= c <= 0x7E for c in tid):
            raise KVTransferError("malformed transfer id in a ucx notification")
        kind = chr(raw[0])
        text = arg.decode("utf-8", errors="replace")
        if kind == "D" and layer_span(text) is None:
            raise KVTransferError("malformed layer in a ucx notification")
        if kind == "G" and text and not (text.isdigit() and len(text) <= 15):
            raise KVTransferError("malformed staging offset in a ucx notification")
        return cls(kind, tid.decode("ascii"), text)


def layer_span(arg: str) -> range | None:
    """The layers a ``D`` notification names ("7" or "3-9"), or None if malformed."""
    first, dash, last = arg.partition("-")
    if not first.isdigit() or len(first) > 6 or (dash and (not last.isdigit()
                                                          or len(last) > 6)):
        return None
    lo, hi = int(first), int(last) if dash else int(first)
    return range(lo, hi + 1) if lo <= hi else None

