"""The tier's value format: exact round trips through a real KV cache layout, the documented
header bytes, and every kind of damage refused with its reason (never another exception)."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import torch
import xxhash
from kvt_helpers import random_caches
from tier_helpers import payload_of, prompt_hashes, random_layers

from engine.kv_layout import KVLayout
from kv_transfer.tier import (
    ChunkSpec,
    CorruptReason,
    CorruptValue,
    decode_value,
    encode_value,
    pack_chunk,
    payload_layer,
    scatter_chunk,
)
from kv_transfer.tier.codec import HEADER_SIZE
from kv_transfer.wire import pack_layer


def _spec(dtype: str = "bfloat16", **changes: object) -> ChunkSpec:
    layout = KVLayout(model_id="codec-test", dtype=dtype, block_size=16, num_layers=3,
                      num_kv_heads=2, head_dim=8)
    return ChunkSpec(dataclasses.replace(layout, **changes))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_chunk_packed_from_one_cache_lands_bit_exact_in_other_blocks_of_another(dtype):
    spec = _spec(dtype)
    src = random_caches(spec.layout, num_blocks=40, seed=1)
    dst = random_caches(spec.layout, num_blocks=40, seed=2)
    src_ids = [3, 17, 5, 30, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 1, 39]  # scattered blocks
    dst_ids = list(range(20, 36))
    h = prompt_hashes(spec, 1, seed=0)[0]
    value = encode_value(spec, h, pack_chunk(src, src_ids))
    assert len(value) == spec.value_bytes
    scatter_chunk(spec, dst, dst_ids, decode_value(spec, h, value))
    for s, d in zip(src, dst, strict=False):
        assert torch.equal(d[:, dst_ids], s[:, src_ids])


def test_the_payload_is_layer_major_pack_layer_bytes_and_the_header_as_documented():
    spec = _spec()
    caches = random_caches(spec.layout, num_blocks=16, seed=3)
    ids = list(range(16))
    h = bytes(range(16))
    value = bytes(encode_value(spec, h, pack_chunk(caches, ids)))
    expected_payload = payload_of([pack_layer(kv, ids) for kv in caches])
    assert bytes(value[HEADER_SIZE:]) == expected_payload
    assert value[0:4] == b"PDKT" and struct.unpack_from("<H", value, 4)[0] == 1
    assert value[6] == 3  # bfloat16
    assert value[8:40].rstrip(b"\0").decode() == spec.fingerprint
    assert value[40:56] == h
    assert struct.unpack_from("<5IQ", value, 56) == (3, 16, 16, 2, 8, spec.payload_bytes)
    digest = xxhash.xxh3_128(bytes(value[:112]) + expected_payload).digest()
    assert value[112:128] == digest
    for i in range(3):
        assert torch.equal(payload_layer(spec, decode_value(spec, h, value), i),
                           pack_layer(caches[i], ids))


def _value(spec: ChunkSpec, seed: int = 0) -> tuple[bytes, bytes]:
    h = prompt_hashes(spec, 1, seed=seed)[0]
    return h, bytes(encode_value(spec, h, random_layers(spec, seed)))


def _flip(value: bytes, at: int) -> bytes:
    b = bytearray(value)
    b[at] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("damage, reason", [
    (lambda v, s: _flip(v, HEADER_SIZE + 1234), CorruptReason.CHECKSUM),
    (lambda v, s: _flip(v, len(v) - 1), CorruptReason.CHECKSUM),
    (lambda v, s: _flip(v, 100), CorruptReason.CHECKSUM),  # a reserved header byte
    (lambda v, s: _flip(v, 0), CorruptReason.MAGIC),
    (lambda v, s: _flip(v, 4), CorruptReason.VERSION),
    (lambda v, s: _flip(v, 9), CorruptReason.LAYOUT),  # the fingerprint
    (lambda v, s: _flip(v, 60), CorruptReason.LAYOUT),  # the shape
    (lambda v, s: _flip(v, 45), CorruptReason.HASH),
    (lambda v, s: v[:-1], CorruptReason.TRUNCATED),
    (lambda v, s: v[:HEADER_SIZE + 10], CorruptReason.TRUNCATED),
    (lambda v, s: v[:50], CorruptReason.TRUNCATED),
    (lambda v, s: b"", CorruptReason.TRUNCATED),
    (lambda v, s: v + b"\0", CorruptReason.TRUNCATED),
    (lambda v, s: b"\x80\x04\x95" + bytes(200), CorruptReason.MAGIC),  # a pickle, say
], ids=["payload", "last-byte", "reserved", "magic", "version", "fingerprint", "shape",
        "hash-field", "one-short", "cut-in-payload", "cut-in-header", "empty", "one-long",
        "pickle"])
def test_each_kind_of_damage_is_refused_with_its_reason(damage, reason):
    spec = _spec()
    h, value = _value(spec)
    with pytest.raises(CorruptValue) as info:
        decode_value(spec, h, damage(value, spec))
    assert info.value.reason == reason


def test_a_value_of_another_layout_or_another_chunk_is_refused():
    spec = _spec()
    for other in (_spec(num_kv_heads=1), _spec(dtype="float16"), _spec(model_id="other"),
                  _spec(tp_rank=1, tp_size=2)):
        h, value = _value(other)
        with pytest.raises(CorruptValue) as info:
            decode_value(spec, h, value)
        assert info.value.reason == CorruptReason.LAYOUT
    h0, h1 = prompt_hashes(spec, 2, seed=5)
    value = bytes(encode_value(spec, h1, random_layers(spec, 1)))
    with pytest.raises(CorruptValue) as info:
        decode_value(spec, h0, value)
    assert info.value.reason == CorruptReason.HASH


def test_a_single_flipped_bit_anywhere_is_caught():
    spec = _spec(num_layers=1)
    h, value = _value(spec, seed=7)
    for at in range(0, len(value), 37):
        with pytest.raises(CorruptValue):
            decode_value(spec, h, _flip(value, at))
    assert bytes(decode_value(spec, h, value)) == value[HEADER_SIZE:]


def test_encode_refuses_what_does_not_fit_the_spec():
    spec = _spec()
    layers = random_layers(spec, 0)
    h = bytes(16)
    with pytest.raises(ValueError, match="layers"):
        encode_value(spec, h, layers[:2])
    with pytest.raises(ValueError, match="layer 1"):
        encode_value(spec, h, [layers[0], layers[1].float(), layers[2]])
    with pytest.raises(ValueError, match="layer 0"):
        encode_value(spec, h, [layers[0][:, :1], *layers[1:]])
    with pytest.raises(ValueError, match="16 bytes"):
        encode_value(spec, b"short", layers)
    with pytest.raises(ValueError, match="multiple"):
        ChunkSpec(dataclasses.replace(spec.layout, block_size=24))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned-staging"])
def test_a_chunk_round_trips_between_gpu_caches_through_host_bytes(pinned: bool):
    spec = _spec("bfloat16")
    src = [kv.cuda() for kv in random_caches(spec.layout, num_blocks=40, seed=4)]
    dst = [kv.cuda() for kv in random_caches(spec.layout, num_blocks=40, seed=5)]
    src_ids, dst_ids = list(range(24, 40)), list(range(0, 32, 2))
    h = prompt_hashes(spec, 1, seed=4)[0]
    staging = torch.full((spec.payload_bytes + 64,), 7, dtype=torch.uint8,
                         pin_memory=True) if pinned else None
    value = encode_value(spec, h, pack_chunk(src, src_ids), staging)
    scatter_chunk(spec, dst, dst_ids, decode_value(spec, h, value))
    for s, d in zip(src, dst, strict=False):
        assert torch.equal(d[:, dst_ids], s[:, src_ids])
