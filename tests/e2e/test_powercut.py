"""Power cuts: the cache directory lives on ``tests.powercut``, a disk that forgets what was not fsync'd.

Each test kills the daemon (kill -9), cuts the power (the disk comes back in its durable state, torn:
a random part of what was not synced made it), and "reboots" (a new ``CKPTFS_BOOT_ID``). Then every
path must read a version that was durable bit-exact — the newest one, or the one before — never a
torn one; a new file that never became durable is in ``/lost+found``, not at its path; and
``fsck --verify-data`` finds no problem.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time

import pytest

from tests.powercut import PowerCutDisk


def _data(seed: int, size: int = 3 << 20) -> bytes:
    """Checkpoint-like bytes: mostly a fixed body (dedup and delta have work to do), some noise."""
    rng = random.Random(seed)
    body = bytearray(random.Random(0).randbytes(size))
    for _ in range(64):
        off = rng.randrange(size - 64)
        body[off : off + 64] = rng.randbytes(64)
    return bytes(body)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def disk(tmp_path):
    d = PowerCutDisk(tmp_path).start()
    yield d
    d.stop()


def _mount(mount_factory, disk: PowerCutDisk, **env: str):
    m = mount_factory(env={"CKPTFS_BOOT_ID": "boot-0", **env}, cache=disk.mnt / "cache")
    m.expect_errors = True  # the cut leaves warnings (and the kill an unclean log)
    return m


def _cut_and_reboot(m, disk: PowerCutDisk, torn: int | None) -> None:
    disk.cut()
    m.kill9()
    disk.start(torn)
    m.env["CKPTFS_BOOT_ID"] = f"boot-{disk.cuts}"
    m.start()


def _lost_and_found(m) -> dict[str, str]:
    lf = m.path("lost+found")
    return {p.name: _sha(p.read_bytes()) for p in lf.iterdir()} if lf.exists() else {}


def _fsck_clean(m) -> None:
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data", check=False)
    assert res.returncode == 0 and " 0 problems" in res.stdout, res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("torn", [None, 1, 2])
def test_closed_but_not_yet_durable_goes_back_to_the_previous_version(mount_factory, disk, torn):
    m = _mount(mount_factory, disk)
    v1, v2, fresh, half = _data(1), _data(2), _data(3), _data(4)[: 1 << 20]
    m.path("ck.pt").write_bytes(v1)
    m.path("rw.pt").write_bytes(v1)
    m.path("cut.pt").write_bytes(v1)
    m.wait_local("ck.pt", "rw.pt", "cut.pt")  # durable: committed, and the commits synced
    writing = open(m.path("open.pt"), "wb")  # a checkpoint half written when the power goes
    writing.write(half)
    writing.flush()
    with open(m.path("sync.txt"), "wb") as f:  # its fsync makes every metadata change so far durable
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())
    m.wait_local("sync.txt")  # its ingest syncs the WAL too: be done with that before the rename
    os.rename(m.path("cut.pt"), m.path("moved.pt"))  # rename + fsync(directory): the rename is durable
    d = os.open(m.mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(d)
    os.close(d)
    disk.stall()  # from here on nothing reaches the disk: no ingest commit, no durable mark
    m.path("ck.pt").write_bytes(v2)
    m.path("new.pt").write_bytes(fresh)
    with open(m.path("rw.pt"), "r+b") as f:  # no O_TRUNC: the committed content is copied, then changed
        f.seek(1000)
        f.write(b"changed in place")
    os.truncate(m.path("moved.pt"), 2 << 20)  # to a non-zero size: a copy of the committed content
    assert m.path("ck.pt").read_bytes() == v2  # served from the staging file meanwhile
    assert m.path("rw.pt").read_bytes()[1000:1016] == b"changed in place"
    assert os.stat(m.path("moved.pt")).st_size == 2 << 20
    assert m.state("ck.pt") == "staged"
    _cut_and_reboot(m, disk, torn)
    try:
        writing.close()
    except OSError:
        pass  # its mount died with the daemon
    assert not m.path("cut.pt").exists()  # its rename was made durable by the fsync of the directory
    for name in ("ck.pt", "rw.pt", "moved.pt"):  # each back to its committed version, whole
        assert m.path(name).read_bytes() == v1, name
    assert m.path("sync.txt").read_bytes() == b"x"
    assert not m.path("open.pt").exists() and not m.path("new.pt").exists()
    lost = _lost_and_found(m)
    # open.pt's creation was durable (the fsync), its bytes never were; new.pt's creation may not be
    assert [n for n in lost if n.startswith("open.pt.")] and all(n.startswith(("open.pt.", "new.pt.")) for n in lost)
    if torn is None:  # nothing of it was synced: the staging file came back empty
        assert set(lost.values()) == {_sha(b"")}
    assert "lost+found/open.pt" in m.log()
    m.wait_local("ck.pt", "rw.pt", "moved.pt")
    _fsck_clean(m)
    res = m.cli("fsck", "--cache", str(m.cache))
    assert "lost+found" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("torn", [None, 5])
def test_fsync_and_the_durable_mark_survive_a_cut(mount_factory, disk, torn):
    """Closed + fsync, and closed + the background durable mark (ingest held back by a stalled disk
    only after the mark): both read back exactly after the cut."""
    m = _mount(mount_factory, disk, CKPTFS_CACHE_DURABLE_AFTER_S="0")
    v1, v2, fresh = _data(11), _data(12), _data(13)
    m.path("ck.pt").write_bytes(v1)
    m.wait_local("ck.pt")
    with open(m.path("ck.pt"), "wb") as f:
        f.write(v2)
        f.flush()
        os.fsync(f.fileno())
    m.path("marked.pt").write_bytes(fresh)
    db = sqlite3.connect(f"file:{m.cache / 'meta.db'}?mode=ro", uri=True)
    ino = os.stat(m.path("marked.pt")).st_ino
    deadline = time.monotonic() + 60
    while True:  # durable: committed (state local) or marked
        row = db.execute(
            "SELECT v.state, v.durable_size FROM inodes i JOIN versions v ON v.id = i.version WHERE i.id=?", (ino,)
        ).fetchone()
        if row is not None and (row[1] == len(fresh) or m.state("marked.pt") in ("local", "remote")):
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.02)
    db.close()
    disk.stall()
    m.path("ck.pt").write_bytes(_data(14))  # not durable: the fsync'd v2 must come back
    _cut_and_reboot(m, disk, torn)
    assert m.path("ck.pt").read_bytes() == v2
    assert m.path("marked.pt").read_bytes() == fresh
    assert _lost_and_found(m) == {}
    m.wait_local("ck.pt", "marked.pt")
    _fsck_clean(m)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22, 23, 24])
def test_cut_at_a_random_moment_of_ingest_repack_compaction_or_delete(mount_factory, disk, seed):
    """Torch checkpoints, overwritten and deleted while ingest, repack and pcodec compaction run; the
    power goes at a random moment. Each path shows one of its durable versions, bit-exact."""
    import torch

    from tests.helpers import make_state

    rng = random.Random(seed)
    m = _mount(mount_factory, disk, CKPTFS_INGEST_BASE_GRACE_S="0")
    history: dict[str, list[str]] = {}

    def save(name: str, step: int) -> None:
        torch.save(make_state(step % 3, width=192, layers=3, steps=step), m.path(name))
        history.setdefault(name, []).append(_sha(m.path(name).read_bytes()))

    for i in range(4):
        save(f"step_{i}.pt", i + 1)
    m.wait_local(*history)
    durable = {name: shas[-1] for name, shas in history.items()}
    time.sleep(rng.uniform(0, 2.5))  # compaction starts after 2 s of quiet
    save("step_0.pt", 7)  # overwrite: its old chunks become delta bases only (repack)
    os.unlink(m.path("step_1.pt"))
    save("step_4.pt", 5)
    if rng.random() < 0.5:
        disk.stall()
    time.sleep(rng.uniform(0, 1.5))
    _cut_and_reboot(m, disk, rng.choice([None, seed]))
    for name, shas in history.items():
        p = m.path(name)
        if not p.exists():
            assert name in ("step_1.pt", "step_4.pt"), f"{name} vanished"
            continue
        got = _sha(p.read_bytes())
        assert got in shas, f"{name} reads bytes that were never a version of it"
        if name in durable and name not in ("step_0.pt",):
            assert got == durable[name], f"{name} lost its durable content"
    for name in _lost_and_found(m):
        assert name.startswith("step_4.pt."), name  # the only file that was new since the last durable point
    m.wait_local(*[n for n in history if m.path(n).exists()])
    _fsck_clean(m)
