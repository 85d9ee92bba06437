"""SQLite metadata: schema and connection. One database per node, in the cache directory.

All calls are synchronous and made from the trio thread only, so a run of statements with no
``await`` in between is atomic with respect to every other task. ``transaction()`` wraps such a run
in BEGIN IMMEDIATE/COMMIT so it is also atomic on disk. WAL with ``synchronous=NORMAL`` survives a
killed process (the durability that matters for kill -9); fsync-grade durability is asked for
explicitly by ``checkpoint()``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2 added ``frames``; a version-1 database is upgraded in place

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
    base_inode INTEGER                   -- the file that version belonged to (it may be gone since)
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
    depth    INTEGER NOT NULL DEFAULT 0  -- deltas to decode before this one (0 = keyframe)
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
CREATE TABLE IF NOT EXISTS xattrs (
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
"""


class Database:
    """A SQLite connection with the ckptfs schema. Trio thread only (not thread-safe by design)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self.conn.executescript(_SCHEMA)
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) == 1:  # the only change since: the ``frames`` table, which _SCHEMA created
            self.conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"metadata schema {row[0]} is not supported (expected {SCHEMA_VERSION})")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on exception). Never await inside."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[Any, ...] | None:  # row values are SQL-typed
        row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
        return row

    def sync_wal(self) -> None:
        """Make every transaction committed so far durable: fsync the WAL, where they were appended
        (or, if a checkpoint already moved them, the database file, which that checkpoint synced).
        Blocking, thread-safe: it touches no connection, so it can run in a worker thread."""
        for path in (self.path.with_name(self.path.name + "-wal"), self.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    def checkpoint(self) -> None:
        """Fold the WAL into the database file with a full fsync."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.conn.close()
