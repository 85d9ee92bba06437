"""Open an object store from its URL: ``file:///path``, ``memory://``."""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from ckptfs.backend.base import ObjectStore
from ckptfs.backend.local import LocalDirStore
from ckptfs.backend.memory import MemoryStore
from ckptfs.errors import UserError


def open_store(url: str) -> ObjectStore:
    """Build the store for ``url``. Raises ``UserError`` for an unknown or malformed URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise UserError(f"store: a file URL needs an absolute path (file:///path), got {url!r}")
        return LocalDirStore(unquote(parsed.path))
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "s3":
        raise UserError("store: s3:// is not available in this release yet; use a file:// store")
    raise UserError(f"store: unknown URL scheme in {url!r} (expected file:// or memory://)")
