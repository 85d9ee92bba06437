"""Object stores: where chunks and manifests are tiered to. Local directory (default), memory (tests)."""

from __future__ import annotations

from ckptfs.backend.base import ObjectStore
from ckptfs.backend.local import LocalDirStore
from ckptfs.backend.memory import MemoryStore
from ckptfs.backend.url import open_store

__all__ = ["LocalDirStore", "MemoryStore", "ObjectStore", "open_store"]
