"""Deleting checkpoints that newer ones were delta-coded against: the survivors are re-encoded, the
deleted ones' bytes are freed, every read stays bit-exact (files/repack.py)."""

from __future__ import annotations

import shutil
import sqlite3
import time

import pytest
import torch

from tests.e2e.test_compact import assert_depths_exact, wait_compacted
from tests.e2e.test_delta import train_series
from tests.helpers import assert_state_equal

# chunks referenced by nothing but the deltas coded against them, and rebases in flight
HELD_ONLY_BY_DELTAS = (
    "SELECT count(*) FROM chunks c WHERE refcount > 0"
    " AND refcount <= (SELECT count(*) FROM chunks d WHERE d.base = c.id)"
)


def wait_repacked(mount, timeout: float = 120) -> sqlite3.Connection:
    deadline = time.monotonic() + timeout
    db = sqlite3.connect(mount.cache / "meta.db")
    while True:
        held = db.execute(HELD_ONLY_BY_DELTAS).fetchone()[0]
        intents = db.execute("SELECT count(*) FROM rebase_intents").fetchone()[0]
        if held == 0 and intents == 0:
            return db
        if time.monotonic() > deadline:
            raise AssertionError(f"{held} chunks still held only by deltas after {timeout}s:\n{mount.log()}")
        time.sleep(0.1)


@pytest.mark.parametrize("chain", ["1", "4"])
def test_rotation_frees_deleted_bases(mount_factory, chain):
    """save_total_limit=2: after each save the oldest checkpoint directory is deleted. What stays is about
    what the last two checkpoints cost on their own (a keyframe and a delta), at any max_chain."""
    env = {"CKPTFS_INGEST_MAX_CHAIN": chain}
    states = train_series(6)
    m = mount_factory(env=env)
    for i, st in enumerate(states):
        d = m.path(f"checkpoint-{i}")
        d.mkdir()
        torch.save(st, d / "optimizer.pt")
        m.wait_local(f"checkpoint-{i}/optimizer.pt")
        if i >= 2:
            shutil.rmtree(m.path(f"checkpoint-{i - 2}"))
            # read the survivors while their chunks are being re-encoded
            for j in (i - 1, i):
                assert_state_equal(states[j], torch.load(m.path(f"checkpoint-{j}", "optimizer.pt")))
    db = wait_repacked(m)
    wait_compacted(m).close()
    depth = db.execute("SELECT max(depth) FROM chunks").fetchone()[0]
    assert_depths_exact(db)
    db.close()
    assert depth <= int(chain)
    stored = m.stats()["total"]["stored_bytes"]
    m.umount()

    alone = mount_factory(env=env)  # the same last two checkpoints, written into a fresh mount
    for i in (4, 5):
        torch.save(states[i], alone.path(f"optimizer-{i}.pt"))
        alone.wait_local(f"optimizer-{i}.pt")
    ideal = alone.stats()["total"]["stored_bytes"]
    alone.umount()
    assert stored <= 1.1 * ideal, (stored, ideal)

    m.start()
    for j in (4, 5):
        assert_state_equal(states[j], torch.load(m.path(f"checkpoint-{j}", "optimizer.pt")))
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data")
    assert "0 problems" in res.stdout, res.stdout


def test_deleting_a_middle_version_keeps_the_rest_of_the_chain(mount_factory):
    """Keep-everything with one checkpoint deleted from the middle of a chain: its successor is re-encoded
    (or keeps its frame once its base is settled), nothing else moves, all reads stay bit-exact."""
    states = train_series(5)
    m = mount_factory(env={"CKPTFS_INGEST_MAX_CHAIN": "4"})
    for i, st in enumerate(states):
        torch.save(st, m.path(f"step_{i}.pt"))
        m.wait_local(f"step_{i}.pt")
    before = m.stats()["total"]["stored_bytes"]
    m.path("step_2.pt").unlink()
    db = wait_repacked(m)
    wait_compacted(m).close()
    depth = db.execute("SELECT max(depth) FROM chunks").fetchone()[0]
    assert_depths_exact(db)
    db.close()
    assert depth <= 4
    after = m.stats()["total"]["stored_bytes"]
    assert after < before  # step_2's own chunks are gone
    for i in (0, 1, 3, 4):
        assert_state_equal(states[i], torch.load(m.path(f"step_{i}.pt")))
    m.umount()
    m.start()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data")
    assert "0 problems" in res.stdout, res.stdout
