"""The read path as the kernel sees it: large read requests (the mount's read-ahead), and the page cache
kept across opens and across the staged -> local switch, yet never serving the old bytes of a path that
got new ones (through this mount or from another node)."""

from __future__ import annotations

import json
import os
import time

import pytest

from ckptfs.backend import LocalDirStore
from tests import bucket

MiB = 1024 * 1024


def _reads(m) -> int:
    st = json.loads(m.cli("status", "--json", str(m.mnt)).stdout)
    return int(st["cache"]["read_requests"])


def _uncache(path) -> None:
    """Drop this file's pages from the kernel's page cache (only this file: other tests run beside)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="the mount's read-ahead is set in sysfs, which needs root")
def test_a_sequential_read_goes_in_requests_of_a_mebibyte(mount_factory):
    m = mount_factory()
    data = os.urandom(16 * MiB)
    m.path("big").write_bytes(data)
    m.wait_local("big")
    from ckptfs.fuse.readahead import bdi_path

    assert open(bdi_path(str(m.mnt))).read().strip() == "4096"
    _uncache(m.path("big"))
    before = _reads(m)
    with open(m.path("big"), "rb", buffering=0) as f:
        assert f.read() == data
    requests = _reads(m) - before
    assert 0 < requests <= 16 + 4, requests  # 128 with the kernel's default read-ahead
    m.umount()

    off = mount_factory(env={"CKPTFS_MOUNT_READ_AHEAD_KB": "0"}, cache=m.cache, store=m.store_url)
    _uncache(off.path("big"))
    before = _reads(off)
    assert off.path("big").read_bytes() == data
    assert _reads(off) - before >= 100  # the kernel's 128 KiB: what the setting is for
    off.umount()


def test_the_page_cache_keeps_a_file_across_opens_and_the_switch_to_local(mount_factory):
    m = mount_factory(env={"CKPTFS_CACHE_DURABLE_AFTER_S": "60"})
    data = os.urandom(8 * MiB)
    with open(m.path("f"), "wb") as f:
        f.write(data)
    assert m.path("f").read_bytes() == data  # staged: read from the staging file, now in the page cache
    m.wait_local("f")
    before = _reads(m)
    for _ in range(3):
        assert m.path("f").read_bytes() == data
    assert _reads(m) == before  # every byte from the page cache: no request reached the daemon
    m.umount()


def _resident_pages(path) -> int:
    """How many of the file's pages are in the kernel's page cache: mincore(2) of a read-only mapping
    (which faults nothing in)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            if libc.mincore(addr, size, vec):
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_only_save_does_not_fill_the_mounts_page_cache(mount_factory, direct):
    """mount.direct_writes: torch.save's "wb" writes reach the daemon straight from the writer's pages, so
    a checkpoint is not held twice in memory (the mount's pages and the staging file's). Read-write
    opens keep going through the page cache (a direct-io file cannot be mmap()ed shared)."""
    m = mount_factory(env={"CKPTFS_MOUNT_DIRECT_WRITES": str(direct).lower()})
    data = os.urandom(4 * MiB)
    pages = len(data) // os.sysconf("SC_PAGE_SIZE")
    with open(m.path("f"), "wb") as f:
        f.write(data)
        f.flush()
        assert _resident_pages(m.path("f")) == (0 if direct else pages)
    assert m.path("f").read_bytes() == data
    with open(m.path("g"), "w+b") as f:
        f.write(data)
        f.flush()
        assert _resident_pages(m.path("g")) == pages
    assert m.path("g").read_bytes() == data
    m.umount()


def test_a_rewritten_path_never_serves_the_old_bytes(mount_factory, tmp_path):
    url = f"file://{tmp_path / 'objects'}"
    a = mount_factory(store=url, env={"CKPTFS_NODE_ID": "node-a"})
    b = mount_factory(store=url, env={"CKPTFS_NODE_ID": "node-b"})
    versions = [os.urandom(3 * MiB + i) for i in range(6)]

    def cached(data: bytes) -> None:  # read it on node A, so its pages are in A's page cache
        assert a.path("ckpt.pt").read_bytes() == data

    a.path("ckpt.pt").write_bytes(versions[0])
    a.wait_local("ckpt.pt")
    cached(versions[0])
    with open(a.path("ckpt.pt"), "wb") as f:  # O_TRUNC and a new version
        f.write(versions[1])
    cached(versions[1])
    a.wait_local("ckpt.pt")
    cached(versions[1])
    a.path("tmp").write_bytes(versions[2])  # tmp + rename over it
    os.replace(a.path("tmp"), a.path("ckpt.pt"))
    cached(versions[2])
    a.wait_local("ckpt.pt")
    with open(a.path("ckpt.pt"), "r+b") as f:  # in place, after it is local
        f.seek(MiB)
        f.write(versions[3][:MiB])
    expected = versions[2][:MiB] + versions[3][:MiB] + versions[2][2 * MiB :]
    cached(expected)
    fd = os.open(a.path("ckpt.pt"), os.O_WRONLY)  # in place, write-only: a direct write (mount.direct_writes)
    try:
        os.pwrite(fd, versions[5][:MiB], 2 * MiB)
    finally:
        os.close(fd)
    expected = expected[: 2 * MiB] + versions[5][:MiB] + expected[3 * MiB :]
    cached(expected)
    os.truncate(a.path("ckpt.pt"), MiB)
    cached(expected[:MiB])

    a.cli("flush", "--wait", "--timeout", "60", str(a.mnt))
    deadline = time.monotonic() + 30
    while not b.path("ckpt.pt").exists() or b.path("ckpt.pt").stat().st_size != MiB:
        assert time.monotonic() < deadline, b.log()
        time.sleep(0.2)
    b.path("ckpt.pt").write_bytes(versions[4])  # another node writes the path: last writer wins
    b.cli("flush", "--wait", "--timeout", "60", str(b.mnt))
    assert bucket.files(LocalDirStore(tmp_path / "objects"))["/ckpt.pt"] == versions[4]
    deadline = time.monotonic() + 30
    while a.path("ckpt.pt").read_bytes() != versions[4]:  # never a mix of old and new pages
        got = a.path("ckpt.pt").read_bytes()
        assert got == expected[:MiB], "node A served bytes that were never the file's"
        assert time.monotonic() < deadline, a.log()
        time.sleep(0.2)
    a.umount()
    b.umount()


@pytest.mark.parametrize("threads", ["1", "8"])
def test_decoded_memory_stays_within_its_cap_and_is_reported(mount_factory, threads):
    # however many chunks are decoded ahead at once (cache.read_threads)
    m = mount_factory(env={"CKPTFS_CACHE_DECODED_CACHE_MB": "8", "CKPTFS_CACHE_READ_THREADS": threads})
    data = os.urandom(32 * MiB)
    m.path("big").write_bytes(data)
    m.wait_local("big")
    _uncache(m.path("big"))
    assert m.path("big").read_bytes() == data
    st = json.loads(m.cli("status", "--json", str(m.mnt)).stdout)["cache"]
    assert st["decoded_cap_bytes"] == 8 * MiB
    # 32 MiB went through it; at most the cap stays, plus the chunk a read is in the middle of (<= 4 MiB)
    assert 0 < st["decoded_bytes"] <= st["decoded_peak_bytes"] <= 8 * MiB + 4 * MiB, st
    m.umount()
