"""The chunk index: rows of the ``chunks`` table, in-flight pins and garbage collection.

Trio thread only. Invariants:

* a chunk row exists only after its frame is in the cache (``record_stored`` is called after ``put``);
* ``refcount`` equals the number of ``extents`` rows naming the chunk (kept by ``add_refs``/``drop_refs``
  inside the caller's transaction);
* a chunk is deleted only when its refcount is 0 and no ingest job has it pinned; deletion removes the
  row and the file with no checkpoint in between, so a concurrent job either sees both or neither.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable

import trio

from ckptfs.cache import ChunkCache
from ckptfs.meta import Database
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)


class ChunkIndex:
    def __init__(self, db: Database, cache: ChunkCache) -> None:
        self.db = db
        self.cache = cache
        self._pins: Counter[ChunkId] = Counter()
        self._inflight: dict[ChunkId, trio.Event] = {}

    def has(self, cid: ChunkId) -> bool:
        return self.db.one("SELECT 1 FROM chunks WHERE id=?", (cid,)) is not None

    def pin(self, cid: ChunkId) -> None:
        self._pins[cid] += 1

    def unpin(self, cids: Iterable[ChunkId]) -> None:
        for cid in cids:
            self._pins[cid] -= 1
            if self._pins[cid] <= 0:
                del self._pins[cid]

    def claim(self, cid: ChunkId) -> trio.Event | None:
        """Claim the right to store ``cid``. Returns ``None`` if the caller must store it,
        else an event to wait for (another job is storing it; re-check ``has`` afterwards)."""
        ev = self._inflight.get(cid)
        if ev is not None:
            return ev
        self._inflight[cid] = trio.Event()
        return None

    def release_claim(self, cid: ChunkId) -> None:
        ev = self._inflight.pop(cid, None)
        if ev is not None:
            ev.set()

    def record_stored(self, cid: ChunkId, codec: int, raw_len: int, stored: int) -> None:
        """Insert the row of a chunk whose frame is now in the cache (refcount 0 until committed)."""
        self.db.execute(
            "INSERT OR IGNORE INTO chunks (id, codec, raw_len, stored, refcount) VALUES (?,?,?,?,0)",
            (cid, codec, raw_len, stored),
        )

    @staticmethod
    def add_refs(conn: sqlite3.Connection, counts: Counter[ChunkId]) -> None:
        conn.executemany("UPDATE chunks SET refcount = refcount + ? WHERE id=?", [(n, c) for c, n in counts.items()])

    @staticmethod
    def drop_version_refs(conn: sqlite3.Connection, version: int) -> list[ChunkId]:
        """Delete a version's extents and decrement its chunks; return the chunks touched."""
        rows = conn.execute("SELECT chunk, count(*) FROM extents WHERE version=? GROUP BY chunk", (version,)).fetchall()
        conn.executemany("UPDATE chunks SET refcount = refcount - ? WHERE id=?", [(n, c) for c, n in rows])
        conn.execute("DELETE FROM extents WHERE version=?", (version,))
        return [ChunkId(c) for c, _ in rows]

    def collect(self, candidates: Iterable[ChunkId] | None = None) -> int:
        """Delete unreferenced, unpinned chunks (all of them when ``candidates`` is None). No checkpoint."""
        if candidates is None:
            rows = self.db.execute("SELECT id FROM chunks WHERE refcount <= 0").fetchall()
            ids = [ChunkId(r[0]) for r in rows]
        else:
            ids = list(candidates)
        n = 0
        for cid in ids:
            if cid in self._pins or cid in self._inflight:
                continue
            row = self.db.one("SELECT refcount FROM chunks WHERE id=?", (cid,))
            if row is None or int(row[0]) > 0:
                continue
            self.db.execute("DELETE FROM chunks WHERE id=?", (cid,))
            self.cache.delete(cid)
            n += 1
        if n:
            log.debug("collected %d unreferenced chunks", n)
        return n
