"""The one portable definition of the prefix chain hash (block pool, KV tier, router).

A chain hash names a run of tokens *and everything before it*, so equal hashes mean equal
prefixes. The exact bytes, so that any process (another pod, the router, another language)
computes the same values:

- ``seed = BLAKE2b-128(b"pdserve-prefix-v1" || u32le(len(scope)) || scope
  || u32le(len(salt)) || salt)``, where ``scope`` is the model identity (UTF-8; the engine
  passes ``KVLayout.model_id``) and ``salt`` the request's ``cache_salt`` (UTF-8; absent and
  empty are the same: unsalted). Length prefixes keep ``("ab", "c")`` and ``("a", "bc")``
  apart.
- ``h_0 = BLAKE2b-128(seed || ids(block 0))``, ``h_j = BLAKE2b-128(h_{j-1} || ids(block j))``
  where ``ids`` is each token id as an unsigned 32-bit little-endian integer (fixed byte
  order, whatever the host's) and a block is ``block_size`` tokens. Only full blocks are
  hashed.
- The chunk hash of chunk ``i`` (``chunk_tokens`` = 256 tokens, a multiple of block_size) is
  the block hash of the chunk's last block, ``c_i = h_{(i+1)k-1}`` with
  ``k = chunk_tokens / block_size``. So the engine gets chunk hashes for free from the block
  hashes it already has, a block evicted from the pool carries the hash of the chunk it
  ends (what offload needs), and the router computes the same values from token ids, the
  salt, the model id and the block size alone (``chunk_hashes``). vLLM's CPU offloading
  keys its larger offload blocks the same way (by the hash of their last GPU block).

BLAKE2b rather than a faster non-cryptographic hash: a chosen collision would let one
prompt read another prompt's KV, and salts only isolate tenants if the hash resists that.
Hashing costs about a microsecond per 16-token block.

The layout's other fields (dtype, block size, TP rank) are not in the seed: they do not
change which prefix a chunk names, the router cannot know them, and the tier's keys and
value headers carry the full layout fingerprint anyway.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

HASH_BYTES = 16
CHUNK_TOKENS = 256
_DOMAIN = b"pdserve-prefix-v1"
_U32 = struct.Struct("<I")
_MAX_TOKEN_ID = (1 << 32) - 1
# array("I") is 4 bytes on every platform CPython runs on in practice; check, don't assume.
_NATIVE_U32 = array("I").itemsize == 4
_SWAP = sys.byteorder != "little"


def _text(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def chain_seed(scope: str | bytes = "", cache_salt: str | bytes | None = None) -> bytes:
    """The chain's starting value for a model identity and a request's ``cache_salt``."""
    scope_b, salt_b = _text(scope), _text(cache_salt)
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(_DOMAIN)
    h.update(_U32.pack(len(scope_b)))
    h.update(scope_b)
    h.update(_U32.pack(len(salt_b)))
    h.update(salt_b)
    return h.digest()


DEFAULT_SEED = chain_seed()  # no scope, no salt: what the block pool uses when given none


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as consecutive unsigned 32-bit little-endian integers."""
    if _NATIVE_U32:
        try:
            arr = array("I", token_ids)
        except OverflowError:
            raise ValueError("token ids must lie in 0..2**32-1") from None
        if _SWAP:
            arr.byteswap()
        return arr.tobytes()
    out = bytearray()
    for t in token_ids:
        if not 0 <= t <= _MAX_TOKEN_ID:
            raise ValueError("token ids must lie in 0..2**32-1")
        out += _U32.pack(t)
    return bytes(out)


def hash_tokens(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """One chain step: the hash of ``token_ids`` following the run named by ``parent``."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(parent)
    h.update(token_bytes(token_ids))
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, seed: bytes = DEFAULT_SEED,
                 max_blocks: int | None = None) -> list[bytes]:
    """Chain hashes of the leading full blocks of ``token_ids`` (at most ``max_blocks``)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max(0, max_blocks))
    hashes: list[bytes] = []
    parent = seed
    for b in range(n):
        parent = hash_tokens(parent, token_ids[b * block_size:(b + 1) * block_size])
        hashes.append(parent)
    return hashes


def blocks_per_chunk(block_size: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    if block_size < 1 or chunk_tokens < block_size or chunk_tokens % block_size:
        raise ValueError(f"chunk of {chunk_tokens} tokens is not a multiple of block_size "
                         f"{block_size}")
    return chunk_tokens // block_size


def chunk_hashes_from_blocks(hashes: Sequence[bytes], block_size: int,
                             chunk_tokens: int = CHUNK_TOKENS) -> list[bytes]:
    """The chunk hashes among a sequence's block hashes: every chunk's last block's hash."""
    k = blocks_per_chunk(block_size, chunk_tokens)
    return [hashes[j] for j in range(k - 1, len(hashes), k)]


def chunk_hashes(token_ids: Sequence[int], block_size: int, seed: bytes = DEFAULT_SEED,
                 max_chunks: int | None = None, chunk_tokens: int = CHUNK_TOKENS) -> list[bytes]:
    """Chain hashes of the leading full chunks of ``token_ids`` (what the router computes)."""
    k = blocks_per_chunk(block_size, chunk_tokens)
    max_blocks = None if max_chunks is None else max(0, max_chunks) * k
    return chunk_hashes_from_blocks(block_hashes(token_ids, block_size, seed, max_blocks),
                                    block_size, chunk_tokens)
