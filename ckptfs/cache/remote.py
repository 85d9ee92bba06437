"""Frames the local cache does not hold, fetched from the object store: where each chunk's frame is in the
store comes from its row (``chunks.remote``, ``remote_off``, ``remote_len``), read through a read-only
connection per thread, like the small frames.

Blocking; called by ``ChunkCache.get`` in worker threads, so every reader of frames (reads, the delta
bases of ingest, repack, compaction, copy-on-write) gets a cold frame the same way. A store that does not
answer, or an object that is not there, is ``ChunkMissing`` (EIO at the edge): never wrong bytes, never
ENOENT. The frame itself is verified by whoever decodes it (``codec.decode``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from ckptfs.backend.base import ObjectStore
from ckptfs.errors import BackendError, ChunkMissing, ObjectNotFound
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)


class _Locations(threading.local):
    def __init__(self, db_path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)

    def get(self, cid: ChunkId) -> tuple[str, int, int] | None:
        row = self.conn.execute("SELECT remote, remote_off, remote_len FROM chunks WHERE id=?", (cid,)).fetchone()
        if row is None or row[0] is None:
            return None
        return str(row[0]), int(row[1] or 0), int(row[2])


class RemoteFrames:
    """Thread-safe (a connection per thread; store clients are thread-safe)."""

    def __init__(self, db_path: str | Path, store: ObjectStore) -> None:
        self.store = store
        self._locations = _Locations(Path(db_path))
        self.fetched = 0  # frames fetched (benchmarks, status)
        self.fetched_bytes = 0
        self._count = threading.Lock()

    def location(self, cid: ChunkId) -> tuple[str, int, int] | None:
        return self._locations.get(cid)

    def fetch(self, cid: ChunkId) -> bytes | None:
        """The chunk's frame from the store, or None when it has no remote copy. Raises ``ChunkMissing``
        when it has one the store cannot give."""
        loc = self._locations.get(cid)
        if loc is None:
            return None
        key, off, length = loc
        try:
            frame = self.store.get(key, off, length)
        except ObjectNotFound:
            raise ChunkMissing(f"chunk {cid.hex()}: object {key} is missing from the store") from None
        except BackendError as exc:
            raise ChunkMissing(f"chunk {cid.hex()} is not in the cache and the store failed: {exc}") from None
        if len(frame) != length:
            raise ChunkMissing(f"chunk {cid.hex()}: object {key} holds {len(frame)} of {length} bytes at {off}")
        with self._count:
            self.fetched += 1
            self.fetched_bytes += length
        return frame
