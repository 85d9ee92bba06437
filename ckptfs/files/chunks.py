"""The chunk index: rows of the ``chunks`` table, delta-base slots, in-flight pins and garbage collection.

Trio thread only. Invariants:

* a chunk row exists only after its frame is in the cache (``record_stored`` is called after ``put``);
* ``refcount`` = extents naming the chunk + chunks whose delta base it is + ``slot_index`` entries naming
  it. A delta's base therefore lives as long as the delta, whatever happens to the file it came from;
* a chunk is deleted only when its refcount is 0 and no ingest job has it pinned; deletion removes the
  row and the file with no checkpoint in between, then releases the chunk's own base (cascading).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from ckptfs.cache import ChunkCache
from ckptfs.meta import Database
from ckptfs.types import ChunkId, VersionId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SlotBase:
    """The latest chunk stored for a slot: a delta base candidate."""

    chunk: ChunkId
    depth: int
    version: VersionId


class ChunkIndex:
    def __init__(self, db: Database, cache: ChunkCache) -> None:
        self.db = db
        self.cache = cache
        self._pins: Counter[ChunkId] = Counter()
        self._inflight: dict[ChunkId, trio.Event] = {}

    def has(self, cid: ChunkId) -> bool:
        return self.db.one("SELECT 1 FROM chunks WHERE id=?", (cid,)) is not None

    def depth(self, cid: ChunkId) -> int | None:
        row = self.db.one("SELECT depth FROM chunks WHERE id=?", (cid,))
        return None if row is None else int(row[0])

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

    def record_stored(
        self, cid: ChunkId, codec: int, raw_len: int, stored: int, base: ChunkId | None, depth: int
    ) -> None:
        """Insert the row of a chunk whose frame is now in the cache (refcount 0 until committed).

        The base (which the caller has pinned, so it exists) gains one reference for its new dependent.
        """
        with self.db.transaction() as c:  # atomic: no await until commit
            cur = c.execute(
                "INSERT OR IGNORE INTO chunks (id, codec, raw_len, stored, refcount, base, depth)"
                " VALUES (?,?,?,?,0,?,?)",
                (cid, codec, raw_len, stored, base, depth),
            )
            if cur.rowcount and base is not None:
                c.execute("UPDATE chunks SET refcount = refcount + 1 WHERE id=?", (base,))

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

    # -- delta-base slots ---------------------------------------------------------------------------

    def slot_bases(self, signature: str) -> dict[str, SlotBase]:
        rows = self.db.execute(
            "SELECT s.slot, s.chunk, c.depth, s.version FROM slot_index s JOIN chunks c ON c.id = s.chunk"
            " WHERE s.signature=?",
            (signature,),
        ).fetchall()
        return {slot: SlotBase(ChunkId(cid), int(depth), VersionId(v)) for slot, cid, depth, v in rows}

    @staticmethod
    def set_slots(
        conn: sqlite3.Connection, signature: str, version: VersionId, slots: list[tuple[str, ChunkId]]
    ) -> list[ChunkId]:
        """Make ``version``'s chunks the latest of their slots; return the chunks that lost a slot reference."""
        now = time.time_ns()
        released: list[ChunkId] = []
        for slot, cid in slots:
            old = conn.execute(
                "SELECT chunk FROM slot_index WHERE signature=? AND slot=?", (signature, slot)
            ).fetchone()
            if old is not None:
                conn.execute("UPDATE chunks SET refcount = refcount - 1 WHERE id=?", (old[0],))
                released.append(ChunkId(old[0]))
            conn.execute(
                "INSERT OR REPLACE INTO slot_index (signature, slot, chunk, version, updated_ns) VALUES (?,?,?,?,?)",
                (signature, slot, cid, version, now),
            )
            conn.execute("UPDATE chunks SET refcount = refcount + 1 WHERE id=?", (cid,))
        return released

    def sweep_slots(self, grace_ns: int) -> int:
        """Forget slot entries of deleted versions older than ``grace_ns``, then collect. No checkpoint.

        Only live chunks serve as bases (``files.delta.choose_base``), but for the grace period a deleted
        file's slot entries still lead a new version to the live keyframe at the root of their chain:
        the write-tmp-then-rename pattern deletes the old file before its successor is ingested.
        """
        cutoff = time.time_ns() - grace_ns
        with self.db.transaction() as c:  # atomic: no await until commit
            rows = c.execute(
                "SELECT signature, slot, chunk FROM slot_index WHERE updated_ns < ?"
                " AND version NOT IN (SELECT id FROM versions)",
                (cutoff,),
            ).fetchall()
            for sig, slot, cid in rows:
                c.execute("DELETE FROM slot_index WHERE signature=? AND slot=?", (sig, slot))
                c.execute("UPDATE chunks SET refcount = refcount - 1 WHERE id=?", (cid,))
        if rows:
            self.collect(ChunkId(r[2]) for r in rows)
        return len(rows)

    # -- garbage collection -------------------------------------------------------------------------

    def collect(self, candidates: Iterable[ChunkId] | None = None) -> int:
        """Delete unreferenced, unpinned chunks (all of them when ``candidates`` is None), releasing their
        bases in turn. No checkpoint."""
        if candidates is None:
            rows = self.db.execute("SELECT id FROM chunks WHERE refcount <= 0").fetchall()
            todo = [ChunkId(r[0]) for r in rows]
        else:
            todo = list(candidates)
        n = 0
        while todo:
            cid = todo.pop()
            if cid in self._pins or cid in self._inflight:
                continue
            row = self.db.one("SELECT refcount, base FROM chunks WHERE id=?", (cid,))
            if row is None or int(row[0]) > 0:
                continue
            with self.db.transaction() as c:  # atomic: no await until commit
                c.execute("DELETE FROM chunks WHERE id=?", (cid,))
                if row[1] is not None:
                    c.execute("UPDATE chunks SET refcount = refcount - 1 WHERE id=?", (row[1],))
            self.cache.delete(cid)
            if row[1] is not None:
                todo.append(ChunkId(row[1]))
            n += 1
        if n:
            log.debug("collected %d unreferenced chunks", n)
        return n
