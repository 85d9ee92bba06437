"""Tiering through a real mount into a real store (a local directory, and SeaweedFS over S3): the bucket
alone holds every committed file and the namespace (renames, unlinks, directory moves, links);
uploads survive kill -9 and a store that goes away; ``flush`` and ``status`` tell the truth."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
import torch

from ckptfs.backend import LocalDirStore
from ckptfs.cache.store import SMALL_FRAME
from tests import bucket
from tests.helpers import make_state


def _store_for(kind, request, tmp_path):
    """(store URL, env for the daemon, a store object to inspect it with)."""
    if kind == "file":
        root = tmp_path / "objects"
        return f"file://{root}", {}, LocalDirStore(root)
    server = request.getfixturevalue("s3_server")
    name = server.new_bucket()
    return f"s3://{name}/ckpt", server.env(), bucket.s3_store(server, name, "ckpt")


def _save(path, state) -> bytes:
    torch.save(state, path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_the_bucket_alone_holds_every_file_and_the_namespace(kind, request, tmp_path, mount_factory):
    url, env, store = _store_for(kind, request, tmp_path)
    m = mount_factory(env=env, store=url)
    expected: dict[str, bytes] = {}
    m.path("run").mkdir()
    for step in (10, 20, 30):  # a series 10 optimizer steps apart: delta chains in the bucket
        expected[f"/run/step_{step:06d}.pt"] = _save(m.path("run", f"step_{step:06d}.pt"), make_state(steps=step))
    m.path("small.txt").write_bytes(b"tiny")
    expected["/small.txt"] = b"tiny"
    m.path("empty").write_bytes(b"")
    expected["/empty"] = b""
    blob = os.urandom(3 * 1024 * 1024)  # content-defined chunks
    m.path("blob.bin").write_bytes(blob)
    expected["/blob.bin"] = blob
    m.cli("flush", "--wait", "--timeout", "120", str(m.mnt))
    assert bucket.files(store) == expected

    # Namespace changes after the upload: a rename, a directory move, an unlink, a hard link, a
    # symlink, a chmod, an overwrite of an uploaded file.
    m.path("old").mkdir()
    os.rename(m.path("run", "step_000010.pt"), m.path("old", "step_000010.pt"))
    expected["/old/step_000010.pt"] = expected.pop("/run/step_000010.pt")
    os.rename(m.path("run"), m.path("runs"))
    for p in [p for p in expected if p.startswith("/run/")]:
        expected["/runs/" + p[len("/run/") :]] = expected.pop(p)
    os.unlink(m.path("blob.bin"))
    del expected["/blob.bin"]
    os.link(m.path("small.txt"), m.path("small-link.txt"))
    expected["/small-link.txt"] = b"tiny"
    os.symlink("runs/step_000030.pt", m.path("latest"))
    os.chmod(m.path("small.txt"), 0o600)
    expected["/runs/step_000020.pt"] = _save(m.path("runs", "step_000020.pt"), make_state(steps=25))
    m.cli("flush", "--wait", "--timeout", "120", str(m.mnt))
    for st in ("remote",):
        assert m.state("runs/step_000020.pt") == st
    view = bucket.view(store)
    assert bucket.files(store) == expected
    assert view["/latest"]["kind"] == "symlink" and view["/latest"]["target"] == "runs/step_000030.pt"
    assert view["/old"]["kind"] == "dir" and "/run" not in view
    assert stat.S_IMODE(view["/small.txt"]["mode"]) == 0o600
    # nothing was deleted from the bucket: the overwritten and unlinked versions' objects are all there
    m.umount()
    assert all(k.startswith(("packs/", "journal/", "ckptfs.json")) for k in store.list(""))


@pytest.mark.s3
def test_kill9_with_uploads_pending_then_the_queue_drains_after_a_remount(tmp_path, s3_server, mount_factory):
    name = s3_server.new_bucket()
    store = bucket.s3_store(s3_server, name)
    slow = {**s3_server.env(), "CKPTFS_UPLOAD_BANDWIDTH_MB": "0.2"}  # 4 MB files take ~20 s each
    m = mount_factory(env=slow, store=f"s3://{name}")
    expected = {}
    for i in range(3):
        data = os.urandom(4 * 1024 * 1024)
        m.path(f"f{i}.bin").write_bytes(data)
        expected[f"/f{i}.bin"] = data
    m.wait_local(*(f"f{i}.bin" for i in range(3)))
    assert {m.state(f"f{i}.bin") for i in range(3)} == {"local"}
    m.kill9()
    cache = m.cache
    m2 = mount_factory(env=s3_server.env(), cache=cache, store=f"s3://{name}")
    m2.cli("flush", "--wait", "--timeout", "120", str(m2.mnt))
    assert {m2.state(f"f{i}.bin") for i in range(3)} == {"remote"}
    assert bucket.files(store) == expected
    m2.umount()


@pytest.mark.s3
@pytest.mark.slow
def test_store_down_writes_go_on_then_uploads_resume_and_flush_names_what_is_missing(tmp_path, mount_factory):
    from tests.s3server import running_server

    server = running_server(tmp_path / "weed")
    try:
        name = server.new_bucket()
        env = {**server.env(), "CKPTFS_S3_RETRIES": "2", "CKPTFS_S3_TIMEOUT_S": "2"}
        m = mount_factory(env=env, store=f"s3://{name}")
        m.path("before.bin").write_bytes(b"b" * 100_000)
        m.cli("flush", "--wait", "--timeout", "60", str(m.mnt))
        server.stop()
        data = os.urandom(2 * 1024 * 1024)
        m.path("during.bin").write_bytes(data)  # the cache takes it; close() does not wait for the store
        m.wait_local("during.bin")
        assert m.path("during.bin").read_bytes() == data
        res = m.cli("flush", "--wait", "--timeout", "3", str(m.mnt), check=False)
        assert res.returncode == 2
        assert "/during.bin" in res.stderr and "not in the store yet" in res.stderr
        deadline = time.monotonic() + 30
        while True:  # the uploader has noticed and says so
            st = json.loads(m.cli("status", "--json", str(m.mnt)).stdout)
            if st["upload"]["last_error"]:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.5)
        assert st["upload"]["queued_versions"] == 1 and st["upload"]["oldest_pending_s"] > 0
        assert "failed 2 times" in st["upload"]["last_error"] or "cannot" in st["upload"]["last_error"]
        server.start()
        m.cli("flush", "--wait", "--timeout", "120", str(m.mnt))
        assert m.state("during.bin") == "remote"
        store = bucket.s3_store(server, name)
        assert bucket.files(store) == {"/before.bin": b"b" * 100_000, "/during.bin": data}
        m.expect_errors = True  # the outage was logged
        m.umount()
    finally:
        server.stop()


def test_status_reports_the_queue_and_the_socket_is_private(mount):
    mount.path("a.bin").write_bytes(os.urandom(1_000_000))
    mount.cli("flush", "--wait", "--timeout", "60", str(mount.mnt))
    st = json.loads(mount.cli("status", "--json", str(mount.mnt)).stdout)
    up = st["upload"]
    assert up["queued_versions"] == 0 and up["oldest_pending_s"] is None
    assert up["bytes_sent"] >= 1_000_000 and up["objects_sent"] >= 2  # the frame and a journal segment
    assert st["cache"]["chunk_bytes"] >= 1_000_000 and st["failsafe"] is None
    sock = mount.cache / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    text = mount.cli("status", str(mount.mnt)).stdout
    assert "0 versions queued" in text and "journal segment" in text


@pytest.mark.slow
def test_a_repack_after_upload_puts_new_frames_under_new_names_and_the_bucket_still_decodes(mount_factory, tmp_path):
    """Deleting the checkpoints a newer one was delta-coded against re-encodes its chunks (files/repack.py):
    the new frames go up under new names, the old objects stay, and the bucket alone reads it back."""
    import shutil

    from tests.e2e.test_delta import train_series
    from tests.e2e.test_repack import wait_repacked

    store = LocalDirStore(tmp_path / "objects")
    url = f"file://{tmp_path / 'objects'}"
    # no pcodec: it may turn deltas into keyframes, and then nothing would depend on the deleted files
    env = {"CKPTFS_INGEST_MAX_CHAIN": "4", "CKPTFS_INGEST_PCO_LEVEL": "0", "CKPTFS_INGEST_BASE_GRACE_S": "0"}
    m = mount_factory(store=url, env=env)
    states = train_series(4)
    for i, st in enumerate(states):
        torch.save(st, m.path(f"s{i}.pt"))
        m.cli("flush", "--wait", "--timeout", "60", str(m.path(f"s{i}.pt")))
    before = set(store.list("packs/"))
    last = m.path("s3.pt").read_bytes()
    assert "delta" in m.cli("ls-versions", str(m.path("s3.pt"))).stdout  # s3 depends on the others
    for i in range(3):
        os.unlink(m.path(f"s{i}.pt"))
    deadline = time.monotonic() + 90
    while "delta" in m.cli("ls-versions", str(m.path("s3.pt"))).stdout:  # repacked: its bases are gone
        assert time.monotonic() < deadline, m.cli("ls-versions", str(m.mnt)).stdout
        time.sleep(0.5)
    wait_repacked(m).close()
    m.cli("flush", "--wait", "--timeout", "60", str(m.mnt))
    while _status(m)["upload"]["chunks_not_in_store"] or bucket.view(store).keys() != {"/s3.pt"}:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    after = set(store.list("packs/"))
    assert before < after  # nothing is deleted from the bucket; the new frames went up in new packs
    ids = [cid for cid, *_ in bucket.frames(store)]
    assert len(ids) > len(set(ids))  # re-encoded chunks: one id, two frames — a new name, never an overwrite
    assert bucket.files(store) == {"/s3.pt": last}
    m.umount()
    shutil.rmtree(m.cache)
    n = mount_factory(store=url, cache=tmp_path / "new-node")
    assert n.path("s3.pt").read_bytes() == last
    n.umount()


def test_by_default_a_version_goes_up_after_its_compaction_and_once(mount_factory, tmp_path):
    """Without a flush, the uploader waits (upload.compact_wait_s) for pcodec compaction, so what goes up is
    the denser frame and nothing is uploaded twice."""
    from ckptfs.codec import parse_header
    from tests.e2e.test_delta import train_series

    store = LocalDirStore(tmp_path / "objects")
    m = mount_factory(store=f"file://{tmp_path / 'objects'}")
    (state,) = train_series(1, torch.bfloat16, width=768)  # trained bf16: pcodec beats byte planes + zstd
    expected = {"/m.pt": _save(m.path("m.pt"), state)}
    m.wait_remote("m.pt", timeout=120)
    frames = bucket.frames(store)
    ids = [cid for cid, *_ in frames]
    assert len(ids) == len(set(ids))  # each chunk went up once
    codecs = {int(parse_header(store.get(k, off, n)).codec) for _, k, off, n in frames}
    assert codecs & {5, 6}, codecs  # pcodec frames: compacted before the upload
    assert bucket.files(store) == expected
    m.umount()


def _node_a_series(m) -> tuple[dict[str, bytes], dict[str, dict]]:
    """A checkpoint series with the namespace changes a training job makes; returns (bytes, states)."""
    expected: dict[str, bytes] = {}
    states = {}
    m.path("run7").mkdir()
    for step in (10, 20, 30, 40):
        states[f"/run7/step_{step:06d}.pt"] = make_state(steps=step)
        expected[f"/run7/step_{step:06d}.pt"] = _save(
            m.path("run7", f"step_{step:06d}.pt"), states[f"/run7/step_{step:06d}.pt"]
        )
    os.unlink(m.path("run7", "step_000010.pt"))  # rotation
    del expected["/run7/step_000010.pt"]
    torch.save(states["/run7/step_000040.pt"], m.path("run7", "tmp.pt"))
    os.replace(m.path("run7", "tmp.pt"), m.path("run7", "latest.pt"))
    expected["/run7/latest.pt"] = m.path("run7", "latest.pt").read_bytes()
    states["/run7/latest.pt"] = states["/run7/step_000040.pt"]
    m.path("run7", "meta").mkdir()
    m.path("run7", "meta", "args.json").write_text('{"lr": 0.001}')
    expected["/run7/meta/args.json"] = b'{"lr": 0.001}'
    os.symlink("step_000040.pt", m.path("run7", "last"))
    return expected, states


@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_new_node_with_an_empty_cache_recovers_everything_from_the_bucket(kind, request, tmp_path, mount_factory):
    import shutil

    from tests.helpers import assert_state_equal

    url, env, store = _store_for(kind, request, tmp_path)
    a = mount_factory(env={**env, "CKPTFS_NODE_ID": "node-a"}, store=url)
    expected, states = _node_a_series(a)
    a.cli("flush", "--wait", "--timeout", "120", str(a.mnt))
    a.kill9()  # node A dies; its cache dies with it
    shutil.rmtree(a.cache)

    b = mount_factory(env={**env, "CKPTFS_NODE_ID": "node-b"}, store=url)
    assert "recovered from the store: 5 files" in b.log()
    got = {}
    for dirpath, _dirs, names in os.walk(b.mnt):
        for name in names:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                got["/" + os.path.relpath(p, b.mnt)] = open(p, "rb").read()
    assert got == expected
    assert os.readlink(b.path("run7", "last")) == "step_000040.pt"
    for path, state in states.items():
        if path in expected:
            assert_state_equal(state, torch.load(b.path(path.lstrip("/"))))
    assert b.state("run7/step_000020.pt") == "remote"
    # node B goes on training: a new checkpoint and another rotation, published by B's own journal
    expected["/run7/step_000050.pt"] = _save(b.path("run7", "step_000050.pt"), make_state(steps=50))
    os.unlink(b.path("run7", "step_000020.pt"))
    del expected["/run7/step_000020.pt"]
    b.cli("flush", "--wait", "--timeout", "120", str(b.mnt))
    b.umount()
    res = b.cli("fsck", "--cache", str(b.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout
    assert bucket.files(store) == expected

    # a third node, recovered explicitly with `ckptfs recover`, sees A's and B's files
    c_cache = tmp_path / "node-c-cache"
    c = mount_factory(env={**env, "CKPTFS_NODE_ID": "node-c"}, store=url, cache=c_cache, start=False)
    res = c.cli("recover", "--cache", str(c_cache), "--store", url)
    assert "recovered 5 files" in res.stdout, res.stdout
    c.start()
    assert sorted(p.name for p in c.path("run7").iterdir()) == sorted(
        ["step_000030.pt", "step_000040.pt", "step_000050.pt", "latest.pt", "meta", "last"]
    )
    res = c.cli("warmup", str(c.mnt))
    assert "warmup: 5 files" in res.stdout, res.stdout
    for path, data in expected.items():
        assert c.path(path.lstrip("/")).read_bytes() == data
    c.umount()


def test_corrupt_local_frame_heals_from_the_store_and_a_corrupt_remote_one_is_eio(mount_factory, tmp_path):
    import shutil

    from tests.helpers import flip_stored_byte

    store_dir = tmp_path / "objects"
    m = mount_factory(store=f"file://{store_dir}")
    data = os.urandom(3 << 20)
    m.path("ck.bin").write_bytes(data)
    m.cli("flush", "--wait", "--timeout", "60", str(m.mnt))
    m.umount()
    files = sorted(p for p in (m.cache / "chunks").rglob("*") if p.is_file())
    cid = bytes.fromhex(files[0].name)
    flip_stored_byte(m.cache, cid, pos=len(files[0].read_bytes()) // 2)
    m.expect_errors = True  # the corruption is logged
    m.start()
    assert m.path("ck.bin").read_bytes() == data
    assert "healed from the store" in m.log()
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout  # the local copy was rewritten

    # now the store's copy is corrupt and a new node has no local one: EIO, never wrong bytes
    _, key, off, n = next(f for f in bucket.frames(LocalDirStore(store_dir)) if f[0] == cid.hex())
    obj = store_dir / key
    raw = bytearray(obj.read_bytes())
    raw[off + n // 2] ^= 0x10
    obj.write_bytes(bytes(raw))
    shutil.rmtree(m.cache)
    n = mount_factory(store=f"file://{store_dir}", cache=tmp_path / "new-cache")
    n.expect_errors = True
    with pytest.raises(OSError) as e:
        n.path("ck.bin").read_bytes()
    assert e.value.errno == 5  # EIO
    assert "corrupt chunk" in n.log()
    n.umount()


@pytest.mark.s3
def test_uploads_go_through_a_store_that_answers_503_and_resets_connections(s3_server, mount_factory):
    from tests.faultproxy import FaultProxy, Plan

    proxy = FaultProxy(s3_server.ports["s3.port"])
    try:
        name = s3_server.new_bucket()
        env = {**s3_server.env(), "AWS_ENDPOINT_URL_S3": proxy.endpoint, "CKPTFS_S3_TIMEOUT_S": "5"}
        m = mount_factory(env=env, store=f"s3://{name}")
        proxy.plan = Plan(every=3, kind="mixed")  # a third of all requests: SlowDown or a reset
        expected = {}
        for step in (10, 20, 30):
            expected[f"/s{step}.pt"] = _save(m.path(f"s{step}.pt"), make_state(width=384, steps=step))
            m.cli("flush", "--wait", "--timeout", "180", str(m.mnt))
        assert proxy.faults["503"] > 0 and proxy.faults["reset"] > 0
        proxy.plan = Plan()
        assert bucket.files(bucket.s3_store(s3_server, name)) == expected
        m.umount()
    finally:
        proxy.close()


def _status(m) -> dict:
    return json.loads(m.cli("status", "--json", str(m.mnt)).stdout)


def test_the_cache_cap_holds_under_a_series_larger_than_the_cap(mount_factory, tmp_path):
    cap = 30_000_000
    m = mount_factory(env={"CKPTFS_CACHE_MAX_GB": str(cap / 1e9)}, store=f"file://{tmp_path / 'objects'}")
    expected = {}
    for i in range(6):  # 60 MB of incompressible checkpoints, twice the cap
        data = os.urandom(10_000_000)
        m.path(f"ck{i}.bin").write_bytes(data)
        expected[f"ck{i}.bin"] = data
        m.cli("flush", "--wait", "--timeout", "60", str(m.path(f"ck{i}.bin")))
    deadline = time.monotonic() + 30
    while _status(m)["cache"]["file_bytes"] > cap:
        assert time.monotonic() < deadline, _status(m)
        time.sleep(0.5)
    st = _status(m)["cache"]
    assert st["evicted_chunks"] > 0 and st["cap_bytes"] == cap
    res = m.cli("fsck", "--cache", str(m.cache), check=False)  # read-only, beside the daemon
    assert " 0 problems" in res.stdout and "only in the store" in res.stdout, res.stdout
    for name, data in expected.items():  # evicted chunks come back from the store
        assert m.path(name).read_bytes() == data
    assert _status(m)["cache"]["fetched_from_store"] > 0
    m.umount()


def test_nothing_that_is_only_local_is_evicted(mount_factory):
    m = mount_factory(env={"CKPTFS_CACHE_MAX_GB": "0.01", "CKPTFS_UPLOAD_ENABLED": "false"})
    expected = {}
    for i in range(3):
        expected[f"ck{i}.bin"] = os.urandom(8_000_000)
        m.path(f"ck{i}.bin").write_bytes(expected[f"ck{i}.bin"])
    m.wait_local(*expected)
    time.sleep(3)  # several eviction passes over the cap
    st = _status(m)["cache"]
    # (a piece of up to SMALL_FRAME bytes at a file's end may be a row of meta.db, not a file)
    assert st["evicted_chunks"] == 0 and st["file_bytes"] >= 24_000_000 - 3 * SMALL_FRAME
    m.umount()
    m.start()
    for name, data in expected.items():
        assert m.path(name).read_bytes() == data
    m.umount()


def test_cold_reads_with_read_ahead_are_bit_exact_at_any_offset(mount_factory, tmp_path):
    import random
    import shutil

    store = f"file://{tmp_path / 'objects'}"
    a = mount_factory(store=store)
    expected = {}
    for step in (10, 20, 30, 40, 50):  # a delta chain of depth 4 at the newest
        expected[f"s{step}.pt"] = _save(a.path(f"s{step}.pt"), make_state(width=512, layers=6, steps=step))
    a.cli("flush", "--wait", "--timeout", "120", str(a.mnt))
    a.umount()
    shutil.rmtree(a.cache)
    b = mount_factory(store=store, cache=tmp_path / "cold-cache")
    with open(b.path("s50.pt"), "rb") as f:  # sequential, in the kernel's request sizes
        assert f.read() == expected["s50.pt"]
    st = _status(b)["cache"]
    assert st["decoded_ahead"] > 0 and st["fetched_ahead"] > 0, st
    rng = random.Random(7)
    for name in ("s30.pt", "s40.pt"):
        data = expected[name]
        fd = os.open(b.path(name), os.O_RDONLY)
        try:
            for _ in range(60):
                off = rng.randrange(0, len(data))
                n = rng.choice([1, 4096, 131072, 1 << 20, 5 << 20])
                assert os.pread(fd, n, off) == data[off : off + n]
        finally:
            os.close(fd)
    b.umount()
    b.start()  # and once more with what the reads kept in the cache
    for name, data in expected.items():
        assert b.path(name).read_bytes() == data
    b.umount()


def _wait_for(what, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_mounts_on_one_bucket_see_each_others_files(kind, request, tmp_path, mount_factory):
    url, env, store = _store_for(kind, request, tmp_path)
    fast = {**env, "CKPTFS_NODE_REFRESH_S": "0.5"}
    a = mount_factory(env={**fast, "CKPTFS_NODE_ID": "node-a"}, store=url)
    b = mount_factory(env={**fast, "CKPTFS_NODE_ID": "node-b"}, store=url)
    a.path("run").mkdir()
    b.path("run").mkdir()  # both make the directory: it merges
    r0 = _save(a.path("run", "rank0.pt"), make_state(seed=0, steps=2))
    r1 = _save(b.path("run", "rank1.pt"), make_state(seed=1, steps=2))
    a.cli("flush", "--wait", "--timeout", "60", str(a.mnt))
    b.cli("flush", "--wait", "--timeout", "60", str(b.mnt))
    for m in (a, b):  # two ranks writing distinct files into one directory: both appear everywhere
        _wait_for("both ranks' files", lambda m=m: sorted(os.listdir(m.path("run"))) == ["rank0.pt", "rank1.pt"])
        assert m.path("run", "rank0.pt").read_bytes() == r0
        assert m.path("run", "rank1.pt").read_bytes() == r1
    assert b.state("run/rank0.pt") == "remote"

    # last writer wins per path: B overwrites A's file, A sees B's bytes
    a.path("run", "shared.txt").write_bytes(b"from a")
    a.cli("flush", "--wait", "--timeout", "60", str(a.mnt))
    _wait_for("a's shared.txt on b", lambda: b.path("run", "shared.txt").read_bytes() == b"from a")
    b.path("run", "shared.txt").write_bytes(b"from b, later")
    b.cli("flush", "--wait", "--timeout", "60", str(b.mnt))
    _wait_for("b's shared.txt on a", lambda: a.path("run", "shared.txt").read_bytes() == b"from b, later")

    # a delete and a rename on one node show on the other
    os.unlink(a.path("run", "rank1.pt"))
    os.rename(a.path("run", "rank0.pt"), a.path("run", "final.pt"))
    a.cli("flush", "--wait", "--timeout", "60", str(a.mnt))
    _wait_for("the rename and the delete on b", lambda: sorted(os.listdir(b.path("run"))) == ["final.pt", "shared.txt"])
    assert b.path("run", "final.pt").read_bytes() == r0
    for m in (a, b):
        m.umount()
    assert bucket.files(store) == {"/run/final.pt": r0, "/run/shared.txt": b"from b, later"}
    for m in (a, b):
        res = m.cli("fsck", "--cache", str(m.cache), check=False)
        assert " 0 problems" in res.stdout, res.stdout


@pytest.mark.s3
def test_fsync_can_wait_for_the_store_and_fails_with_eio_when_it_does_not_answer(s3_server, mount_factory):
    import errno

    from tests.faultproxy import FaultProxy, Plan

    proxy = FaultProxy(s3_server.ports["s3.port"])
    try:
        name = s3_server.new_bucket()
        env = {
            **s3_server.env(),
            "AWS_ENDPOINT_URL_S3": proxy.endpoint,
            "CKPTFS_UPLOAD_FSYNC_REMOTE": "true",
            "CKPTFS_UPLOAD_FSYNC_TIMEOUT_S": "4",
            "CKPTFS_S3_RETRIES": "2",
        }
        m = mount_factory(env=env, store=f"s3://{name}")
        m.path("a.bin").write_bytes(os.urandom(1 << 20))
        fd = os.open(m.path("a.bin"), os.O_RDONLY)  # fsync after close: the idiom for "make it durable"
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        assert m.state("a.bin") == "remote"  # fsync returned only once it was in the store
        with open(m.path("b.bin"), "wb") as f:  # open for writing: fsync returns at local durability
            f.write(b"x" * 1000)
            f.flush()
            os.fsync(f.fileno())
        proxy.plan = Plan(every=1, kind="503")  # the store stops answering
        m.path("c.bin").write_bytes(os.urandom(1 << 20))
        fd = os.open(m.path("c.bin"), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert m.path("c.bin").stat().st_size == 1 << 20  # nothing lost: it is in the cache, uploaded later
        proxy.plan = Plan()
        m.cli("flush", "--wait", "--timeout", "60", str(m.mnt))
        m.expect_errors = True
        m.umount()
    finally:
        proxy.close()


def test_a_rename_before_the_new_version_is_up_keeps_the_old_path_in_the_bucket(mount_factory, tmp_path):
    """Publishing the old path's tombstone before the new path could be published would leave the bucket
    with the file under no name at all: a node lost then would lose it. The new version here waits for
    compaction (upload.compact_wait_s) while other namespace changes are published."""
    store = LocalDirStore(tmp_path / "objects")
    m = mount_factory(store=f"file://{tmp_path / 'objects'}", env={"CKPTFS_UPLOAD_COMPACT_WAIT_S": "60"})
    v1, v2 = os.urandom(300_000), os.urandom(300_000)
    m.path("a.bin").write_bytes(v1)
    m.cli("flush", "--wait", "--timeout", "60", str(m.mnt))
    m.path("a.bin").write_bytes(v2)
    m.wait_local("a.bin")
    os.rename(m.path("a.bin"), m.path("b.bin"))
    m.path("x").mkdir()  # a change that is published at once
    _wait_for("the directory in the bucket", lambda: "/x" in bucket.view(store))
    files = bucket.files(store)
    assert files.get("/a.bin") == v1 or files.get("/b.bin") == v2, files  # never under no name
    m.cli("flush", "--wait", "--timeout", "60", str(m.mnt))
    assert bucket.files(store) == {"/b.bin": v2}
    m.umount()


def test_the_control_socket_survives_junk_and_clients_that_go_away(mount):
    import socket as sk

    mount.path("a.bin").write_bytes(os.urandom(2 << 20))
    mount.cli("flush", "--wait", "--timeout", "60", str(mount.mnt))
    sock_path = str(mount.cache / "control.sock")
    for payload in (b"not json\n", b"[1, 2]\n", b'{"op": "nope"}\n', b'{"op": "warmup", "paths": [""]}\n'):
        with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
            s.connect(sock_path)
            s.sendall(payload)  # and go away without reading the answer
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(b"[1]\n")
        assert b"bad request" in s.recv(4096)
    st = _status(mount)  # the daemon is still there and answers
    assert st["failsafe"] is None
    assert mount.path("a.bin").stat().st_size == 2 << 20


def test_a_recovered_node_codes_the_next_save_against_the_bucket_and_keeps_flat_copies(tmp_path, mount_factory):
    """The journal publishes each version's layout signature and slots: a node that recovers the series
    rebuilds the slot index from it, so its first save of that model is stored as deltas against the
    newest checkpoint in the bucket (not keyframes), and its flattener makes the newest one's flat copies."""
    import shutil

    from tests.e2e.test_delta import deltas, train_series, versions
    from tests.e2e.test_flatten import flat_files, wait_flat, wanted
    from tests.helpers import assert_state_equal

    store = f"file://{tmp_path / 'objects'}"
    states = train_series(4, torch.float32, width=512)
    a = mount_factory(store=store)
    for i in range(3):
        torch.save(states[i], a.path(f"step_{i}.pt"))
        a.wait_local(f"step_{i}.pt")
    a.cli("flush", "--wait", "--timeout", "120", str(a.mnt))
    a.umount()
    shutil.rmtree(a.cache)

    b = mount_factory(store=store, cache=tmp_path / "node-b-cache")
    wait_flat(b)
    assert wanted(b), "the recovered slot index names no delta of the newest checkpoint"
    assert set(flat_files(b)) == wanted(b)
    torch.save(states[3], b.path("step_3.pt"))
    b.wait_local("step_3.pt")
    v = versions(b)["step_3.pt"]
    # (against the newest's chunks, or the keyframes at their roots when those are not decoded at hand)
    assert v["base_path"] in ("step_0.pt", "step_1.pt", "step_2.pt") and deltas(v) > 0, v
    b.umount()
    res = b.cli("fsck", "--cache", str(b.cache), "--verify-data", check=False)
    assert " 0 problems" in res.stdout, res.stdout
    b.start()
    for i in range(4):
        assert_state_equal(states[i], torch.load(b.path(f"step_{i}.pt")))
    b.umount()
