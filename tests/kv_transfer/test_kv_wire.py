"""The wire format: packing and scattering layers, and the frame header's validation."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
import torch
from kvt_helpers import make_layout, random_caches

from engine.errors import KVTransferError
from kv_transfer.wire import (
    HEADER_SIZE,
    MAGIC,
    MAX_LAYER_BYTES,
    FrameHeader,
    FrameKind,
    Status,
    control_frame,
    pack_layer,
    scatter_layer,
)

pytestmark = pytest.mark.timeout(60)

DTYPES = ["float32", "float16", "bfloat16"]


def data_header(**changes: object) -> FrameHeader:
    fields: dict[str, object] = dict(kind=FrameKind.DATA, transfer_id="req-1", layer=2,
                                     num_layers=4, payload_bytes=1024, fingerprint="ab12cd34",
                                     dtype="bfloat16")
    fields.update(changes)
    return FrameHeader(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_layer_is_the_blocks_in_order_k_then_v(dtype: str) -> None:
    layout = make_layout(dtype)
    kv = random_caches(layout, 10, seed=1)[0]
    packed = pack_layer(kv, [7, 2, 5])
    assert packed.shape == layout.layer_shape(3) and packed.is_contiguous()
    assert packed.dtype == layout.torch_dtype
    assert packed.numel() * packed.element_size() == layout.packed_layer_bytes(3)
    for i, block in enumerate([7, 2, 5]):
        assert torch.equal(packed[0, i], kv[0, block])  # K
        assert torch.equal(packed[1, i], kv[1, block])  # V


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_writes_exactly_the_reserved_blocks(dtype: str) -> None:
    layout = make_layout(dtype)
    src = random_caches(layout, 8, seed=2)[0]
    dst = random_caches(layout, 12, seed=3)[0]
    before = dst.clone()
    scatter_layer(dst, [11, 0, 4], pack_layer(src, [1, 2, 3]))
    assert torch.equal(dst[:, [11, 0, 4]], src[:, [1, 2, 3]])
    untouched = [b for b in range(12) if b not in (11, 0, 4)]
    assert torch.equal(dst[:, untouched], before[:, untouched])


def test_packed_buffer_is_independent_of_the_cache() -> None:
    kv = random_caches(make_layout(), 4, seed=4)[0]
    packed = pack_layer(kv, [1])
    kv.zero_()
    assert bool((packed != 0).all())


def test_scatter_refuses_wrong_shape_dtype_and_ids() -> None:
    layout = make_layout()
    dst = random_caches(layout, 6, seed=5)[0]
    before = dst.clone()
    packed = pack_layer(dst, [0, 1])
    with pytest.raises(ValueError):
        scatter_layer(dst, [2, 3, 4], packed)  # count differs
    with pytest.raises(ValueError):
        scatter_layer(dst, [2, 3], packed.half())
    with pytest.raises(ValueError):
        scatter_layer(dst, [2, 2], packed)  # repeated block
    with pytest.raises(ValueError):
        scatter_layer(dst, [5, 6], packed)  # out of range
    with pytest.raises(ValueError):
        pack_layer(dst, [-1])
    assert torch.equal(dst, before)


@pytest.mark.parametrize("header", [
    data_header(),
    data_header(dtype="float32", layer=0, num_layers=1, payload_bytes=0),
    FrameHeader(kind=FrameKind.ACK, transfer_id="x" * 64),
    FrameHeader(kind=FrameKind.ERROR, transfer_id="r:7", payload_bytes=12,
                status=Status.LAYOUT_MISMATCH),
    FrameHeader(kind=FrameKind.ABORT, transfer_id="r:7", payload_bytes=3,
                status=Status.ABORTED),
])
def test_header_round_trips(header: FrameHeader) -> None:
    raw = header.encode()
    assert len(raw) == HEADER_SIZE and raw.startswith(MAGIC)
    assert FrameHeader.decode(raw) == header


def test_control_frame_carries_its_message() -> None:
    frame = control_frame(FrameKind.ERROR, "t1", Status.REJECTED, "too big")
    header = FrameHeader.decode(frame[:HEADER_SIZE])
    assert header.status == Status.REJECTED
    assert frame[HEADER_SIZE:] == b"too big" and header.payload_bytes == 7


@pytest.mark.parametrize("bad", [
    dict(transfer_id=""), dict(transfer_id="x" * 65), dict(transfer_id="has space"),
    dict(transfer_id="caf\u00e9"), dict(layer=4), dict(num_layers=0), dict(dtype="int8"),
    dict(dtype=""), dict(fingerprint=""), dict(payload_bytes=MAX_LAYER_BYTES + 1),
    dict(status=Status.REJECTED),
])
def test_encode_refuses_headers_decode_would_refuse(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        data_header(**bad).encode()


def _patched(raw: bytes, offset: int, fmt: str, value: object) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize("mutate, why", [
    (lambda raw: raw[:-1], "header is"),
    (lambda raw: b"XXXX" + raw[4:], "magic"),
    (lambda raw: _patched(raw, 4, "<H", 99), "version"),
    (lambda raw: _patched(raw, 6, "<B", 9), "kind"),
    (lambda raw: _patched(raw, 7, "<B", 77), "dtype"),
    (lambda raw: _patched(raw, 8, "<B", 200), "status"),
    (lambda raw: _patched(raw, 9, "<4s", b"\x00\x01\x02\x03"), "transfer id"),
    (lambda raw: _patched(raw, 73, "<I", 4), "layer"),
    (lambda raw: _patched(raw, 81, "<Q", 1 << 40), "payload"),
    (lambda raw: _patched(raw, 89, "<4s", b"\xff\xfe\x00\x00"), "fingerprint"),
])
def test_decode_rejects_each_bad_field(mutate, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KVTransferError, match=why):
        FrameHeader.decode(mutate(data_header().encode()))


def test_decode_of_random_bytes_only_ever_raises_kv_transfer_error() -> None:
    rng = random.Random(0)
    valid = data_header().encode()
    for _ in range(2000):
        raw = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(HEADER_SIZE)] = rng.randrange(256)
        with contextlib.suppress(KVTransferError):
            FrameHeader.decode(bytes(raw))
    for _ in range(500):
        with pytest.raises(KVTransferError):
            FrameHeader.decode(MAGIC[:rng.randint(0, 3)] + rng.randbytes(HEADER_SIZE)[:HEADER_SIZE])


def test_scatter_into_a_non_contiguous_cache_view_takes_the_generic_path() -> None:
    layout = make_layout()
    wide = random_caches(make_layout(head_dim=16), 6, seed=7)[0]
    dst = wide[..., :8]  # a strided view: the byte-view fast path must not be used
    assert not dst.is_contiguous()
    before = wide.clone()
    src = random_caches(layout, 3, seed=8)[0]
    scatter_layer(dst, [5, 1], pack_layer(src, [0, 2]))
    assert torch.equal(wide[:, [5, 1], ..., :8], src[:, [0, 2]])
    assert torch.equal(wide[..., 8:], before[..., 8:])
