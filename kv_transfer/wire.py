"""The KV wire format: packing a request's blocks of one layer, and the frame header.

A request's KV travels per layer as one packed buffer: ``kv_layer[:, block_ids]`` made
contiguous, shape ``[2, n, block_size, num_kv_heads, head_dim]`` (its blocks in order, K
then V; DESIGN.md, "KV cache layout and wire format"). The receiver scatters it into its
own reserved blocks (same count, different ids).

Every message between a sender and a receiver is a fixed 128-byte header, followed by
``payload_bytes`` of payload: raw tensor bytes for DATA, a UTF-8 reason for ERROR/ABORT.
``FrameHeader.decode`` validates every field and raises ``KVTransferError`` on anything
else: bytes from a peer are data, never code (no pickle, no eval).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import KVTransferError, LayoutMismatchError

MAGIC = b"PDKV"
FORMAT_VERSION = 1
# magic, version, kind, dtype, status, transfer id, layer, num layers, payload bytes,
# fingerprint, 7 reserved bytes (zero) to round the header to 128.
_HEADER = struct.Struct("<4sHBBB64sIIQ32s7x")
HEADER_SIZE = _HEADER.size
MAX_TRANSFER_ID_BYTES = 64
MAX_FINGERPRINT_BYTES = 32
MAX_LAYERS = 4096
MAX_LAYER_BYTES = 1 << 34  # 16 GiB: far above any real layer, small enough to refuse junk
MAX_MESSAGE_BYTES = 4096
_PRINTABLE = re.compile(rb"[\x21-\x7e]*")  # ids and fingerprints: printable ASCII, no space


class FrameKind(enum.IntEnum):
    DATA = 1  # sender -> receiver: one packed layer
    ABORT = 2  # sender -> receiver: the sender gave up on a transfer (payload: reason)
    ACK = 3  # receiver -> sender: every layer of the transfer is scattered
    ERROR = 4  # receiver -> sender: the transfer failed there (payload: reason)


class Status(enum.IntEnum):
    OK = 0
    LAYOUT_MISMATCH = 1
    REJECTED = 2  # wrong size, dtype, layer count, duplicate layer
    CANCELLED = 3  # the receiver cancelled the transfer
    UNKNOWN = 4  # no expect() for this transfer id arrived within the grace period
    CLOSED = 5  # the receiver or sender is shutting down
    ABORTED = 6  # the sender aborted (timeout, caller's abort)


# Wire codes of dtypes; 0 means "no tensor" (control frames).
_DTYPE_CODES: dict[str, int] = {"float32": 1, "float16": 2, "bfloat16": 3}
_CODE_DTYPES: dict[int, str] = {code: name for name, code in _DTYPE_CODES.items()}


def dtype_code(dtype_name: str) -> int:
    try:
        return _DTYPE_CODES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype {dtype_name!r} has no wire code") from None


def error_for_status(status: Status, message: str) -> KVTransferError:
    """The exception a side raises for a failure status its peer reported."""
    if status == Status.LAYOUT_MISMATCH:
        return LayoutMismatchError(message)
    return KVTransferError(message)


def _encode_text(value: str, limit: int, what: str) -> bytes:
    raw = value.encode("ascii", errors="strict") if value.isascii() else b""
    if not raw or len(raw) > limit or not _printable(raw):
        raise ValueError(f"{what} must be 1..{limit} printable ASCII characters, got {value!r}")
    return raw


def _printable(raw: bytes) -> bool:
    return _PRINTABLE.fullmatch(raw) is not None


def _decode_text(raw: bytes, what: str, *, allow_empty: bool) -> str:
    text = raw.rstrip(b"\0")
    if (not text and not allow_empty) or not _printable(text):
        raise KVTransferError(f"bad frame: malformed {what}")
    return text.decode("ascii")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    kind: FrameKind
    transfer_id: str
    layer: int = 0
    num_layers: int = 0
    payload_bytes: int = 0
    fingerprint: str = ""
    dtype: str = ""  # "" for control frames
    status: Status = Status.OK

    def encode(self) -> bytes:
        """Raises ValueError for a header that ``decode`` would refuse."""
        _check(self, ValueError)
        fingerprint = (
            _encode_text(self.fingerprint, MAX_FINGERPRINT_BYTES, "fingerprint")
            if self.fingerprint else b""
        )
        return _HEADER.pack(
            MAGIC, FORMAT_VERSION, int(self.kind), _DTYPE_CODES[self.dtype] if self.dtype else 0,
            int(self.status), _encode_text(self.transfer_id, MAX_TRANSFER_ID_BYTES, "transfer id"),
            self.layer, self.num_layers, self.payload_bytes, fingerprint,
        )

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> FrameHeader:
        if len(buf) != HEADER_SIZE:
            raise KVTransferError(f"bad frame: header is {len(buf)} bytes, not {HEADER_SIZE}")
        (magic, version, kind, dtype, status, transfer_id, layer, num_layers, payload_bytes,
         fingerprint) = _HEADER.unpack(buf)
        if magic != MAGIC:
            raise KVTransferError("bad frame: wrong magic")
        if version != FORMAT_VERSION:
            raise KVTransferError(f"bad frame: format version {version}, expected "
                                  f"{FORMAT_VERSION}")
        if kind not in FrameKind._value2member_map_:
            raise KVTransferError(f"bad frame: unknown kind {kind}")
        if status not in Status._value2member_map_:
            raise KVTransferError(f"bad frame: unknown status {status}")
        if dtype != 0 and dtype not in _CODE_DTYPES:
            raise KVTransferError(f"bad frame: unknown dtype code {dtype}")
        header = cls(
            kind=FrameKind(kind),
            transfer_id=_decode_text(transfer_id, "transfer id", allow_empty=False),
            layer=layer, num_layers=num_layers, payload_bytes=payload_bytes,
            fingerprint=_decode_text(fingerprint, "fingerprint", allow_empty=True),
            dtype=_CODE_DTYPES.get(dtype, ""), status=Status(status),
        )
        _check(header, KVTransferError)
        return header


def _check(h: FrameHeader, exc: type[Exception]) -> None:
    """The per-kind rules both encode and decode enforce."""
    def bad(why: str) -> Exception:
        return exc(f"bad frame ({h.kind.name} {h.transfer_id!r}): {why}")

    if h.dtype and h.dtype not in _DTYPE_CODES:
        raise bad(f"unknown dtype {h.dtype!r}")
    if not 0 <= h.payload_bytes < 1 << 64 or not 0 <= h.layer < 1 << 32:
        raise bad("field out of range")
    if not 0 <= h.num_layers <= MAX_LAYERS:
        raise bad(f"num_layers {h.num_layers} beyond {MAX_LAYERS}")
    if h.kind == FrameKind.DATA:
        if not h.dtype or not h.fingerprint or h.status != Status.OK:
            raise bad("a data frame needs a dtype, a fingerprint and status OK")
        if not 0 <= h.layer < h.num_layers:
            raise bad(f"layer {h.layer} outside 0..{h.num_layers - 1}")
        if h.payload_bytes > MAX_LAYER_BYTES:
            raise bad(f"payload of {h.payload_bytes} bytes is beyond {MAX_LAYER_BYTES}")
    elif h.kind == FrameKind.ACK:
        if h.payload_bytes != 0 or h.status != Status.OK:
            raise bad("an ack has no payload and status OK")
    else:  # ERROR, ABORT
        if h.status == Status.OK or h.payload_bytes > MAX_MESSAGE_BYTES:
            raise bad("an error/abort needs a failure status and a short message")


def encode_message(message: str) -> bytes:
    """The payload of an ERROR/ABORT frame, cut to the wire's limit."""
    return message.encode("utf-8", errors="replace")[:MAX_MESSAGE_BYTES]


def decode_message(payload: bytes | bytearray | memoryview) -> str:
    return bytes(payload).decode("utf-8", errors="replace")


def control_frame(kind: FrameKind, transfer_id: str, status: Status, message: str = "") -> bytes:
    """Header plus payload of an ACK (status OK), ERROR or ABORT frame."""
    body = encode_message(message) if kind != FrameKind.ACK else b""
    header = FrameHeader(kind=kind, transfer_id=transfer_id, payload_bytes=len(body),
                         status=status)
    return header.encode() + body


def block_index(block_ids: Sequence[int], num_blocks: int, device: torch.device) -> torch.Tensor:
    ids = [int(b) for b in block_ids]
    # Checked in Python: on a short list that is cheaper than tensor min/max per layer, and
    # on a GPU a tensor check would wait for the device.
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise ValueError(f"block ids outside 0..{num_blocks - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError("block ids repeat")
    return torch.tensor(ids, dtype=torch.long, device=device)


def pack_layer(kv_layer: torch.Tensor, block_ids: Sequence[int] | torch.Tensor
               ) -> torch.Tensor:
    """``kv_layer[:, block_ids]`` as a new contiguous tensor ``[2, n, block_size, Hk, D]``.

    The result is a fresh buffer on ``kv_layer``'s device, so a sender may queue it while
    the cache keeps changing. ``block_ids`` may be a checked index tensor on that device
    (``block_index``), as for ``scatter_layer``: one index for many layers, where each
    built from a list would be a copy that waits for a GPU.
    """
    if kv_layer.ndim != 5 or kv_layer.shape[0] != 2:
        raise ValueError(f"kv_layer must be [2, num_blocks, block_size, Hk, D], got "
                         f"{tuple(kv_layer.shape)}")
    idx = block_ids if isinstance(block_ids, torch.Tensor) else \
        block_index(block_ids, kv_layer.shape[1], kv_layer.device)
    return kv_layer.index_select(1, idx)


def scatter_layer(kv_layer: torch.Tensor, block_ids: Sequence[int] | torch.Tensor,
                  packed: torch.Tensor) -> None:
    """Write ``packed`` (``[2, n, block_size, Hk, D]``) into ``kv_layer[:, block_ids]``.

    ``packed`` may live on another device (a CPU staging buffer for GPU KV); it is moved
    to ``kv_layer``'s device here. ``block_ids`` may be a prepared long index tensor on
    ``kv_layer``'s device, built once per transfer by a caller that checked the ids (in
    range, no repeats: ``KVMemory.check_block_ids``); a check here would make a GPU
    receiver wait for the device on every layer.
    """
    if isinstance(block_ids, torch.Tensor):
        idx = block_ids
    else:
        idx = block_index(block_ids, kv_layer.shape[1], kv_layer.device)
    expected = (2, idx.numel(), *kv_layer.shape[2:])
    if tuple(packed.shape) != expected:
        raise ValueError(f"packed shape {tuple(packed.shape)} != {expected}")
    if packed.dtype != kv_layer.dtype:
        raise ValueError(f"packed dtype {packed.dtype} != cache dtype {kv_layer.dtype}")
    dst = block_bytes(kv_layer)
    if dst is not None:
        src = packed.to("cpu").contiguous().view(torch.uint8).view(2, idx.numel(), -1).numpy()
        dst[:, idx.cpu().numpy()] = src
        return
    kv_layer.index_copy_(1, idx, packed.to(kv_layer.device))


def block_bytes(kv_layer: torch.Tensor) -> np.ndarray | None:
    """A CPU cache layer as a writable numpy view ``[2, num_blocks, block bytes]`` (uint8),
    or None where that is not possible (another device, not contiguous).

    numpy's fancy assignment over whole blocks as bytes measured ~25 GB/s on this machine,
    torch's ``index_copy_`` ~4 GB/s. torch's ``.view()`` refuses rather than copies, so the
    result shares the cache's memory and writes land in it.
    """
    if kv_layer.device.type != "cpu" or not kv_layer.is_contiguous():
        return None
    return kv_layer.view(torch.uint8).view(2, kv_layer.shape[1], -1).numpy()
