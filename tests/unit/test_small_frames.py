"""Small frames live in the metadata database, written with their chunk row (cache/store.py): no file,
readable from any thread, gone with the row, and swapped to and from files without losing a byte."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
import trio

from ckptfs.codec import chunk_id, encode, parse_header
from ckptfs.codec.frame import Codec, _pack
from ckptfs.errors import ChunkMissing
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.reader import fetch_and_decode
from ckptfs.files.swap import swap_frame
from ckptfs.files.workers import Workers
from ckptfs.meta import Database, add_refs


def _text(n: int, seed: int) -> bytes:
    return b"".join(b"record %d of %d; " % (i, seed) for i in range(n))


def _store(chunks: ChunkIndex, data: bytes) -> tuple[bytes, bytes]:
    """Store ``data`` as a keyframe the way ingest does, referenced once; returns (chunk id, frame)."""
    cid = chunk_id(data)
    frame, codec = encode(data, 1, 1)
    small = chunks.cache.is_small(frame)
    if not small:
        chunks.cache.put(cid, frame)
    chunks.record_stored(cid, int(codec), len(data), len(frame), None, 0, frame if small else None)
    with chunks.db.transaction() as c:
        add_refs(c, Counter({cid: 1}))
    return cid, frame


def _in_thread(fn, *args):
    """``fn(*args)`` in a new thread (with a connection of its own); its exception re-raised here."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # handed to the caller
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_small_frame_is_a_row_not_a_file_and_goes_with_it(index):
    data = _text(100, 1)
    cid, frame = _store(index, data)
    assert index.cache.is_small(frame)
    assert not index.cache.path(cid).exists()
    assert index.cache.get(cid) == frame
    assert _in_thread(fetch_and_decode, index.cache, cid) == data  # a worker thread's own connection
    with index.db.transaction() as c:
        add_refs(c, Counter({cid: -1}))
    assert index.collect([cid]) == 1
    assert index.db.one("SELECT count(*) FROM frames")[0] == 0
    with pytest.raises(ChunkMissing):
        _in_thread(index.cache.get, cid)


def test_large_frames_stay_files(index):
    data = _text(1000, 2) + random.Random(2).randbytes(64 * 1024)  # noise: stored raw, above SMALL_FRAME
    cid, frame = _store(index, data)
    assert not index.cache.is_small(frame)
    assert index.cache.path(cid).exists()
    assert index.db.one("SELECT count(*) FROM frames")[0] == 0
    assert fetch_and_decode(index.cache, cid) == data


def test_swap_moves_a_frame_between_file_and_database(index):
    data = _text(4000, 3)  # ~90 KB: a file when stored raw, small once compressed
    cid = chunk_id(data)
    raw_frame = _pack(Codec.RAW, 0, len(data), b"\0" * 16, data)  # the raw frame, as encode builds it
    small, codec = encode(data, 1, 1)
    assert not index.cache.is_small(raw_frame) and index.cache.is_small(small)
    index.cache.put(cid, raw_frame)
    index.record_stored(cid, int(Codec.RAW), len(data), len(raw_frame), None, 0)
    with index.db.transaction() as c:
        add_refs(c, Counter({cid: 1}))
    workers = Workers.create(1, 0)
    trio.run(swap_frame, index, workers, cid, small, 0)
    assert not index.cache.path(cid).exists()  # the stale file is gone
    assert index.cache.get(cid) == small and fetch_and_decode(index.cache, cid) == data
    assert index.db.one("SELECT codec, stored FROM chunks WHERE id=?", (cid,)) == (int(codec), len(small))
    trio.run(swap_frame, index, workers, cid, raw_frame, 0)  # and back to a file
    assert index.db.one("SELECT count(*) FROM frames")[0] == 0
    assert index.cache.get(cid) == raw_frame and fetch_and_decode(index.cache, cid) == data


def test_interrupted_swap_keeps_the_small_frame_and_drops_the_stale_file(index):
    base_data = _text(3000, 4)
    data = _text(3000, 5)
    cb, _ = _store(index, base_data)
    cid, small = _store(index, data)
    delta, _ = encode(data, 1, 1, (cb, base_data))
    assert parse_header(delta).base == cb
    index.begin_rebase(cid, cb)
    index.cache.put(cid, delta)
    # crash here: the file was written, the row still says keyframe and the small frame is there
    assert index.recover_rebases() == 1
    assert not index.cache.path(cid).exists()
    assert index.cache.get(cid) == small
    assert index.db.one("SELECT refcount, base FROM chunks WHERE id=?", (cid,)) == (1, None)
    assert index.db.one("SELECT refcount FROM chunks WHERE id=?", (cb,)) == (1,)  # the intent's hold released
    assert fetch_and_decode(index.cache, cid) == data


def test_older_caches_are_upgraded_and_a_newer_one_refused(tmp_path):
    import sqlite3

    db = Database(tmp_path / "meta.db")
    db.conn.execute("DROP TABLE frames")  # what a schema-1 cache looks like to the new code
    db.conn.execute("ALTER TABLE versions DROP COLUMN durable_size")
    db.conn.execute("ALTER TABLE versions DROP COLUMN durable_hash")
    db.conn.execute("DROP INDEX chunks_not_remote")
    for col in ("remote", "remote_off", "remote_len"):
        db.conn.execute(f"ALTER TABLE chunks DROP COLUMN {col}")
    db.conn.execute("DROP TABLE upload_queue")
    db.conn.execute("DROP TABLE published")
    db.conn.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.close()
    db = Database(tmp_path / "meta.db")
    assert db.one("SELECT value FROM meta WHERE key='schema'") == ("4",)
    assert db.one("SELECT count(*) FROM frames") == (0,)
    assert db.one("SELECT count(durable_size), count(durable_hash) FROM versions") == (0, 0)
    assert db.one("SELECT count(remote), count(remote_off), count(remote_len) FROM chunks") == (0, 0, 0)
    assert db.one("SELECT count(*) FROM upload_queue") == (0,) and db.one("SELECT count(*) FROM published") == (0,)
    db.close()
    conn = sqlite3.connect(tmp_path / "meta.db")
    conn.execute("UPDATE meta SET value='5' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="schema 5 is newer"):
        Database(tmp_path / "meta.db")


def test_database_files_are_private_and_a_failed_commit_rolls_back(tmp_path):
    import os
    import sqlite3
    import stat

    old = os.umask(0o022)
    try:
        db = Database(tmp_path / "meta.db")
        db.execute("INSERT INTO meta VALUES ('x', '1')")
    finally:
        os.umask(old)
    for name in ("meta.db", "meta.db-wal"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    # A COMMIT that fails (here: a deferred constraint, as SQLITE_FULL would) leaves no open transaction.
    db.conn.execute("CREATE TABLE t (x INTEGER REFERENCES meta(key) DEFERRABLE INITIALLY DEFERRED)")
    db.conn.execute("PRAGMA foreign_keys=ON")
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction() as c:
            c.execute("INSERT INTO t VALUES ('nope')")
    assert not db.conn.in_transaction
    db.execute("INSERT INTO meta VALUES ('y', '2')")  # autocommit: not swallowed by a dangling transaction
    assert db.one("SELECT count(*) FROM t") == (0,)
    db.close()
