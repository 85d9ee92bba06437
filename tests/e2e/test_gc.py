"""``ckptfs gc`` against stores a real mount writes: it deletes only packs no live file names, a grace
period after marking them; a writer that dedups onto a marked pack, or that was stalled past the grace
with its packs up and its segment not, puts the frames up again under new names; the bucket alone
still reads every file bit-exact afterwards."""

from __future__ import annotations

import os
import time

import pytest

from ckptfs.backend import LocalDirStore
from tests import bucket

GRACE = 2.0
ENV = {"CKPTFS_NODE_GC_VIEW_S": "0.5"}  # writers re-read gc records this often (the grace must be >= 2x)


def _gc(m, url: str, *extra: str) -> str:
    return m.cli("gc", "--store", url, "--grace", f"{GRACE}s", *extra).stdout


def _packs(n: int) -> str:
    return f"{n} pack" if n == 1 else f"{n} packs"


def _flush(m) -> None:
    m.cli("flush", "--wait", "--timeout", "120", str(m.mnt))


def _named(store) -> set[str]:
    """Every object the bucket's live journal events name."""
    return {c[0] for ev in bucket.view(store).values() if ev["kind"] == "file" for c in ev["chunks"].values()}


def test_gc_sweeps_only_what_no_file_names_a_grace_after_marking_it(mount_factory, tmp_path):
    url = f"file://{tmp_path / 'objects'}"
    store = LocalDirStore(tmp_path / "objects")
    m = mount_factory(env=ENV, store=url)
    blobs = {name: os.urandom(3 * 1024 * 1024) for name in ("a", "b", "c")}
    for name, data in blobs.items():  # one flush each: each file's frames in packs of their own
        m.path(name).write_bytes(data)
        _flush(m)
    os.unlink(m.path("a"))
    m.path("b").write_bytes(blobs["c"][:1024 * 1024] + os.urandom(1024 * 1024))  # partly deduped
    _flush(m)
    expected = {"/b": m.path("b").read_bytes(), "/c": blobs["c"]}
    packs = set(store.list("packs/"))
    live = _named(store)
    dead = packs - live
    assert dead and live, (packs, live)

    out = m.cli("gc", "--store", url, "--grace", "1h").stdout
    assert "swept 0 packs" in out and "marked 0" in out and f"{len(dead)} too young" in out, out
    time.sleep(GRACE + 0.5)
    records = list(store.list("gc/"))
    out = _gc(m, url, "--dry-run")
    assert "would sweep 0 packs" in out and f"marked {len(dead)}" in out, out
    assert list(store.list("gc/")) == records
    out = _gc(m, url)
    assert f"marked {len(dead)} " in out, out
    assert set(store.list("packs/")) == packs  # a mark deletes nothing
    assert bucket.files(store) == expected
    time.sleep(GRACE + 0.5)
    out = _gc(m, url)
    assert f"swept {_packs(len(dead))}" in out, out
    assert set(store.list("packs/")) == live
    assert bucket.files(store) == expected  # from the bucket alone
    for rel, data in expected.items():
        assert m.path(rel.lstrip("/")).read_bytes() == data
    m.umount()

    # a new node with an empty cache reads everything from what is left
    n = mount_factory(env={**ENV, "CKPTFS_NODE_ID": "node-n"}, store=url)
    for rel, data in expected.items():
        assert n.path(rel.lstrip("/")).read_bytes() == data
    n.umount()


def test_a_writer_that_dedups_onto_a_marked_pack_puts_its_frames_up_again(mount_factory, tmp_path):
    """An open file keeps an unlinked version (and its chunk rows) alive on the node while the bucket's
    journal no longer names it: its packs get marked. A new file with the same bytes dedups onto those
    rows; what the node publishes must not name the marked packs, or the sweep would delete them."""
    url = f"file://{tmp_path / 'objects'}"
    store = LocalDirStore(tmp_path / "objects")
    m = mount_factory(env={**ENV, "CKPTFS_CACHE_MAX_GB": "0.001"}, store=url)  # evict what is up
    data = os.urandom(4 * 1024 * 1024)
    m.path("a").write_bytes(data)
    _flush(m)
    first = set(store.list("packs/"))
    with open(m.path("a"), "rb") as held:
        os.unlink(m.path("a"))
        _flush(m)
        time.sleep(GRACE + 0.5)
        assert f"marked {len(first)} " in _gc(m, url)
        time.sleep(1.0)  # the node's view of the gc records is at most 0.5 s old from here on
        m.path("b").write_bytes(data)  # the same chunks
        _flush(m)
        named = _named(store)
        assert named and not named & first, (named, first)
        assert held.read() == data
    time.sleep(GRACE + 0.5)
    assert f"swept {_packs(len(first))}" in _gc(m, url)
    assert not set(store.list("packs/")) & first
    assert bucket.files(store) == {"/b": data}
    assert m.path("b").read_bytes() == data
    assert "go up again under new names" in m.log()
    m.umount()


@pytest.mark.s3
def test_a_writer_stalled_past_the_grace_puts_its_marked_packs_up_again(s3_server, mount_factory):
    """Packs up, the journal segment that names them not (every journal put fails): a gc meanwhile sees
    packs nothing names, older than the grace, and marks them. When the writer can publish again it
    must not name them."""
    from tests.faultproxy import FaultProxy, Plan

    proxy = FaultProxy(s3_server.ports["s3.port"])
    try:
        name = s3_server.new_bucket()
        url = f"s3://{name}"
        store = bucket.s3_store(s3_server, name)
        env = {**s3_server.env(), **ENV, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "CKPTFS_S3_RETRIES": "1"}
        m = mount_factory(env=env, store=url)
        proxy.plan = Plan(every=1, only=b"/journal/")  # every journal put: 503 SlowDown
        data = os.urandom(3 * 1024 * 1024)
        m.path("s").write_bytes(data)
        deadline = time.monotonic() + 60
        while not list(store.list("packs/")):
            assert time.monotonic() < deadline, m.log()
            time.sleep(0.1)
        time.sleep(0.5)  # (every pack of the round)
        stalled = set(store.list("packs/"))
        time.sleep(GRACE + 0.5)
        m.env = {**m.env, **s3_server.env()}  # the gc talks to the server directly (the daemon has its env)
        assert f"marked {len(stalled)} " in _gc(m, url)
        assert proxy.faults["503"] > 0
        # A round whose view predates the mark may still name the packs (and a sweep would revive them);
        # from 0.5 s after it (node.gc_view_s) no round may.
        time.sleep(1.0)
        proxy.plan = Plan()
        _flush(m)
        named = _named(store)
        assert named and not named & stalled, (named, stalled)
        time.sleep(GRACE + 0.5)
        assert f"swept {_packs(len(stalled))}" in _gc(m, url)
        assert bucket.files(store) == {"/s": data}
        m.umount()
    finally:
        proxy.close()


def test_a_node_that_was_down_while_gc_compacted_the_journal_catches_up_from_the_snapshot(mount_factory, tmp_path):
    import json

    url = f"file://{tmp_path / 'objects'}"
    store = LocalDirStore(tmp_path / "objects")
    b = mount_factory(env={**ENV, "CKPTFS_NODE_ID": "node-b"}, store=url)
    b.path("from-b").write_bytes(b"b's file")
    _flush(b)
    b.umount()  # node B is down (its cache kept) while node A writes and a gc compacts twice
    a = mount_factory(env={**ENV, "CKPTFS_NODE_ID": "node-a"}, store=url)
    expected = {"from-b": b"b's file"}
    for i in range(3):
        expected[f"a{i}"] = os.urandom(200_000 + i)
        a.path(f"a{i}").write_bytes(expected[f"a{i}"])
        _flush(a)
    os.unlink(a.path("a0"))
    del expected["a0"]
    _flush(a)
    segments = set(store.list("journal/"))
    first = json.loads(_gc(a, url, "--json"))
    time.sleep(GRACE + 0.5)
    second = json.loads(_gc(a, url, "--json"))
    assert first["segments_deleted"] == 0 and second["segments_deleted"] == len(segments)
    assert not set(store.list("journal/")) & segments
    assert {p.lstrip("/"): d for p, d in bucket.files(store).items()} == expected
    a.umount()

    b.start()
    deadline = time.monotonic() + 30
    while sorted(os.listdir(b.mnt)) != sorted(expected):
        assert time.monotonic() < deadline, (os.listdir(b.mnt), b.log())
        time.sleep(0.2)
    for name, data in expected.items():
        assert b.path(name).read_bytes() == data
    b.umount()
