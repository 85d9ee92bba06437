"""The repository of tiering state: the upload queue, where each chunk's frame is in the object store,
what this node last published to the namespace journal, and this cache's writer id.

Trio thread only, like every repository of ``meta``. The protocol these rows follow is in
docs/architecture.md ("Tiering to the object store").
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptfs.meta.db import Database
from ckptfs.meta.versions import add_refs
from ckptfs.types import ChunkId, VersionId, VersionState

# The order of journal events: (segment time, writer id, segment id, position in the segment).
Rank = tuple[int, str, str, int]


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """A chunk of an upload's closure, with where its current frame is in the store (``remote`` None: not yet)."""

    id: ChunkId
    codec: int
    stored: int
    raw_len: int
    base: ChunkId | None
    depth: int
    remote: str | None
    remote_off: int | None
    remote_len: int | None


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of the namespace as the journal publishes it."""

    path: bytes
    inode: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    version: VersionId | None
    state: str | None
    target: bytes | None


@dataclass(frozen=True, slots=True)
class Published:
    """A path as this node's journal last showed it: the digest of its entry, and its inode then."""

    digest: bytes
    inode: int | None


@dataclass(frozen=True, slots=True)
class FileLayout:
    """How ingest planned a version: its layout (``torchzip``, ``cdc``, ...), its layout signature (None
    for content-defined chunking) and the slot of each extent in offset order (None: no slot). Published
    with the version, so a node that recovers it codes the next version of that layout as deltas
    against it, and keeps a flat copy of it, as the node that wrote it did."""

    layout: str | None
    signature: str | None
    slots: list[str | None]


@dataclass(frozen=True, slots=True)
class ImportEntry:
    """A path recovered from the store's journal (``extents`` None: not a regular file)."""

    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    is_dir: bool
    target: bytes | None
    extents: list[tuple[int, int, ChunkId]] | None
    chunks: list[ChunkRow]
    layout: FileLayout | None = None  # None: the writer published none (a journal from before it)


@dataclass(frozen=True, slots=True)
class QueueSummary:
    versions: int
    size: int  # bytes of the versions queued
    oldest_ns: int | None
    last_error: str | None
    failing: list[tuple[bytes | None, int, str]]  # (a path of the version, attempts, last error)


_ENTRY_SELECT = (
    "SELECT i.id, i.mode, i.uid, i.gid, i.mtime_ns, i.size, i.version, v.state, i.target"
    " FROM inodes i LEFT JOIN versions v ON v.id = i.version"
)


# The columns of a ChunkRow, in ``Tiering._row``'s order (prefix them with the table's alias, if any).
_ROW_COLUMNS = ("id", "codec", "stored", "raw_len", "base", "depth", "remote", "remote_off", "remote_len")
_ROW_SELECT = f"SELECT {', '.join(_ROW_COLUMNS)} FROM chunks"


def _entry(path: bytes, r: tuple[Any, ...]) -> Entry:  # a row of _ENTRY_SELECT
    vid = None if r[6] is None else VersionId(int(r[6]))
    target = None if r[8] is None else bytes(r[8])
    return Entry(path, int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), vid, r[7], target)


def queue_in(conn: sqlite3.Connection, vid: VersionId) -> None:
    """Inside the transaction that makes ``vid`` local: queue it for upload."""
    conn.execute("INSERT OR IGNORE INTO upload_queue (version, queued_ns) VALUES (?, ?)", (vid, time.time_ns()))


class Tiering:
    def __init__(self, db: Database) -> None:
        self.db = db

    def writer_id(self, node_id: str) -> str:
        """``<node id>.<incarnation>``: the incarnation is chosen once per metadata database, so a wiped
        cache never reuses the journal names of its previous life."""
        inc = self.db.get_meta("incarnation")
        if inc is None:
            inc = os.urandom(8).hex()
            with self.db.transaction():
                self.db.set_meta("incarnation", inc)
        return f"{node_id}.{inc}"

    def requeue_local(self) -> int:
        """Start-up: every ``local`` version is queued (a queue row lost with a rolled-back power cut, or
        a database from before tiering)."""
        with self.db.transaction() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO upload_queue (version, queued_ns) SELECT id, created_ns FROM versions"
                " WHERE state=?",
                (VersionState.LOCAL.value,),
            )
            c.execute(
                "DELETE FROM upload_queue WHERE version NOT IN (SELECT id FROM versions WHERE state=?)",
                (VersionState.LOCAL.value,),
            )
        return int(cur.rowcount)

    def pending(self, limit: int, compacted_by_ns: int | None = None) -> list[VersionId]:
        """Queued versions that still exist, oldest first; drops the rows of versions that are gone.
        ``compacted_by_ns``: only versions none of whose chunks still wait for compaction
        (``compact_queue``), or queued before that time (they waited long enough)."""
        self.db.execute("DELETE FROM upload_queue WHERE version NOT IN (SELECT id FROM versions)")
        if compacted_by_ns is None:
            rows = self.db.execute("SELECT version FROM upload_queue ORDER BY queued_ns LIMIT ?", (limit,))
        else:
            rows = self.db.execute(
                "SELECT q.version FROM upload_queue q WHERE q.queued_ns < ? OR NOT EXISTS"
                " (SELECT 1 FROM extents x JOIN compact_queue k ON k.chunk = x.chunk WHERE x.version = q.version)"
                " ORDER BY q.queued_ns LIMIT ?",
                (compacted_by_ns, limit),
            )
        return [VersionId(int(r[0])) for r in rows.fetchall()]

    def chunks_not_in_store(self) -> int:
        """Referenced chunks whose current frame is not in the store (new, or re-encoded since)."""
        row = self.db.one("SELECT count(*) FROM chunks WHERE remote IS NULL AND refcount > 0")
        return 0 if row is None else int(row[0])

    def queued(self) -> int:
        row = self.db.one("SELECT count(*) FROM upload_queue")
        return 0 if row is None else int(row[0])

    def closure(self, vids: Iterable[VersionId]) -> list[ChunkRow]:
        """Every chunk the versions' extents name, and their delta bases, transitively; bases first."""
        ids = list(vids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"WITH RECURSIVE t(id) AS (SELECT chunk FROM extents WHERE version IN ({marks})"
            " UNION SELECT c.base FROM chunks c JOIN t ON c.id = t.id WHERE c.base IS NOT NULL)"
            f" SELECT {', '.join('c.' + col for col in _ROW_COLUMNS)}"
            " FROM chunks c JOIN t ON c.id = t.id ORDER BY c.depth",
            tuple(ids),
        ).fetchall()
        return [self._row(r) for r in rows]

    def not_uploaded(self, limit: int) -> list[ChunkRow]:
        """Committed chunks (referenced) whose current frame is not in the store, bases first — but not
        those a queued version will take up (``pending`` decides when), nor those waiting for compaction."""
        rows = self.db.execute(
            f"{_ROW_SELECT} WHERE remote IS NULL AND refcount > 0 AND id NOT IN (SELECT chunk FROM compact_queue)"
            " AND NOT EXISTS (SELECT 1 FROM extents x JOIN upload_queue q ON q.version = x.version"
            " WHERE x.chunk = chunks.id) ORDER BY depth LIMIT ?",
            (limit,),
        ).fetchall()
        return [self._row(r) for r in rows]

    def being_ingested(self, limit: int) -> list[ChunkRow]:
        """Chunks an ingest has stored and not committed yet (refcount 0, not in the store): a flush
        uploads them while the rest of the version is still being chunked."""
        rows = self.db.execute(
            f"{_ROW_SELECT} WHERE remote IS NULL AND refcount = 0 ORDER BY depth LIMIT ?",
            (limit,),
        ).fetchall()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(r: tuple[Any, ...]) -> ChunkRow:  # SQL-typed values
        base = None if r[4] is None else ChunkId(bytes(r[4]))
        return ChunkRow(
            ChunkId(bytes(r[0])),
            int(r[1]),
            int(r[2]),
            int(r[3]),
            base,
            int(r[5]),
            r[6],
            r[7],
            r[8],
        )

    def rows_in_objects(self, keys: Iterable[str]) -> list[ChunkRow]:
        """Every chunk whose current frame is in one of the objects ``keys`` (a gc marked or swept them)."""
        wanted = list(keys)
        out: list[ChunkRow] = []
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            rows = self.db.execute(
                f"{_ROW_SELECT} WHERE remote IN ({','.join('?' * len(part))})",
                tuple(part),
            ).fetchall()
            out += [self._row(r) for r in rows]
        return out

    def forget_remote(self, rows: Iterable[ChunkRow]) -> int:
        """The store's copy of these frames may be deleted (a gc marked its object): the rows say the
        frame is not in the store, so it goes up again under a new name. Only rows still pointing where
        they did. Returns how many changed."""
        n = 0
        with self.db.transaction() as c:
            for r in rows:
                cur = c.execute(
                    "UPDATE chunks SET remote=NULL, remote_off=NULL, remote_len=NULL WHERE id=? AND remote=?",
                    (r.id, r.remote),
                )
                n += cur.rowcount
        return n

    def keep_small_frame(self, cid: ChunkId, frame: bytes, replace: bool) -> None:
        """Keep a small frame fetched from the store as the chunk's local copy — only while the row still
        says that frame is the current one (a swap clears ``remote``), and (unless ``replace``, for a
        corrupt local copy) only if there is none yet."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        self.db.execute(
            f"{verb} INTO frames (chunk, frame) SELECT ?, ? WHERE EXISTS"
            " (SELECT 1 FROM chunks WHERE id=? AND remote IS NOT NULL AND remote_len=?)",
            (cid, frame, cid, len(frame)),
        )

    def extents(self, vid: VersionId) -> tuple[list[tuple[int, int, ChunkId]], FileLayout]:
        """A local version's extents in offset order, and how ingest planned it."""
        rows = self.db.execute(
            "SELECT offset, length, chunk, slot FROM extents WHERE version=? ORDER BY offset", (vid,)
        ).fetchall()
        row = self.db.one("SELECT layout, signature FROM versions WHERE id=?", (vid,))
        layout, signature = (None, None) if row is None else (row[0], row[1])
        ext = [(int(o), int(n), ChunkId(bytes(c))) for o, n, c, _ in rows]
        return ext, FileLayout(layout, signature, [None if r[3] is None else str(r[3]) for r in rows])

    def record_remote(self, done: Iterable[tuple[ChunkRow, str, int, int]]) -> int:
        """Record where frames now are in the store: (the row as uploaded, object, offset, length). A row
        whose frame was swapped meanwhile (another codec, size or base) is left alone: its new frame
        goes up next round. Returns how many were recorded."""
        n = 0
        with self.db.transaction() as c:  # atomic: no await until commit
            for row, key, off, length in done:
                cur = c.execute(
                    "UPDATE chunks SET remote=?, remote_off=?, remote_len=? WHERE id=? AND codec=? AND stored=?"
                    " AND base IS ?",
                    (key, off, length, row.id, row.codec, row.stored, row.base),
                )
                n += cur.rowcount
        return n

    def namespace(self) -> list[Entry]:
        """Every path but the root, with what a journal event needs."""
        inodes = {int(r[0]): r for r in self.db.execute(_ENTRY_SELECT).fetchall()}
        children: dict[int, list[tuple[bytes, int]]] = {}
        for parent, name, ino in self.db.execute("SELECT parent, name, inode FROM dirents").fetchall():
            children.setdefault(int(parent), []).append((bytes(name), int(ino)))
        out: list[Entry] = []
        todo: list[tuple[int, bytes]] = [(1, b"")]
        while todo:
            parent, prefix = todo.pop()
            for name, ino in children.get(parent, []):
                r = inodes.get(ino)
                if r is None:
                    continue
                path = prefix + b"/" + name
                out.append(_entry(path, r))
                if ino in children:
                    todo.append((ino, path))
        return out

    def is_empty(self) -> bool:
        """Nothing but the root: a new cache (recovery from the store may fill it)."""
        return self.db.one("SELECT 1 FROM dirents LIMIT 1") is None and self.db.one("SELECT 1 FROM versions") is None

    def import_entries(self, entries: list[ImportEntry]) -> dict[bytes, VersionId]:
        """Fill an empty namespace from the store's (recovery): inodes, entries, ``remote`` versions with
        their extents, and the chunk rows (with where each frame is in the store, no local frame).
        ``entries`` are sorted so that a directory comes before what it holds. One transaction. Returns
        the version each non-empty file got."""
        vids: dict[bytes, VersionId] = {}
        ino_of: dict[bytes, int] = {b"": 1}
        now = time.time_ns()
        with self.db.transaction() as c:  # atomic: no await until commit
            c.execute(  # the root (the namespace layer makes it too, when it is the one opening the cache)
                "INSERT OR IGNORE INTO inodes (id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns)"
                " VALUES (1, ?, ?, ?, 2, 0, ?, ?, ?)",
                (stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), now, now, now),
            )
            for e in entries:
                parent_path, _, name = e.path.rpartition(b"/")
                parent = ino_of[parent_path]
                ino = c.execute(
                    "INSERT INTO inodes (mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, target)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
                    (e.mode, e.uid, e.gid, 2 if e.is_dir else 1, e.size, e.mtime_ns, e.mtime_ns, now, e.target),
                ).lastrowid
                assert ino is not None
                c.execute("INSERT INTO dirents (parent, name, inode) VALUES (?,?,?)", (parent, name, ino))
                if e.is_dir:
                    ino_of[e.path] = ino
                    c.execute("UPDATE inodes SET nlink = nlink + 1 WHERE id=?", (parent,))
                if e.extents is not None and e.size:
                    vids[e.path] = self._insert_version(c, ino, e.size, e.mtime_ns, e.extents, e.chunks, e.layout)
        return vids

    def entry(self, path: bytes, ino: int) -> Entry | None:
        """The namespace entry of inode ``ino`` at ``path``."""
        r = self.db.one(_ENTRY_SELECT + " WHERE i.id=?", (ino,))
        return None if r is None else _entry(path, r)

    def published(self) -> dict[bytes, Published]:
        """What this node last put in its journal (or applied from another's), per path."""
        rows = self.db.execute("SELECT path, digest, inode FROM published").fetchall()
        return {bytes(p): Published(bytes(d), None if i is None else int(i)) for p, d, i in rows}

    def commit_published(
        self,
        changes: dict[bytes, bytes | None],
        remote: Iterable[VersionId],
        ranks: dict[bytes, Rank] | None = None,
        inodes: dict[bytes, int] | None = None,
    ) -> None:
        """After a journal segment is in the store: remember what it published (None: a tombstone, the
        path is forgotten), the rank of each event, and make its versions ``remote``."""
        with self.db.transaction() as c:  # atomic: no await until commit
            for path, digest in changes.items():
                if digest is None:
                    c.execute("DELETE FROM published WHERE path=?", (path,))
                else:
                    c.execute(
                        "INSERT OR REPLACE INTO published (path, digest, inode) VALUES (?, ?, ?)",
                        (path, digest, (inodes or {}).get(path)),
                    )
            for path, rank in (ranks or {}).items():
                c.execute("INSERT OR REPLACE INTO ranks (path, ts, writer, seg, idx) VALUES (?,?,?,?,?)", (path, *rank))
            for vid in remote:
                c.execute(
                    "UPDATE versions SET state=? WHERE id=? AND state=?",
                    (VersionState.REMOTE.value, vid, VersionState.LOCAL.value),
                )
                c.execute("DELETE FROM upload_queue WHERE version=?", (vid,))

    def rank(self, path: bytes) -> Rank | None:
        row = self.db.one("SELECT ts, writer, seg, idx FROM ranks WHERE path=?", (path,))
        return None if row is None else (int(row[0]), str(row[1]), str(row[2]), int(row[3]))

    def seen_segments(self) -> set[str]:
        return {str(r[0]) for r in self.db.execute("SELECT key FROM seen_segments").fetchall()}

    def mark_seen(self, keys: Iterable[str]) -> None:
        with self.db.transaction() as c:
            c.executemany("INSERT OR IGNORE INTO seen_segments (key) VALUES (?)", [(k,) for k in keys])

    def forget_seen(self, keys: Iterable[str]) -> None:
        """Segments no longer in the store (a gc compacted them into a snapshot): their rows go."""
        with self.db.transaction() as c:
            c.executemany("DELETE FROM seen_segments WHERE key=?", [(k,) for k in keys])

    def snapshot_applied(self) -> str | None:
        """The newest journal snapshot this node has looked at."""
        return self.db.get_meta("snapshot_applied")

    def set_snapshot_applied(self, key: str) -> None:
        with self.db.transaction():
            self.db.set_meta("snapshot_applied", key)

    def applied(self, path: bytes, rank: Rank, digest: bytes | None, inode: int | None = None) -> None:
        """Another writer's event for ``path`` now shows here: its rank, and (so this node does not
        publish it again as its own change) what the path looks like now (None: gone)."""
        with self.db.transaction() as c:
            c.execute("INSERT OR REPLACE INTO ranks (path, ts, writer, seg, idx) VALUES (?,?,?,?,?)", (path, *rank))
            if digest is None:
                c.execute("DELETE FROM published WHERE path=?", (path,))
            else:
                c.execute(
                    "INSERT OR REPLACE INTO published (path, digest, inode) VALUES (?, ?, ?)", (path, digest, inode)
                )

    def import_version(
        self,
        ino: int,
        size: int,
        mtime_ns: int,
        extents: list[tuple[int, int, ChunkId]],
        chunks: list[ChunkRow],
        layout: FileLayout | None = None,
    ) -> None:
        """Give inode ``ino`` (a file just created, empty) another writer's version: ``remote``, its extents,
        and rows for the chunks this cache does not know yet (with where they are in the store)."""
        with self.db.transaction() as c:  # atomic: no await until commit
            self._insert_version(c, ino, size, mtime_ns, extents, chunks, layout)

    @staticmethod
    def _insert_version(
        c: sqlite3.Connection,
        ino: int,
        size: int,
        mtime_ns: int,
        extents: list[tuple[int, int, ChunkId]],
        chunks: list[ChunkRow],
        layout: FileLayout | None,
    ) -> VersionId:
        """Inside a transaction: a ``remote`` version of ``ino`` with its extents (and layout and slots, if
        published), the rows of the chunks this cache does not know yet, and the references both hold
        (``chunks`` names every base). Returns the version."""
        if layout is not None and len(layout.slots) != len(extents):
            layout = None  # not this version's (a malformed event): planned as unknown
        vid = VersionId(
            c.execute(
                "INSERT INTO versions (inode, state, size, created_ns, layout, signature) VALUES (?,?,?,?,?,?)",
                (
                    ino,
                    VersionState.REMOTE.value,
                    size,
                    mtime_ns,
                    None if layout is None else layout.layout,
                    None if layout is None else layout.signature,
                ),
            ).lastrowid
            or 0
        )
        new = []
        for r in chunks:
            cur = c.execute(
                "INSERT OR IGNORE INTO chunks (id, codec, raw_len, stored, refcount, base, depth, remote,"
                " remote_off, remote_len) VALUES (?,?,?,?,0,?,?,?,?,?)",
                (r.id, r.codec, r.raw_len, r.stored, r.base, r.depth, r.remote, r.remote_off, r.remote_len),
            )
            if cur.rowcount:
                new.append(r)
        # a new row holds its base, as record_stored does; each extent holds its chunk
        add_refs(c, Counter(r.base for r in new if r.base is not None))
        slots = [None] * len(extents) if layout is None else layout.slots
        c.executemany(
            "INSERT INTO extents (version, offset, length, chunk, slot) VALUES (?,?,?,?,?)",
            [(vid, off, n, cid, slot) for (off, n, cid), slot in zip(extents, slots, strict=True)],
        )
        add_refs(c, Counter(cid for *_span, cid in extents))
        c.execute("UPDATE inodes SET version=?, size=?, mtime_ns=? WHERE id=?", (vid, size, mtime_ns, ino))
        return vid

    def uploaded_unpublished(self, vids: Iterable[VersionId]) -> None:
        """Versions whose chunks are all remote but no path shows them (fallbacks, unlinked files): they
        leave the queue and stay ``local``; the store has their frames, no journal names them."""
        with self.db.transaction() as c:
            c.executemany("DELETE FROM upload_queue WHERE version=?", [(v,) for v in vids])

    def failed(self, vids: Iterable[VersionId], error: str) -> None:
        with self.db.transaction() as c:
            c.executemany(
                "UPDATE upload_queue SET attempts = attempts + 1, last_error=? WHERE version=?",
                [(error, v) for v in vids],
            )

    def summary(self) -> QueueSummary:
        row = self.db.one(
            "SELECT count(*), coalesce(sum(v.size), 0), min(q.queued_ns) FROM upload_queue q"
            " JOIN versions v ON v.id = q.version"
        )
        assert row is not None
        failing = [
            (None if p is None else bytes(p), int(a), str(e))
            for p, a, e in self.db.execute(
                "SELECT (SELECT d.name FROM dirents d WHERE d.inode = v.inode LIMIT 1), q.attempts, q.last_error"
                " FROM upload_queue q JOIN versions v ON v.id = q.version WHERE q.last_error IS NOT NULL"
                " ORDER BY q.attempts DESC LIMIT 5"
            ).fetchall()
        ]
        return QueueSummary(
            int(row[0]),
            int(row[1]),
            None if row[2] is None else int(row[2]),
            failing[0][2] if failing else None,
            failing,
        )
