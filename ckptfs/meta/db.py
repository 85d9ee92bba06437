"""SQLite metadata: schema and connection. One database per node, in the cache directory.

All calls are synchronous and made from the trio thread only, so a run of statements with no
``await`` in between is atomic with respect to every other task. ``transaction()`` wraps such a run
in BEGIN IMMEDIATE/COMMIT so it is also atomic on disk. WAL with ``synchronous=NORMAL`` survives a
killed process (the durability that matters for kill -9): a power cut may lose the transactions
committed since the last ``sync_wal()``/``checkpoint()`` — never a part of one, and never an older
one. So whoever deletes a file must first make durable the transaction that stopped referring to it
(``files.reclaim``), and whoever promises durability (fsync, the state ``local``) calls ``sync_wal``.

The database and its WAL are created 0600 (they hold file contents: small frames), and their
directory is fsync'd when they are created, so a power cut cannot lose the files themselves.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckptfs.fsutil import fsync_dir

SCHEMA_VERSION = 4  # 2 added ``frames``, 3 durable marks of staged versions, 4 tiering; older ones are upgraded

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per file, directory or symlink. The root directory is inode 1. AUTOINCREMENT: an id is
-- never reused, so a late kernel reference or a finishing ingest job can never hit a newer object.
CREATE TABLE IF NOT EXISTS inodes (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    mode     INTEGER NOT NULL,           -- st_mode: type and permission bits
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    nlink    INTEGER NOT NULL,           -- directory entries pointing here (0 = orphan, purged)
    size     INTEGER NOT NULL DEFAULT 0, -- file size; for a staged version, the size at its last seal
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    rdev     INTEGER NOT NULL DEFAULT 0, -- device number of character/block device nodes
    target   BLOB,                       -- symlink target
    version  INTEGER                     -- current version of a regular file (NULL = empty, never written)
);
-- Directory entries. `id` gives readdir a stable offset.
CREATE TABLE IF NOT EXISTS dirents (
    id     INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS dirents_inode ON dirents (inode);
CREATE INDEX IF NOT EXISTS dirents_name ON dirents (name);
-- Versions of a file's contents.
CREATE TABLE IF NOT EXISTS versions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    inode      INTEGER NOT NULL,
    state      TEXT NOT NULL,            -- 'staged' | 'local' | 'remote' (types.VersionState)
    size       INTEGER NOT NULL DEFAULT 0,
    staging    TEXT,                     -- staging file name while state = 'staged'
    created_ns INTEGER NOT NULL,
    layout     TEXT,                     -- 'torchzip' | 'safetensors' | 'positional' | 'cdc' once chunked
    signature  TEXT,                     -- layout signature (NULL for content-defined chunking)
    base_version INTEGER,                -- version whose chunks served as delta bases (NULL = none)
    base_inode INTEGER,                  -- the file that version belonged to (it may be gone since)
    durable_size INTEGER,                -- staged: bytes of the staging file fsync'd (NULL = no durable mark)
    durable_hash BLOB                    -- staged: xxh3-128 of those bytes, checked after a power cut
);
CREATE INDEX IF NOT EXISTS versions_inode ON versions (inode);
-- Ordered chunks of a local/remote version. Extents tile [0, size) without gaps.
CREATE TABLE IF NOT EXISTS extents (
    version INTEGER NOT NULL,
    offset  INTEGER NOT NULL,
    length  INTEGER NOT NULL,
    chunk   BLOB NOT NULL,               -- chunk id (xxh3-128 of the plain bytes)
    slot    TEXT,                        -- layout slot ("data/3#0"), NULL for content-defined chunks
    PRIMARY KEY (version, offset)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS extents_chunk ON extents (chunk);
-- Stored chunks. refcount = extents naming the chunk + chunks using it as their delta base
--                        + slot_index entries naming it + rebase_intents naming it as new_base.
CREATE TABLE IF NOT EXISTS chunks (
    id       BLOB PRIMARY KEY,
    codec    INTEGER NOT NULL,           -- codec.frame.Codec
    raw_len  INTEGER NOT NULL,           -- plain bytes
    stored   INTEGER NOT NULL,           -- bytes of the frame on disk
    refcount INTEGER NOT NULL,
    base     BLOB,                       -- delta base chunk (NULL for a keyframe)
    depth    INTEGER NOT NULL DEFAULT 0, -- deltas to decode before this one (0 = keyframe)
    remote     TEXT,                     -- object holding this exact frame in the store (NULL = not uploaded)
    remote_off INTEGER,                  -- its offset in that object (a pack) ...
    remote_len INTEGER                   -- ... and length
) WITHOUT ROWID;
-- The latest chunk stored for each slot of each layout signature: where a new version of a file with
-- the same layout (same records and sizes) finds the base of its delta for that slot.
CREATE TABLE IF NOT EXISTS slot_index (
    signature  TEXT NOT NULL,            -- hash of the layout (record names and sizes)
    slot       TEXT NOT NULL,            -- "data/3#0", a tensor name, ...
    chunk      BLOB NOT NULL,
    version    INTEGER NOT NULL,         -- the version that stored it (may be deleted since)
    updated_ns INTEGER NOT NULL,
    PRIMARY KEY (signature, slot)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slot_index_version ON slot_index (version);
CREATE INDEX IF NOT EXISTS chunks_unref ON chunks (refcount) WHERE refcount = 0;
CREATE INDEX IF NOT EXISTS chunks_base ON chunks (base) WHERE base IS NOT NULL;
CREATE INDEX IF NOT EXISTS chunks_not_remote ON chunks (depth) WHERE remote IS NULL;
-- Frames of at most cache.store.SMALL_FRAME bytes (zip headers, small records, chunks that compress to
-- almost nothing) live here instead of one file each: written in the transaction that records the
-- chunk row, so no file, fsync or thread hop per small chunk. Readers look here before the file.
CREATE TABLE IF NOT EXISTS frames (
    chunk BLOB PRIMARY KEY,
    frame BLOB NOT NULL
);
-- Chunks stored by ingest or repack that files/compact.py has not tried pcodec on yet.
CREATE TABLE IF NOT EXISTS compact_queue (
    chunk BLOB PRIMARY KEY
) WITHOUT ROWID;
-- A chunk being re-encoded against a new base (files/repack.py). The row holds one reference on
-- new_base from before the new frame is written until the chunk row names it; start-up finishes or
-- rolls back whatever a crash interrupted (ChunkIndex.recover_rebases).
CREATE TABLE IF NOT EXISTS rebase_intents (
    chunk    BLOB PRIMARY KEY,
    new_base BLOB                         -- NULL: the chunk becomes a keyframe
) WITHOUT ROWID;
-- Versions committed 'local' that are not 'remote' yet (meta/tiering.py): inserted by the commit that
-- makes a version local, deleted when the journal naming it is in the store (or the version is gone).
CREATE TABLE IF NOT EXISTS upload_queue (
    version   INTEGER PRIMARY KEY,
    queued_ns INTEGER NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
-- What this node last published to the store's namespace journal, per path (tier/publish.py diffs
-- the namespace against it).
CREATE TABLE IF NOT EXISTS published (
    path   BLOB PRIMARY KEY,
    digest BLOB NOT NULL,
    inode  INTEGER                       -- the inode the path showed then (a rename's tombstone waits for it)
) WITHOUT ROWID;
-- For each path, the journal event (segment time, writer id, segment id, position) the namespace shows:
-- this node's own published events and other nodes' applied ones (tier/refresh.py: last writer wins).
CREATE TABLE IF NOT EXISTS ranks (
    path   BLOB PRIMARY KEY,
    ts     INTEGER NOT NULL,
    writer TEXT NOT NULL,
    seg    TEXT NOT NULL,                -- the segment's random id (two segments of a writer never tie)
    idx    INTEGER NOT NULL
) WITHOUT ROWID;
-- Other writers' journal segments already applied here.
CREATE TABLE IF NOT EXISTS seen_segments (
    key TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS xattrs (
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
"""


_ADDED_COLUMNS = [
    ("versions", "durable_size", "INTEGER"),  # schema 3
    ("versions", "durable_hash", "BLOB"),
    ("chunks", "remote", "TEXT"),  # schema 4
    ("chunks", "remote_off", "INTEGER"),
    ("chunks", "remote_len", "INTEGER"),
]


class Database:
    """A SQLite connection with the ckptfs schema. Trio thread only (not thread-safe by design)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        new = not self.path.exists()
        # Private from the first byte (contents live here), whatever the umask; SQLite gives the WAL and
        # the shared-memory file the database file's mode.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=OFF")
        row = None if new else self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(f"metadata schema {row[0]} is newer than this ckptfs supports ({SCHEMA_VERSION})")
        if row is not None and int(row[0]) < SCHEMA_VERSION:  # added columns; new tables come from _SCHEMA
            for table, col, typ in _ADDED_COLUMNS:
                cols = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                if col not in cols:
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")
        self.conn.executescript(_SCHEMA)
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        if new:
            self.checkpoint()
            fsync_dir(self.path.parent)

    @property
    def _wal(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on exception). Never await inside.

        A COMMIT that fails (SQLITE_FULL, an I/O error) is rolled back too, so a later statement can never
        join a transaction left open and be committed with it by someone else's COMMIT."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite may have rolled back on its own; the original error says why
            raise

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[Any, ...] | None:  # row values are SQL-typed
        row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
        return row

    def sync_wal(self) -> None:
        """Make every transaction committed so far durable: fsync the WAL, where they were appended
        (or, if a checkpoint already moved them, the database file, which that checkpoint synced), and
        the directory, whose entry for a WAL SQLite has just created may not be durable yet.
        Blocking, thread-safe: it touches no connection, so it can run in a worker thread."""
        for path in (self._wal, self.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            break
        fsync_dir(self.path.parent)

    def checkpoint(self) -> None:
        """Fold the WAL into the database file with a full fsync."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.conn.close()
