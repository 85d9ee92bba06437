"""The chunk index: rows of the ``chunks`` table, delta-base slots, in-flight pins and garbage collection.

Trio thread only. Invariants:

* a chunk row exists only after its frame is in the cache (``record_stored`` is called after ``put``,
  or writes a small frame itself, in the same transaction: ``cache.store``);
* ``refcount`` = extents naming the chunk + chunks whose delta base it is + ``slot_index`` entries naming
  it + ``rebase_intents`` naming it as the new base. A delta's base therefore lives as long as the
  delta, whatever happens to the file it came from (``files.repack`` re-encodes deltas whose bases
  nothing else needs);
* a chunk is deleted only when its refcount is 0 and no ingest job has it pinned; deletion removes the
  row (and a small frame with it), releases the chunk's own base (cascading) and queues the frame file
  for ``files.reclaim``, which deletes it once that is durable.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from ckptfs.cache import ChunkCache
from ckptfs.codec import parse_header
from ckptfs.errors import CorruptChunk
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
        # chunks that lost a reference but are still referenced: maybe only by deltas now (files.repack)
        self.released: set[ChunkId] = set()
        # chunk files whose directory entry no ingest has fsynced yet (``files.ingest`` step 4)
        self.unsynced: set[ChunkId] = set()
        # collected chunks whose frame files ``files.reclaim`` deletes once the collection is durable
        self.doomed: set[ChunkId] = set()
        self.on_doomed: Callable[[], None] = lambda: None

    def has(self, cid: ChunkId) -> bool:
        return self.db.one("SELECT 1 FROM chunks WHERE id=?", (cid,)) is not None

    def depth(self, cid: ChunkId) -> int | None:
        row = self.db.one("SELECT depth FROM chunks WHERE id=?", (cid,))
        return None if row is None else int(row[0])

    def in_store(self, cid: ChunkId) -> bool:
        """Is the chunk's current frame in the object store (``meta.tiering``)?"""
        return self.db.one("SELECT 1 FROM chunks WHERE id=? AND remote IS NOT NULL", (cid,)) is not None

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
        self,
        cid: ChunkId,
        codec: int,
        raw_len: int,
        stored: int,
        base: ChunkId | None,
        depth: int,
        small_frame: bytes | None = None,
    ) -> None:
        """Insert the row of a chunk whose frame is now in the cache — or is ``small_frame``, written
        here with the row (``ChunkCache.is_small``) — at refcount 0 until committed.

        The base (which the caller has pinned, so it exists) gains one reference for its new dependent.
        """
        with self.db.transaction() as c:  # atomic: no await until commit
            cur = c.execute(
                "INSERT OR IGNORE INTO chunks (id, codec, raw_len, stored, refcount, base, depth)"
                " VALUES (?,?,?,?,0,?,?)",
                (cid, codec, raw_len, stored, base, depth),
            )
            if cur.rowcount and small_frame is not None:
                c.execute("INSERT OR REPLACE INTO frames (chunk, frame) VALUES (?,?)", (cid, small_frame))
            if cur.rowcount and base is not None:
                c.execute("UPDATE chunks SET refcount = refcount + 1 WHERE id=?", (base,))

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

    # -- replacing a chunk's frame (files.swap: repack and compaction) ------------------------------

    def pinned(self, cid: ChunkId) -> bool:
        return cid in self._pins or cid in self._inflight

    def only_deltas_hold(self) -> list[ChunkId]:
        """Chunks referenced by nothing but the deltas coded against them (a full scan; start-up)."""
        rows = self.db.execute(
            "SELECT id FROM chunks c WHERE refcount > 0"
            " AND refcount <= (SELECT count(*) FROM chunks d WHERE d.base = c.id)"
        ).fetchall()
        return [ChunkId(bytes(r[0])) for r in rows]

    def direct_refs(self, cid: ChunkId) -> int | None:
        """References to ``cid`` other than deltas coded against it: extents, slot entries (and pending
        rebases). 0 means only deltas keep the chunk; None that it is gone."""
        row = self.db.one(
            "SELECT refcount - (SELECT count(*) FROM chunks d WHERE d.base = c.id) FROM chunks c WHERE id=?", (cid,)
        )
        return None if row is None else int(row[0])

    def begin_rebase(self, cid: ChunkId, new_base: ChunkId | None) -> None:
        """Before ``cid``'s new frame (coded against ``new_base``, or a keyframe) is written: hold the new
        base. No checkpoint."""
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO rebase_intents (chunk, new_base) VALUES (?, ?)", (cid, new_base))
            if new_base is not None:
                c.execute("UPDATE chunks SET refcount = refcount + 1 WHERE id=?", (new_base,))

    def finish_rebase(
        self, cid: ChunkId, codec: int, stored: int, depth: int, small_frame: bytes | None = None
    ) -> ChunkId | None:
        """After the new frame is durable (or with it: ``small_frame``, written here): the row names the
        new base, the old base loses this chunk's reference (returned, for ``collect``). A file frame
        replaces a small one; a small frame leaves a stale file, which the caller deletes. The chunks coded
        against ``cid`` move by its change of depth in the same transaction, so depths stay exact at any
        crash point. No checkpoint."""
        with self.db.transaction() as c:
            new_base = c.execute("SELECT new_base FROM rebase_intents WHERE chunk=?", (cid,)).fetchone()
            old = c.execute("SELECT base, depth FROM chunks WHERE id=?", (cid,)).fetchone()
            if new_base is None or old is None:
                raise RuntimeError(f"no rebase of chunk {cid.hex()} in progress")
            c.execute(  # a new frame: not in the store until the uploader puts it up under its new name
                "UPDATE chunks SET codec=?, stored=?, base=?, depth=?, remote=NULL, remote_off=NULL,"
                " remote_len=NULL WHERE id=?",
                (codec, stored, new_base[0], depth, cid),
            )
            c.execute("DELETE FROM rebase_intents WHERE chunk=?", (cid,))
            if depth != int(old[1]):
                c.execute(
                    "WITH RECURSIVE t(id) AS (SELECT id FROM chunks WHERE base = ?"
                    " UNION SELECT d.id FROM chunks d JOIN t ON d.base = t.id)"
                    " UPDATE chunks SET depth = depth + ? WHERE id IN (SELECT id FROM t)",
                    (cid, depth - int(old[1])),
                )
            if small_frame is None:
                c.execute("DELETE FROM frames WHERE chunk=?", (cid,))
            else:
                c.execute("INSERT OR REPLACE INTO frames (chunk, frame) VALUES (?,?)", (cid, small_frame))
            if old[0] is not None:
                c.execute("UPDATE chunks SET refcount = refcount - 1 WHERE id=?", (old[0],))
        return None if old[0] is None else ChunkId(bytes(old[0]))

    def set_depth(self, cid: ChunkId, depth: int) -> None:
        self.db.execute("UPDATE chunks SET depth=? WHERE id=?", (depth, cid))

    def settle_rebase(self, cid: ChunkId) -> list[ChunkId]:
        """Finish ``cid``'s rebase if its new frame is on disk, else roll it back; returns the chunks that
        lost a reference (for ``collect``). No checkpoint."""
        row = self.db.one("SELECT new_base FROM rebase_intents WHERE chunk=?", (cid,))
        if row is None:
            return []
        new_base = None if row[0] is None else ChunkId(bytes(row[0]))
        if self.cache.small(cid) is not None:
            # A small new frame is written with the finishing transaction, so this rebase wrote none;
            # a file written meanwhile is stale (``get`` prefers the small frame): roll back.
            self.cache.delete(cid)
            written = False
        else:
            try:
                frame = self.cache.get(cid)
                hdr = parse_header(frame)
                written = hdr.base == new_base
            except CorruptChunk:  # ChunkMissing included
                written = False
        if written:
            base_depth = None if new_base is None else self.depth(new_base)
            old = self.finish_rebase(cid, int(hdr.codec), len(frame), 0 if base_depth is None else base_depth + 1)
            return [] if old is None else [old]
        with self.db.transaction() as c:
            c.execute("DELETE FROM rebase_intents WHERE chunk=?", (cid,))
            if new_base is not None:
                c.execute("UPDATE chunks SET refcount = refcount - 1 WHERE id=?", (new_base,))
        return [] if new_base is None else [new_base]

    def recover_rebases(self) -> int:
        """At start-up: finish rebases whose new frame was written before a crash, roll back the others."""
        rows = self.db.execute("SELECT chunk FROM rebase_intents").fetchall()
        released: list[ChunkId] = []
        for (chunk_b,) in rows:
            released += self.settle_rebase(ChunkId(bytes(chunk_b)))
        if rows:
            self.collect(released)
            log.info("recovery: %d interrupted delta rebases finished or rolled back", len(rows))
        return len(rows)

    # -- denser re-encoding later (files.compact) ---------------------------------------------------

    @staticmethod
    def queue_compaction_in(conn: sqlite3.Connection, cids: Iterable[ChunkId]) -> None:
        conn.executemany("INSERT OR IGNORE INTO compact_queue (chunk) VALUES (?)", [(c,) for c in cids])

    def queue_compaction(self, cids: Iterable[ChunkId]) -> None:
        with self.db.transaction() as c:
            self.queue_compaction_in(c, cids)

    def compaction_batch(self, limit: int) -> list[ChunkId]:
        return [ChunkId(bytes(r[0])) for r in self.db.execute("SELECT chunk FROM compact_queue LIMIT ?", (limit,))]

    def compaction_done(self, cid: ChunkId) -> None:
        self.db.execute("DELETE FROM compact_queue WHERE chunk=?", (cid,))

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
            if self.pinned(cid):
                continue
            row = self.db.one("SELECT refcount, base FROM chunks WHERE id=?", (cid,))
            if row is not None and int(row[0]) > 0:
                self.released.add(cid)
            if row is None or int(row[0]) > 0:
                continue
            with self.db.transaction() as c:  # atomic: no await until commit
                c.execute("DELETE FROM chunks WHERE id=?", (cid,))
                c.execute("DELETE FROM frames WHERE chunk=?", (cid,))
                c.execute("DELETE FROM compact_queue WHERE chunk=?", (cid,))
                if row[1] is not None:
                    c.execute("UPDATE chunks SET refcount = refcount - 1 WHERE id=?", (row[1],))
            self.doomed.add(cid)
            self.unsynced.discard(cid)
            if row[1] is not None:
                todo.append(ChunkId(row[1]))
            n += 1
        if n:
            log.debug("collected %d unreferenced chunks", n)
            self.on_doomed()
        return n
