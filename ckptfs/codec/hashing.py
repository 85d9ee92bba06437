"""Chunk ids: xxh3-128 of the plain bytes.

Callable from any thread. The streaming ``update()`` path releases the GIL for large inputs
(python-xxhash >= 4), so hashing in worker threads does not stall the trio loop.
"""

from __future__ import annotations

import xxhash

from ckptfs.types import ChunkId


def chunk_id(data: bytes | memoryview) -> ChunkId:
    """Return the 16-byte xxh3-128 digest of ``data``."""
    h = xxhash.xxh3_128()
    h.update(data)
    return ChunkId(h.digest())


def checksum64(*parts: bytes | memoryview) -> int:
    """xxh3-64 over the concatenation of ``parts`` (used for frame checksums)."""
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return int(h.intdigest())
