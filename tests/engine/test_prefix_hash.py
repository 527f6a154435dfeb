"""The portable prefix chain hash: its exact bytes, salts and scopes, chunks from blocks,
and the block pool's functions being the same definition."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from engine import block_pool, prefix_hash
from engine.prefix_hash import (
    CHUNK_TOKENS,
    DEFAULT_SEED,
    block_hashes,
    chain_seed,
    chunk_hashes,
    chunk_hashes_from_blocks,
    hash_tokens,
    token_bytes,
)


def _by_hand_seed(scope: bytes, salt: bytes) -> bytes:
    material = (b"pdserve-prefix-v1" + struct.pack("<I", len(scope)) + scope
                + struct.pack("<I", len(salt)) + salt)
    return hashlib.blake2b(material, digest_size=16).digest()


def _by_hand_chain(seed: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    out, parent = [], seed
    for b in range(len(tokens) // block_size):
        ids = tokens[b * block_size:(b + 1) * block_size]
        parent = hashlib.blake2b(parent + struct.pack(f"<{len(ids)}I", *ids),
                                 digest_size=16).digest()
        out.append(parent)
    return out


def test_the_hash_is_the_documented_bytes_computed_independently():
    tokens = random.Random(1).choices(range(150_000), k=600)
    seed = chain_seed("model-x", "tenant-a")
    assert seed == _by_hand_seed(b"model-x", b"tenant-a")
    assert block_hashes(tokens, 16, seed) == _by_hand_chain(seed, tokens, 16)


def test_golden_values_pin_the_definition_across_machines_and_versions():
    seed = chain_seed("model-x", "tenant-a")
    assert seed.hex() == "daf0933dc0afdda7fcc2129ba0e4df38"
    assert chunk_hashes(list(range(512)), 16, seed)[1].hex() == "2e41fde228c4b847f7cbbab84f6d6d8e"
    assert block_hashes([1, 2, 3, 4], 4)[0].hex() == "f14b1aa83143f4cb3820cdce723ece08"


def test_token_ids_are_little_endian_u32_whatever_the_host():
    assert token_bytes([1, 256, 2**32 - 1]) == (b"\x01\x00\x00\x00" b"\x00\x01\x00\x00"
                                                 b"\xff\xff\xff\xff")


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_token_ids_outside_u32_are_refused(bad):
    with pytest.raises(ValueError, match="token ids"):
        token_bytes([5, bad])


def test_salts_and_scopes_separate_every_hash_and_length_prefixes_keep_fields_apart():
    tokens = list(range(1024))
    seeds = [chain_seed("m", "a"), chain_seed("m", "b"), chain_seed("n", "a"), chain_seed("m")]
    chains = [block_hashes(tokens, 16, s) for s in seeds]
    all_hashes = [h for chain in chains for h in chain]
    assert len(set(all_hashes)) == len(all_hashes)
    assert chain_seed("ab", "c") != chain_seed("a", "bc")
    assert chain_seed("m", None) == chain_seed("m", "") == chain_seed(b"m", b"")
    assert chain_seed("m", "t\u00e9") == chain_seed("m", "t\u00e9".encode())


def test_a_chunk_hash_is_the_hash_of_the_chunks_last_block():
    tokens = list(range(3 * CHUNK_TOKENS + 100))
    for block_size in (4, 16, 32, 256):
        blocks = block_hashes(tokens, block_size)
        chunks = chunk_hashes(tokens, block_size)
        k = CHUNK_TOKENS // block_size
        assert chunks == [blocks[k - 1], blocks[2 * k - 1], blocks[3 * k - 1]]
        assert chunk_hashes_from_blocks(blocks, block_size) == chunks


def test_a_chunk_hash_names_its_whole_prefix_and_nothing_after_it():
    rng = random.Random(2)
    shared = rng.choices(range(2048), k=2 * CHUNK_TOKENS)
    a = shared + rng.choices(range(2048), k=CHUNK_TOKENS)
    b = shared + rng.choices(range(2048), k=CHUNK_TOKENS)
    ca, cb = chunk_hashes(a, 16), chunk_hashes(b, 16)
    assert ca[:2] == cb[:2] and ca[2] != cb[2]
    changed_first = [shared[0] + 1, *a[1:]]
    assert all(x != y for x, y in zip(ca, chunk_hashes(changed_first, 16), strict=False))


def test_limits_and_partial_chunks():
    tokens = list(range(2 * CHUNK_TOKENS + 255))
    assert len(chunk_hashes(tokens, 16)) == 2
    assert len(chunk_hashes(tokens, 16, max_chunks=1)) == 1
    assert chunk_hashes(tokens, 16, max_chunks=0) == []
    assert len(block_hashes(tokens, 16, max_blocks=5)) == 5
    with pytest.raises(ValueError, match="multiple"):
        chunk_hashes(tokens, 24)
    with pytest.raises(ValueError):
        block_hashes(tokens, 0)


def test_the_block_pool_uses_the_same_definition_with_an_optional_salt_seed():
    tokens = list(range(100))
    assert block_pool.prefix_hashes(tokens, 4, 10) == block_hashes(tokens, 4, max_blocks=10)
    seed = chain_seed("model", "tenant")
    salted = block_pool.prefix_hashes(tokens, 4, 10, salt=seed)
    assert salted == block_hashes(tokens, 4, seed, max_blocks=10)
    assert set(salted).isdisjoint(block_pool.prefix_hashes(tokens, 4, 10))
    assert block_pool.hash_block(None, tokens[:4]) == hash_tokens(DEFAULT_SEED, tokens[:4])
    assert block_pool.hash_block(None, tokens[:4], salt=seed) == salted[0]
    assert block_pool.hash_block(salted[0], tokens[4:8]) == salted[1]
    assert prefix_hash.HASH_BYTES == len(salted[0]) == 16
