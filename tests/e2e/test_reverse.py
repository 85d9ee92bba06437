"""Reverse deltas (``ingest.newest_keyframe``, files/reverse.py): in idle time the newest checkpoint of a
layout becomes a keyframe and the one before it a delta against it, so a restore decodes each chunk
once; every version stays bit-exact, depths stay exact, the bound holds, storage stays what forward
chains cost, and a kill -9 in the middle loses nothing."""

from __future__ import annotations

import random
import sqlite3
import time

import torch

from tests.e2e.test_compact import assert_depths_exact, wait_compacted
from tests.e2e.test_delta import train_series, versions
from tests.helpers import assert_state_equal

ON = {"CKPTFS_INGEST_NEWEST_KEYFRAME": "true"}


def wait_reversed(m, timeout: float = 180) -> sqlite3.Connection:
    """Until no chunk a delta-base slot names is a delta, and compaction is done."""
    db = sqlite3.connect(m.cache / "meta.db")
    deadline = time.monotonic() + timeout
    q = "SELECT count(*) FROM slot_index s JOIN chunks c ON c.id = s.chunk WHERE c.base IS NOT NULL"
    while db.execute(q).fetchone()[0]:
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.1)
    db.close()
    return wait_compacted(m, timeout)


def test_the_newest_checkpoint_is_a_keyframe_and_storage_stays_that_of_forward_chains(mount_factory):
    states = train_series(7, torch.float32, width=512)
    depth, stored = {}, {}
    for mode, env in (("forward", {}), ("reverse", ON)):
        m = mount_factory(env=env)
        for i, st in enumerate(states):
            torch.save(st, m.path(f"step_{i}.pt"))
            m.wait_local(f"step_{i}.pt")
            db = wait_reversed(m) if env else wait_compacted(m)
            assert_depths_exact(db)
            db.close()
            newest = versions(m)[f"step_{i}.pt"]["max_depth"]
            if env:
                assert newest == 0, (i, versions(m))
        vs = versions(m)
        depth[mode] = {p: v["max_depth"] for p, v in vs.items()}
        stored[mode] = m.stats()["total"]["stored_bytes"]
        m.umount()
        res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
        assert " 0 problems" in res.stdout, res.stdout
        m.start()
        for i, st in enumerate(states):
            assert_state_equal(st, torch.load(m.path(f"step_{i}.pt")))
        m.umount()
    assert depth["forward"]["step_6.pt"] > 0
    assert max(depth["reverse"].values()) <= 4 and depth["reverse"]["step_0.pt"] > 0  # the history is deltas
    assert stored["reverse"] <= stored["forward"] * 1.05, stored


def test_kill9_while_reversing_loses_nothing(mount_factory):
    states = train_series(5, torch.float32, width=512)
    rng = random.Random(11)
    m = mount_factory(env=ON)
    expected = {}
    for i, st in enumerate(states):
        torch.save(st, m.path(f"s{i}.pt"))
        expected[f"s{i}.pt"] = m.path(f"s{i}.pt").read_bytes()
        m.wait_local(f"s{i}.pt")
        time.sleep(rng.uniform(2.0, 3.0))  # background re-encoding starts 2 s after the last write
        m.kill9()
        m.start()
        for name, data in expected.items():
            assert m.path(name).read_bytes() == data, name
    db = wait_reversed(m)
    assert_depths_exact(db)
    db.close()
    assert versions(m)["s4.pt"]["max_depth"] == 0
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout
