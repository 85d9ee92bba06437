"""A rebase interrupted by a crash (files/repack.py) is finished or rolled back at start-up, with
refcounts that match what references each chunk."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ckptfs.codec import chunk_id, encode, parse_header
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.reader import fetch_and_decode
from ckptfs.meta import add_refs


def _floats(seed: int, base: bytes | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    if base is None:
        return (rng.standard_normal(1 << 15) * 0.02).astype(np.float32).tobytes()
    return (np.frombuffer(base, np.float32) + rng.standard_normal(1 << 15).astype(np.float32) * 1e-5).tobytes()


def _store(chunks: ChunkIndex, data: bytes, base: tuple[bytes, int] | None = None) -> bytes:
    """Store ``data`` (as a delta against ``base`` = (plain bytes, depth) when given), referenced once."""
    cid = chunk_id(data)
    pair = None if base is None else (chunk_id(base[0]), base[0])
    frame, codec = encode(data, 3, 4, pair)
    used = parse_header(frame).base
    chunks.cache.put(cid, frame)
    chunks.record_stored(cid, int(codec), len(data), len(frame), used, 0 if base is None else base[1] + 1)
    with chunks.db.transaction() as c:
        add_refs(c, Counter({cid: 1}))
    return cid


def _row(chunks: ChunkIndex, cid: bytes):
    return chunks.db.one("SELECT refcount, base, depth FROM chunks WHERE id=?", (cid,))


def test_rebase_written_before_the_crash_is_finished(index):
    a = _floats(1)
    b = _floats(2, a)
    ca, cb = _store(index, a), _store(index, b, (a, 0))
    assert _row(index, cb)[1] == ca and _row(index, ca)[0] == 2  # its extent + b's delta
    with index.db.transaction() as c:  # a's file is deleted: only b's delta holds it
        add_refs(c, Counter({ca: -1}))
    frame, _ = encode(b, 3, 4)  # b as a keyframe
    index.begin_rebase(cb, None)
    index.cache.put(cb, frame)
    # crash here: the frame is new, the row still names the old base
    assert index.recover_rebases() == 1
    assert _row(index, cb)[1:] == (None, 0)
    assert _row(index, ca) is None  # released and collected: its file goes once that is durable
    assert ca in index.doomed
    assert fetch_and_decode(index.cache, cb) == b
    assert index.db.one("SELECT count(*) FROM rebase_intents")[0] == 0


def test_rebase_not_written_is_rolled_back(index):
    a = _floats(1)
    b = _floats(2, a)
    c = _floats(3, a)
    ca, cb, cc = _store(index, a), _store(index, b, (a, 0)), _store(index, c)
    index.begin_rebase(cb, cc)
    assert _row(index, cc)[0] == 2  # held by the intent
    # crash here: the new frame was never written
    assert index.recover_rebases() == 1
    assert _row(index, cc)[0] == 1 and _row(index, ca)[0] == 2
    assert _row(index, cb)[1:] == (ca, 1)
    assert fetch_and_decode(index.cache, cb) == b


def test_rebase_onto_another_base_moves_the_reference(index):
    a = _floats(1)
    b = _floats(2, a)
    c = _floats(3, b)
    ca, cb = _store(index, a), _store(index, b, (a, 0))
    cc = _store(index, c, (b, 1))
    assert _row(index, cc)[1:] == (cb, 2)
    frame, _ = encode(c, 3, 4, (ca, a))  # c against a instead of b
    assert parse_header(frame).base == ca
    index.begin_rebase(cc, ca)
    index.cache.put(cc, frame)
    index.recover_rebases()
    assert _row(index, cc)[1:] == (ca, 1)
    assert _row(index, ca)[0] == 3 and _row(index, cb)[0] == 1  # a: extent + two deltas; b: its extent
    assert fetch_and_decode(index.cache, cc) == c
