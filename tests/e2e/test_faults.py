"""Faults: a full cache disk, a corrupt chunk. Clear errors, nothing committed is lost."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.helpers import digest, flip_stored_byte, make_state


@pytest.fixture
def small_cache(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the cache disk")
    path = tmp_path / "smallcache"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_full_cache_disk_gives_enospc_and_keeps_committed_files(mount_factory, small_cache, tmp_path):
    m = mount_factory(cache=small_cache, env={"CKPTFS_CACHE_RESERVE_MB": "2"})
    m.expect_errors = True
    kept = {}
    for i in range(3):
        data = os.urandom(6 << 20)
        m.path(f"ok{i}.bin").write_bytes(data)
        kept[f"ok{i}.bin"] = data
    m.wait_local(*kept)
    with pytest.raises(OSError) as e:
        for i in range(100):
            m.path(f"fill{i}.bin").write_bytes(os.urandom(4 << 20))
    assert e.value.errno == errno.ENOSPC
    # The mount keeps serving reads and metadata operations.
    for name, data in kept.items():
        assert m.path(name).read_bytes() == data
    assert "ok0.bin" in os.listdir(m.mnt)
    # Deleting files frees room; writing works again.
    for name in os.listdir(m.mnt):
        if name.startswith("fill"):
            os.unlink(m.path(name))
    fresh = os.urandom(3 << 20)
    m.path("after.bin").write_bytes(fresh)
    m.wait_local("after.bin", *kept)
    m.umount()
    m.start()
    for name, data in {**kept, "after.bin": fresh}.items():
        assert m.path(name).read_bytes() == data
    m.umount()


def _chunk_files(cache):
    return sorted(p for p in (cache / "chunks").rglob("*") if p.is_file())


NO_UPLOAD = {"CKPTFS_UPLOAD_ENABLED": "false"}  # the cache's copy is the only one: nothing to heal from


def test_flipped_byte_in_stored_chunk_gives_eio(mount_factory):
    m = mount_factory(env=NO_UPLOAD)
    m.expect_errors = True
    data = os.urandom(2 << 20)  # incompressible: stored raw, one CDC chunk region at least
    m.path("victim.bin").write_bytes(data)
    m.wait_local("victim.bin")
    m.umount()
    chunks = _chunk_files(m.cache)
    assert chunks
    victim = chunks[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    m.start()
    with pytest.raises(OSError) as e:
        m.path("victim.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert "corrupt chunk" in m.log()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert res.returncode == 1 and "corrupt" in res.stdout
    m.umount()


def test_flipped_byte_in_a_small_frame_gives_eio(mount_factory):
    """Small frames (zip headers, small records) live in meta.db: corrupting one is caught the same way."""
    import sqlite3

    import torch

    m = mount_factory(env=NO_UPLOAD)
    m.expect_errors = True
    torch.save(make_state(3), m.path("ck.pt"))
    m.wait_local("ck.pt")
    m.umount()
    db = sqlite3.connect(m.cache / "meta.db")
    small = [bytes(r[0]) for r in db.execute("SELECT chunk FROM frames WHERE length(frame) > 64")]
    db.close()
    assert len(small) > 4  # a torch.save file has many
    flip_stored_byte(m.cache, small[len(small) // 2], pos=60)  # in the payload, past the 48-byte header
    m.start()
    with pytest.raises(OSError) as e:
        m.path("ck.pt").read_bytes()
    assert e.value.errno == errno.EIO
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert res.returncode == 1 and "corrupt" in res.stdout
    m.umount()


def test_committed_files_survive_unmount_remount_many_times(mount_factory):
    m = mount_factory()
    files = {}
    for round_ in range(3):
        for i in range(3):
            data = os.urandom(1000 * (round_ + 1) * (i + 1))
            m.path(f"r{round_}_{i}").write_bytes(data)
            files[f"r{round_}_{i}"] = data
        m.umount()
        m.start()
        for name, data in files.items():
            assert m.path(name).read_bytes() == data
    assert digest(m.path("r0_0")) == digest(m.path("r0_0"))
    m.umount()


def test_a_missing_chunk_answers_eio_not_enoent(mount_factory):
    """A resume loop reads ENOENT as "no checkpoint here": a lost chunk must be EIO."""
    m = mount_factory(env=NO_UPLOAD)
    m.expect_errors = True
    data = os.urandom(3 << 20)
    m.path("ck.bin").write_bytes(data)
    m.wait_local("ck.bin")
    m.umount()
    victim = _chunk_files(m.cache)[0]
    victim.unlink()
    m.start()
    assert m.path("ck.bin").exists() and os.stat(m.path("ck.bin")).st_size == len(data)
    with pytest.raises(OSError) as e:
        m.path("ck.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert "missing from the local cache" in m.log()
    res = m.cli("fsck", "--cache", str(m.cache), check=False)
    assert res.returncode == 1 and "missing" in res.stdout
    m.umount()
