"""The object-store interface. Every method is idempotent and blocking (call from worker threads).

Implementations translate their library's errors into ``ObjectNotFound`` /
``TransientBackendError`` / ``PermanentBackendError`` at this boundary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


def checked_key(key: str) -> str:
    """``key`` if it is a relative path with no ``..`` (every store refuses the others alike)."""
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"bad object key {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """A listed object: its key, size and when it was last put (the store's clock, ns since the epoch)."""

    key: str
    size: int
    mtime_ns: int


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (readers see all of it or nothing)."""

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes (a range when ``offset``/``length`` are given). Raises ObjectNotFound."""

    def head(self, key: str) -> int:
        """Return the object's size. Raises ObjectNotFound."""

    def list(self, prefix: str) -> Iterator[str]:
        """Yield the keys starting with ``prefix``, in lexical order."""

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Like ``list``, with each object's size and last-put time (remote garbage collection)."""

    def delete(self, key: str) -> None:
        """Remove ``key``; no error when it does not exist."""

    def create(self) -> bool:
        """Create the container (bucket, directory) if it does not exist; True if it was created."""

    def check(self) -> None:
        """Verify the store is reachable and writable. Raises ``PermanentBackendError`` with a clear message."""
