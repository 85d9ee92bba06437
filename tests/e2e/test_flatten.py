"""Flat copies (``ingest.flat_newest``, files/flatten.py): in idle time the newest chunk of every slot that
is a delta also gets a decoded (raw) copy in the cache; a read takes that copy instead of the chain; a
copy whose slot moved on goes; a torn, flipped or foreign copy is dropped and the chain read; a kill -9
in the middle loses nothing; the canonical frames and the storage figures do not change."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import torch

from tests.e2e.test_compact import assert_depths_exact
from tests.e2e.test_delta import train_series, versions
from tests.helpers import assert_state_equal


def status(m) -> dict:
    return json.loads(m.cli("status", "--json", str(m.mnt)).stdout)


def flat_files(m) -> dict[bytes, Path]:
    return {bytes.fromhex(p.name): p for p in (m.cache / "flat").glob("*/*") if not p.name.endswith(".tmp")}


def wanted(m) -> set[bytes]:
    """What should have a copy: chunks a slot names (the newest of their slot) that are deltas."""
    db = sqlite3.connect(m.cache / "meta.db")
    q = "SELECT DISTINCT s.chunk FROM slot_index s JOIN chunks c ON c.id = s.chunk WHERE c.depth > 0"
    got = {bytes(r[0]) for r in db.execute(q)}
    db.close()
    return got


def wait_flat(m, timeout: float = 180) -> None:
    """Until the daemon has made every copy it wants and compacted what it ingested."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(m)
        if not st["flatten_pending"] and not st["compaction_pending"] and not st["ingest_pending"]:
            return
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.2)


def test_the_newest_is_read_from_its_flat_copy_and_older_copies_go(mount_factory):
    states = train_series(4, torch.float32, width=512)
    m = mount_factory()
    for i, st in enumerate(states):
        torch.save(st, m.path(f"step_{i}.pt"))
        m.wait_local(f"step_{i}.pt")
        wait_flat(m)
        assert set(flat_files(m)) == wanted(m), i  # exactly the newest's deltas; the older copies went
    assert len(flat_files(m)) >= 3, versions(m)  # the weights and both Adam moments changed
    newest = versions(m)["step_3.pt"]
    assert newest["max_depth"] >= 2, newest  # the canonical frames are still forward deltas
    db = sqlite3.connect(m.cache / "meta.db")
    assert_depths_exact(db)
    db.close()
    stored = m.stats()["total"]["stored_bytes"]
    m.umount()
    m.start()  # nothing decoded in memory, no page cache
    assert_state_equal(states[3], torch.load(m.path("step_3.pt")))
    assert status(m)["cache"]["flat_reads"] == len(flat_files(m))  # every copy served, once
    for i in range(3):
        assert_state_equal(states[i], torch.load(m.path(f"step_{i}.pt")))
    assert m.stats()["total"]["stored_bytes"] == stored  # copies are not chunks: the figures stay
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout


def test_a_torn_flipped_or_foreign_copy_is_dropped_and_the_chain_read(mount_factory):
    states = train_series(3, torch.float32, width=512)
    m = mount_factory()
    for i, st in enumerate(states):
        torch.save(st, m.path(f"s{i}.pt"))
        m.wait_local(f"s{i}.pt")
    wait_flat(m)
    copies = sorted(flat_files(m).items())
    assert len(copies) >= 3, copies
    m.umount()
    (_, torn), (_, flipped), (_, foreign) = copies[:3]
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])  # a power cut after the rename, before the write-back
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    flipped.write_bytes(bytes(raw))
    foreign.write_bytes(copies[3][1].read_bytes() if len(copies) > 3 else data)  # a good frame of another chunk
    m.start()
    assert_state_equal(states[2], torch.load(m.path("s2.pt")))
    assert "flat copy of chunk" in m.log()
    assert status(m)["cache"]["flat_reads"] == len(copies) - 3
    wait_flat(m)  # dropped ones are made again in idle time
    assert set(flat_files(m)) == wanted(m)
    m.umount()
    m.start()
    assert_state_equal(states[2], torch.load(m.path("s2.pt")))
    assert status(m)["cache"]["flat_reads"] == len(copies)


def test_kill9_while_flattening_loses_nothing(mount_factory):
    states = train_series(4, torch.float32, width=512)
    rng = random.Random(5)
    m = mount_factory()
    expected = {}
    for i, st in enumerate(states):
        torch.save(st, m.path(f"s{i}.pt"))
        expected[f"s{i}.pt"] = m.path(f"s{i}.pt").read_bytes()
        m.wait_local(f"s{i}.pt")
        time.sleep(rng.uniform(2.0, 3.0))  # background work starts 2 s after the last write
        m.kill9()
        m.start()
        for name, data in expected.items():
            assert m.path(name).read_bytes() == data, name
    wait_flat(m)
    assert set(flat_files(m)) == wanted(m)
    assert not list((m.cache / "flat").glob("*/*.tmp"))
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout


def test_off_makes_no_copies_and_removes_those_of_an_earlier_mount(mount_factory):
    states = train_series(4, torch.float32, width=512)
    m = mount_factory()
    for i, st in enumerate(states[:3]):
        torch.save(st, m.path(f"s{i}.pt"))
        m.wait_local(f"s{i}.pt")
    wait_flat(m)
    assert flat_files(m)
    m.umount()
    m.env["CKPTFS_INGEST_FLAT_NEWEST"] = "false"
    m.start()
    torch.save(states[3], m.path("s3.pt"))  # a new version of the layout: new newest chunks, deltas
    m.wait_local("s3.pt")
    wait_flat(m)
    time.sleep(3)
    assert wanted(m) and not (m.cache / "flat").exists()
    assert status(m)["cache"]["flat_copies"] == 0
    for i, st in enumerate(states):
        assert_state_equal(st, torch.load(m.path(f"s{i}.pt")))


def test_over_the_cap_flat_copies_go_first_and_are_not_made_again(mount_factory):
    states = train_series(3, torch.float32, width=512)
    m = mount_factory(env={"CKPTFS_UPLOAD_ENABLED": "false"})  # nothing is evictable: only copies can go
    for i, st in enumerate(states):
        torch.save(st, m.path(f"s{i}.pt"))
        m.wait_local(f"s{i}.pt")
    wait_flat(m)
    cache = status(m)["cache"]
    assert cache["flat_copies"] >= 3 and cache["flat_bytes"] > 0.1 * cache["file_bytes"], cache
    m.umount()
    # a cap the chunks fit under, but not the chunks and the copies; no room for a copy within 90 % of it
    cap = cache["file_bytes"] / 0.9 + 1000
    m.env["CKPTFS_CACHE_MAX_GB"] = str(cap / 1e9)
    m.start()
    deadline = time.monotonic() + 30
    while status(m)["cache"]["flat_copies"]:
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.2)
    time.sleep(3)  # several flattener and eviction passes
    st = status(m)
    assert st["cache"]["flat_copies"] == 0 and not flat_files(m), st
    assert st["cache"]["evicted_chunks"] == 0 and st["flatten_pending"] > 0, st
    assert "dropped the flat copies" in m.log()
    assert_state_equal(states[2], torch.load(m.path("s2.pt")))  # read along the chain
    assert status(m)["cache"]["flat_reads"] == 0


def test_after_a_remount_the_next_save_is_coded_against_the_newest_through_its_flat_copies(mount_factory):
    """A remount (or a recovery) starts with no decoded bases in memory: a deep newest chunk served as a
    base only if its chain were decoded, so the next save went back to the keyframes at the chains'
    roots (older, larger deltas). Its flat copy is its plain bytes at a raw read's cost: the base."""
    from tests.e2e.test_delta import deltas

    states = train_series(4, torch.float32, width=512)
    m = mount_factory()
    for i in range(3):
        torch.save(states[i], m.path(f"step_{i}.pt"))
        m.wait_local(f"step_{i}.pt")
    wait_flat(m)
    assert flat_files(m) and set(flat_files(m)) == wanted(m)
    m.umount()
    m.start()
    torch.save(states[3], m.path("step_3.pt"))
    m.wait_local("step_3.pt")
    v = versions(m)["step_3.pt"]
    assert v["base_path"] == "step_2.pt" and deltas(v) > 0, v
    assert v["max_depth"] == versions(m)["step_2.pt"]["max_depth"] + 1, v
    assert_state_equal(states[3], torch.load(m.path("step_3.pt")))
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout
