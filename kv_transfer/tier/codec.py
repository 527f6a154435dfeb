"""The shared KV tier's value format: one 256-token chunk of KV, every layer, as bytes.

A value is a fixed 128-byte header followed by the payload. All integers little-endian::

    offset size field
         0    4 magic b"PDKT"
         4    2 format version (1)
         6    1 dtype code (kv_transfer.wire's: 1 float32, 2 float16, 3 bfloat16)
         7    1 reserved, zero
         8   32 layout fingerprint (ASCII, NUL-padded)
        40   16 chunk hash (engine/prefix_hash.py)
        56   20 shape: num_layers, blocks per chunk, block_size, num_kv_heads, head_dim (u32)
        76    8 payload bytes (u64)
        84   28 reserved, zero
       112   16 checksum: XXH3-128 of bytes 0..111 and the payload (canonical digest)
       128    - payload

The payload is layer-major: for each layer, the chunk's blocks packed as
``kv_transfer.wire.pack_layer`` packs them, ``[2, blocks, block_size, kv_heads, head_dim]``
(K of every block, then V), raw bytes of the model dtype. A consumer scatters each layer
into its own blocks exactly as a connector receiver does.

XXH3-128 because it is fast enough to vanish next to the copy: measured on this machine
(2 shared cores) 1.3-3.6 ms per 32 MiB Llama-3-8B-shaped chunk (9-27 GB/s) against BLAKE2b's
59 ms and zlib's CRC-32 7 ms. It guards against accidental corruption; the chain hash, not
the checksum, is what a malicious writer would have to break, and a writer who can SET keys
in the tier's Redis is trusted (AUTH and TLS keep others out).

``decode_value`` raises ``CorruptValue`` with a reason for anything that is not exactly the
value expected (another layout, another chunk, truncated, a flipped byte); the tiers turn
that into a counted miss. Bytes from Redis are data, never code: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import enum
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from engine.kv_layout import KVLayout
from engine.prefix_hash import CHUNK_TOKENS, HASH_BYTES, blocks_per_chunk
from kv_transfer.wire import block_index, dtype_code, pack_layer, scatter_layer

MAGIC = b"PDKT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHBB32s16s5IQ28x")  # everything the checksum covers in the header
HEADER_SIZE = _PREFIX.size + 16
CHECKSUM_OFFSET = _PREFIX.size
assert HEADER_SIZE == 128


class CorruptReason(enum.Enum):
    TRUNCATED = "truncated"  # shorter (or longer) than its header says
    MAGIC = "magic"  # not a tier value at all
    VERSION = "version"  # another format version
    LAYOUT = "layout"  # another layout fingerprint, dtype or shape
    HASH = "hash"  # a value for another chunk
    CHECKSUM = "checksum"  # a changed byte


class CorruptValue(ValueError):
    def __init__(self, reason: CorruptReason, detail: str = "") -> None:
        super().__init__(f"corrupt KV tier value ({reason.value}){': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """The shape of one chunk's value for a KV layout (sizes computed once: they are read on
    every encode and decode)."""

    layout: KVLayout
    chunk_tokens: int = CHUNK_TOKENS
    blocks: int = field(init=False)
    layer_shape: tuple[int, int, int, int, int] = field(init=False)
    layer_bytes: int = field(init=False)
    payload_bytes: int = field(init=False)
    value_bytes: int = field(init=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        blocks = blocks_per_chunk(self.layout.block_size, self.chunk_tokens)  # validates
        fingerprint = self.layout.fingerprint
        if len(fingerprint.encode("ascii")) > 32:
            raise ValueError("layout fingerprint longer than 32 bytes")
        object.__setattr__(self, "fingerprint", fingerprint)
        layer_bytes = self.layout.packed_layer_bytes(blocks)
        payload = self.layout.num_layers * layer_bytes
        for name, value in (("blocks", blocks), ("layer_shape", self.layout.layer_shape(blocks)),
                            ("layer_bytes", layer_bytes), ("payload_bytes", payload),
                            ("value_bytes", HEADER_SIZE + payload)):
            object.__setattr__(self, name, value)

    def _header_prefix(self, chunk_hash: bytes) -> bytes:
        lay = self.layout
        return _PREFIX.pack(MAGIC, FORMAT_VERSION, dtype_code(lay.dtype), 0,
                            self.fingerprint.encode("ascii"), chunk_hash, lay.num_layers,
                            self.blocks, lay.block_size, lay.num_kv_heads, lay.head_dim,
                            self.payload_bytes)


def _check_hash(chunk_hash: bytes) -> None:
    if len(chunk_hash) != HASH_BYTES:
        raise ValueError(f"a chunk hash is {HASH_BYTES} bytes, got {len(chunk_hash)}")


def encode_value(spec: ChunkSpec, chunk_hash: bytes, layers: Sequence[torch.Tensor],
                 staging: torch.Tensor | None = None) -> memoryview:
    """Header + payload of one chunk; ``layers[i]`` is layer i's packed ``[2, blocks, ...]``
    (any device: this is where device KV is copied to host memory). ``staging``: pinned
    host memory of at least ``spec.payload_bytes`` that device layers come down into."""
    _check_hash(chunk_hash)
    if len(layers) != spec.layout.num_layers:
        raise ValueError(f"{len(layers)} layers, the layout has {spec.layout.num_layers}")
    # Uninitialised memory: every byte is written below. Zeroing 32 MiB first (bytearray)
    # doubled the cost of an encode on this machine.
    array = np.empty(spec.value_bytes, dtype=np.uint8)
    buf = array.data
    dst = torch.from_numpy(array)
    side = None
    if layers and layers[0].device.type == "cuda":
        # Device KV comes down on a stream of its own, after what the compute stream had
        # queued (the packing): on the compute stream each copy would hold up the
        # forwards queued behind it (an 8B model's 4k-token prefill took 3.5x as long
        # served as alone while its chunks were stored).
        side = torch.cuda.Stream(layers[0].device)
        side.wait_stream(torch.cuda.current_stream(layers[0].device))
    # Device KV goes into pinned memory where given, a copy the copy engine does alone:
    # into pageable memory the driver stages it through its own buffers on this thread,
    # and the pod's kernel launches waited behind it (a prefill served while the last
    # request's chunks were stored took twice as long as one served alone).
    target, off = dst, HEADER_SIZE
    if side is not None and staging is not None:
        target, off = staging, 0
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _copy_layers(spec, layers, target, off)
    if side is not None:
        side.synchronize()
    if target is not dst:
        dst[HEADER_SIZE:].copy_(target[:spec.payload_bytes])
    prefix = spec._header_prefix(chunk_hash)
    buf[:CHECKSUM_OFFSET] = prefix
    buf[CHECKSUM_OFFSET:HEADER_SIZE] = _checksum(prefix, buf[HEADER_SIZE:])
    return buf


def _copy_layers(spec: ChunkSpec, layers: Sequence[torch.Tensor], dst: torch.Tensor,
                 off: int) -> None:
    """Each layer's bytes into ``dst`` (host, uint8) from ``off`` on."""
    for i, layer in enumerate(layers):
        if tuple(layer.shape) != spec.layer_shape or layer.dtype != spec.layout.torch_dtype:
            raise ValueError(f"layer {i}: {tuple(layer.shape)} {layer.dtype}, expected "
                             f"{spec.layer_shape} {spec.layout.torch_dtype}")
        raw = layer.contiguous().view(torch.uint8).reshape(-1)
        if raw.device.type == "cpu":
            # a plain memcpy: torch's copy_ of a small CPU tensor measured ~1 ms (its thread
            # pool) where this takes microseconds
            dst.numpy()[off:off + spec.layer_bytes] = raw.numpy()
        else:
            dst[off:off + spec.layer_bytes].copy_(raw, non_blocking=dst.is_pinned())
        off += spec.layer_bytes


def _checksum(prefix: bytes | memoryview, payload: memoryview) -> bytes:
    h = xxhash.xxh3_128(prefix)
    h.update(payload)
    return h.digest()


def decode_value(spec: ChunkSpec, chunk_hash: bytes, value: bytes | bytearray | memoryview,
                 *, verify_checksum: bool = True) -> memoryview:
    """The payload of ``value`` (a read-only view, no copy) if it is exactly the value of
    ``chunk_hash`` under ``spec``; raises ``CorruptValue`` otherwise."""
    view = memoryview(value).cast("B").toreadonly()
    if len(view) < HEADER_SIZE:
        raise CorruptValue(CorruptReason.TRUNCATED, f"{len(view)} bytes, header is {HEADER_SIZE}")
    prefix = view[:CHECKSUM_OFFSET]
    fields = _PREFIX.unpack(prefix)
    magic, version, dtype, reserved, fingerprint, got_hash = fields[:6]
    shape, payload_bytes = fields[6:11], fields[11]
    if magic != MAGIC:
        raise CorruptValue(CorruptReason.MAGIC)
    if version != FORMAT_VERSION:
        raise CorruptValue(CorruptReason.VERSION, f"version {version}")
    expected = _PREFIX.unpack(spec._header_prefix(chunk_hash))
    if (fingerprint, dtype, shape, payload_bytes) != (expected[4], expected[2], expected[6:11],
                                                      expected[11]) or reserved:
        raise CorruptValue(CorruptReason.LAYOUT, f"fingerprint {fingerprint.rstrip(bytes(1))!r}")
    if got_hash != chunk_hash:
        raise CorruptValue(CorruptReason.HASH)
    if len(view) != HEADER_SIZE + payload_bytes:
        raise CorruptValue(CorruptReason.TRUNCATED,
                           f"{len(view)} bytes, expected {HEADER_SIZE + payload_bytes}")
    payload = view[HEADER_SIZE:]
    if verify_checksum and bytes(view[CHECKSUM_OFFSET:HEADER_SIZE]) != _checksum(prefix, payload):
        raise CorruptValue(CorruptReason.CHECKSUM)
    return payload


# -- moving chunks between a KV cache and payloads ---------------------------------------

def pack_chunk(kv_layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> list[torch.Tensor]:
    """A chunk's blocks of every layer, packed (fresh tensors on the cache's device), with
    one index for every layer (on a GPU, one wait for the device instead of 32 for an 8B
    model)."""
    if not kv_layers:
        return []
    index = block_index(block_ids, kv_layers[0].shape[1], kv_layers[0].device)
    return [pack_layer(kv, index) for kv in kv_layers]


def payload_layer(spec: ChunkSpec, payload: memoryview, layer: int) -> torch.Tensor:
    """Layer ``layer`` of a payload as a CPU tensor ``[2, blocks, block_size, Hk, D]`` viewing
    the payload's memory (no copy). Read it only: the memory may be shared (host tier)."""
    if len(payload) != spec.payload_bytes or not 0 <= layer < spec.layout.num_layers:
        raise ValueError("payload or layer index does not match the chunk spec")
    return _layer_of(spec, _host_bytes(payload), layer)


def _layer_of(spec: ChunkSpec, payload_bytes: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer`` of a payload held as a uint8 tensor (host or device), as a view."""
    raw = payload_bytes[layer * spec.layer_bytes:(layer + 1) * spec.layer_bytes]
    return raw.view(spec.layout.torch_dtype).view(spec.layer_shape)


def scatter_chunk(spec: ChunkSpec, kv_layers: Sequence[torch.Tensor], block_ids: Sequence[int],
                  payload: memoryview) -> None:
    """Write a loaded chunk into ``block_ids`` (``spec.blocks`` of them) of every layer."""
    if len(block_ids) != spec.blocks or len(kv_layers) != spec.layout.num_layers:
        raise ValueError(f"a chunk fills {spec.blocks} blocks of {spec.layout.num_layers} "
                         f"layers, got {len(block_ids)} blocks of {len(kv_layers)} layers")
    if len(payload) != spec.payload_bytes:
        raise ValueError("payload does not match the chunk spec")
    device = kv_layers[0].device
    # One index and, for a device cache, one host-to-device copy of the whole payload, then
    # a scatter per layer: per layer, each copy from pageable memory would wait for the
    # device (32 waits per chunk of an 8B model).
    source = _host_bytes(payload)
    if device.type != "cpu":
        source = source.to(device)
    index = block_index(block_ids, kv_layers[0].shape[1], device)
    for i, kv in enumerate(kv_layers):
        scatter_layer(kv, index, _layer_of(spec, source, i))


def _host_bytes(payload: memoryview) -> torch.Tensor:
    """A read-only buffer as a uint8 CPU tensor sharing its memory (only ever read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's read-only buffer warning
        return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8))
