"""File versions and their durability states: the one owner of the ``versions`` table and of the chunk
references a version's extents hold.

Trio thread only (``Database``); nothing here checkpoints. The states (``types.VersionState``) and
what each promises after a crash are in docs/architecture.md, "Durability contract". Invariants:

* ``inodes.version`` names the newest version of a file, the one reads show. Older versions of the
  same inode are kept as *fallbacks* until a newer one is durable: committed ``local`` (the ingest
  commit drops them in its own transaction), or staged with a *durable mark* taken while nobody had
  the file open for writing (``mark_durable``). After a power cut, recovery shows the newest version
  that is durable (``files.contents.FileContents.recover``).
* A durable mark (``durable_size``, ``durable_hash``) says: the first ``durable_size`` bytes of the
  staging file were fsync'd and hash to ``durable_hash`` (xxh3-128). Recovery after a reboot trusts
  a staged version only if its staging file still hashes to its mark.
* Each extent holds one reference on its chunk (``chunks.refcount``). ``drop_refs`` releases them and
  returns the chunks touched, which the caller hands to ``files.chunks.ChunkIndex.collect``.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ckptfs.meta.db import Database
from ckptfs.types import ChunkId, InodeId, VersionId, VersionState


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One version as recovery sees it."""

    id: VersionId
    state: VersionState
    size: int
    staging: str | None
    durable_size: int | None
    durable_hash: bytes | None


def drop_refs(conn: sqlite3.Connection, version: int) -> list[ChunkId]:
    """Delete a version's extents and release their chunk references; return the chunks touched."""
    rows = conn.execute("SELECT chunk, count(*) FROM extents WHERE version=? GROUP BY chunk", (version,)).fetchall()
    conn.executemany("UPDATE chunks SET refcount = refcount - ? WHERE id=?", [(n, c) for c, n in rows])
    conn.execute("DELETE FROM extents WHERE version=?", (version,))
    return [ChunkId(c) for c, _ in rows]


def add_refs(conn: sqlite3.Connection, counts: Counter[ChunkId]) -> None:
    conn.executemany("UPDATE chunks SET refcount = refcount + ? WHERE id=?", [(n, c) for c, n in counts.items()])


class Versions:
    """Operations on file versions, in the language of the layers above."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- queries --------------------------------------------------------------------------------

    def current(self, inode: InodeId) -> tuple[VersionId | None, int, VersionState | None]:
        """(current version, file size, its state) of a regular file; (None, 0, None) if there is none."""
        row = self.db.one(
            "SELECT i.version, i.size, v.state FROM inodes i LEFT JOIN versions v ON v.id = i.version WHERE i.id=?",
            (inode,),
        )
        if row is None:
            return None, 0, None
        return (
            None if row[0] is None else VersionId(int(row[0])),
            int(row[1]),
            None if row[2] is None else VersionState(str(row[2])),
        )

    def history(self, inode: InodeId) -> list[VersionRow]:
        """Every version of ``inode``, newest first."""
        rows = self.db.execute(
            "SELECT id, state, size, staging, durable_size, durable_hash FROM versions WHERE inode=? ORDER BY id DESC",
            (inode,),
        ).fetchall()
        return [
            VersionRow(
                VersionId(int(r[0])),
                VersionState(str(r[1])),
                int(r[2]),
                r[3] or None,
                r[4],
                None if r[5] is None else bytes(r[5]),
            )
            for r in rows
        ]

    def inodes_with_staged(self) -> list[InodeId]:
        """Inodes that have at least one staged version (recovery looks at each)."""
        rows = self.db.execute("SELECT DISTINCT inode FROM versions WHERE state=?", (VersionState.STAGED.value,))
        return [InodeId(int(r[0])) for r in rows]

    def staged_bytes(self) -> int:
        """Bytes of every staged version, at its last seal."""
        row = self.db.one("SELECT total(size) FROM versions WHERE state=?", (VersionState.STAGED.value,))
        return 0 if row is None else int(row[0])

    def extents(self, vid: VersionId) -> list[tuple[int, int, bytes]]:
        """(offset, length, chunk id) of a committed version, in file order."""
        return self.db.execute(
            "SELECT offset, length, chunk FROM extents WHERE version=? ORDER BY offset", (vid,)
        ).fetchall()

    # -- transitions ----------------------------------------------------------------------------

    def create_staged(
        self, inode: InodeId, size: int, now_ns: int, staging_name: Callable[[VersionId], str]
    ) -> VersionId:
        """A new staged version of ``inode`` (not yet its current one: ``make_current``), whose bytes live
        in the staging file ``staging_name(id)``."""
        with self.db.transaction() as c:  # atomic: no await until commit
            return self.create_staged_in(c, inode, size, now_ns, staging_name)

    @staticmethod
    def create_staged_in(
        conn: sqlite3.Connection,
        inode: InodeId,
        size: int,
        now_ns: int,
        staging_name: Callable[[VersionId], str],
        *,
        current: bool = False,
    ) -> VersionId:
        """``create_staged`` inside the caller's transaction; with ``current`` it is made the inode's
        content in the same step (a new file: its creation and its first version are one change)."""
        vid = VersionId(
            conn.execute(
                "INSERT INTO versions (inode, state, size, staging, created_ns) VALUES (?,?,?,?,?)",
                (inode, VersionState.STAGED.value, size, "", now_ns),
            ).lastrowid
            or 0
        )
        conn.execute("UPDATE versions SET staging=? WHERE id=?", (staging_name(vid), vid))
        if current:
            conn.execute("UPDATE inodes SET version=?, size=? WHERE id=?", (vid, size, inode))
        return vid

    def discard(self, vid: VersionId) -> None:
        """Forget a staged version that never became current (its staging copy failed)."""
        self.db.execute("DELETE FROM versions WHERE id=?", (vid,))

    def make_current(self, inode: InodeId, vid: VersionId, size: int) -> None:
        """``vid`` becomes what ``inode`` shows. Older versions stay as fallbacks until it is durable."""
        self.db.execute("UPDATE inodes SET version=?, size=? WHERE id=?", (vid, size, inode))

    def record_size(self, inode: InodeId, vid: VersionId, size: int) -> None:
        """A staged version was sealed (or fsync'd) at ``size``."""
        with self.db.transaction() as c:  # atomic: no await until commit
            c.execute("UPDATE versions SET size=? WHERE id=?", (size, vid))
            c.execute("UPDATE inodes SET size=? WHERE id=?", (size, inode))

    def mark_durable(
        self, inode: InodeId, vid: VersionId, size: int, digest: bytes, *, drop_fallbacks: bool
    ) -> tuple[list[ChunkId], list[str]]:
        """Record that the first ``size`` bytes of ``vid``'s staging file are fsync'd and hash to ``digest``.

        With ``drop_fallbacks`` (the version is sealed: nobody writes it any more) the older versions of
        the inode go (never a newer one: ``drop_older_in``); returns the chunks they released and their
        staging files (to delete once this is durable). The mark is durable once the WAL is synced."""
        touched: list[ChunkId] = []
        names: list[str] = []
        with self.db.transaction() as c:  # atomic: no await until commit
            c.execute(
                "UPDATE versions SET size=?, durable_size=?, durable_hash=? WHERE id=? AND state=?",
                (size, size, digest, vid, VersionState.STAGED.value),
            )
            c.execute("UPDATE inodes SET size=? WHERE id=?", (size, inode))
            if drop_fallbacks:
                touched, names = self.drop_older_in(c, inode, vid)
        return touched, names

    def drop_others(self, inode: InodeId, keep: VersionId | None) -> tuple[list[ChunkId], list[str]]:
        """Delete every version of ``inode`` but ``keep`` (all when None). Returns (chunks touched, staging
        file names to delete once this is durable)."""
        with self.db.transaction() as c:  # atomic: no await until commit
            return self.drop_others_in(c, inode, keep)

    def drop_newer(self, inode: InodeId, than: VersionId) -> tuple[list[ChunkId], list[str]]:
        """Delete the versions of ``inode`` newer than ``than`` (copies a crash left unfinished)."""
        with self.db.transaction() as c:  # atomic: no await until commit
            return self._drop_where(c, "inode=? AND id>?", (inode, than))

    @classmethod
    def drop_others_in(
        cls, conn: sqlite3.Connection, inode: InodeId, keep: VersionId | None
    ) -> tuple[list[ChunkId], list[str]]:
        """Inside a transaction: delete every version of ``inode`` but ``keep``. Returns (chunks touched,
        staging file names to delete once this is durable)."""
        return cls._drop_where(conn, "inode=? AND id IS NOT ?", (inode, keep))

    @classmethod
    def drop_older_in(
        cls, conn: sqlite3.Connection, inode: InodeId, than: VersionId
    ) -> tuple[list[ChunkId], list[str]]:
        """Inside a transaction: delete the versions of ``inode`` older than ``than`` (its fallbacks, once
        ``than`` is durable or committed). A newer one is a rewrite still copying ``than`` into itself
        (``FileContents.open_write`` awaits that copy): it is about to become current and must stay."""
        return cls._drop_where(conn, "inode=? AND id<?", (inode, than))

    @staticmethod
    def _drop_where(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> tuple[list[ChunkId], list[str]]:
        touched: list[ChunkId] = []
        names: list[str] = []
        for vid, state, name in conn.execute(f"SELECT id, state, staging FROM versions WHERE {where}", args).fetchall():
            touched += drop_refs(conn, vid)
            conn.execute("DELETE FROM versions WHERE id=?", (vid,))
            if state == VersionState.STAGED.value and name:
                names.append(str(name))
        return touched, names

    def revert(self, inode: InodeId, to: VersionRow | None, size: int | None = None) -> None:
        """Recovery: ``inode`` shows ``to`` again (None: nothing, an empty file), at ``size`` if given."""
        with self.db.transaction() as c:  # atomic: no await until commit
            if to is None:
                c.execute("UPDATE inodes SET version=NULL, size=0 WHERE id=?", (inode,))
                return
            n = to.size if size is None else size
            c.execute("UPDATE inodes SET version=?, size=? WHERE id=?", (to.id, n, inode))
            c.execute("UPDATE versions SET size=? WHERE id=?", (n, to.id))
