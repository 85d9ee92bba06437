"""Float chunks are recompressed with pcodec once ingest is idle (files/compact.py): fewer bytes, the
same bits on every read."""

from __future__ import annotations

import sqlite3
import time

import torch

from tests.e2e.test_delta import train_series
from tests.helpers import assert_state_equal

PCO_CODECS = (5, 6)  # codec.Codec.PCO, codec.Codec.SUB_PCO


def wait_compacted(mount, timeout: float = 180) -> sqlite3.Connection:
    db = sqlite3.connect(mount.cache / "meta.db")
    deadline = time.monotonic() + timeout
    while db.execute("SELECT count(*) FROM compact_queue").fetchone()[0]:
        if time.monotonic() > deadline:
            raise AssertionError(f"compaction queue not empty after {timeout}s:\n{mount.log()}")
        time.sleep(0.1)
    return db


def assert_depths_exact(db: sqlite3.Connection) -> None:
    """Every chunk's depth is its base's depth + 1 (0 for a keyframe): what bounds reads is true."""
    wrong = db.execute(
        "SELECT count(*) FROM chunks c LEFT JOIN chunks b ON b.id = c.base"
        " WHERE (c.base IS NULL AND c.depth <> 0) OR (c.base IS NOT NULL AND c.depth <> b.depth + 1)"
    ).fetchone()[0]
    assert wrong == 0, f"{wrong} chunks with a stale depth"


def codec_bytes(db: sqlite3.Connection) -> dict[int, int]:
    return {int(c): int(n) for c, n in db.execute("SELECT codec, sum(stored) FROM chunks GROUP BY codec")}


def test_idle_recompression_shrinks_and_stays_bit_exact(mount_factory):
    states = train_series(3, torch.bfloat16, width=768)
    stored = {}
    for level in ("0", "10"):
        m = mount_factory(env={"CKPTFS_INGEST_PCO_LEVEL": level})
        for i, st in enumerate(states):
            torch.save(st, m.path(f"step_{i}.pt"))
            m.wait_local(f"step_{i}.pt")
        db = wait_compacted(m)
        by_codec = codec_bytes(db)
        assert_depths_exact(db)
        db.close()
        stored[level] = m.stats()["total"]["stored_bytes"]
        if level == "0":
            assert not set(by_codec) & set(PCO_CODECS), by_codec
        else:
            assert by_codec.get(5, 0) > 0 and by_codec.get(6, 0) > 0, by_codec  # keyframes and deltas
        m.umount()
        m.start()
        for i, st in enumerate(states):
            assert_state_equal(st, torch.load(m.path(f"step_{i}.pt")))
        res = m.cli("fsck", "--cache", str(m.cache), "--verify-data")
        assert "0 problems" in res.stdout, res.stdout
        m.umount()
    assert stored["10"] < 0.97 * stored["0"], stored
