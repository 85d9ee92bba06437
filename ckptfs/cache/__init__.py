"""The local chunk cache: immutable, content-addressed frames on the cache disk."""

from __future__ import annotations

from ckptfs.cache.store import ChunkCache

__all__ = ["ChunkCache"]
