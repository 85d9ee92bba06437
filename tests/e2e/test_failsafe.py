"""Failsafe mode: when the daemon cannot go on, it keeps the mount, serves what it can verify and
answers EIO for writes — instead of dying (ENOTCONN). A restart after the cause is gone resumes."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from tests.e2e.test_delta import train_series
from tests.powercut import PowerCutDisk


def _wait_failsafe(m, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.getxattr(m.mnt, "user.ckptfs.failsafe").decode()
        except OSError as exc:
            assert exc.errno == errno.ENODATA, exc  # anything else: the mount is dead
        assert time.monotonic() < deadline, f"no failsafe mode after {timeout} s:\n{m.log()}"
        time.sleep(0.05)


def _stop(m) -> int:
    """Unmount; return the daemon's exit status (3 after failsafe mode)."""
    subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True, capture_output=True)
    rc = m.proc.wait(timeout=60)
    m.proc = None
    return rc


def _assert_failsafe_serving(m, files: dict[str, bytes]) -> None:
    assert os.path.ismount(m.mnt)
    for name, data in files.items():
        assert m.path(name).read_bytes() == data, f"{name} is not served bit-exact in failsafe mode"
    assert set(files) <= set(os.listdir(m.mnt))
    for attempt in (lambda: m.path("after.bin").write_bytes(b"x"), lambda: os.mkdir(m.path("d2"))):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EIO
    stats = m.cli("stats", str(m.mnt))
    assert "failsafe mode" in stats.stdout + stats.stderr


@pytest.mark.slow
@pytest.mark.parametrize("point", ["ingest", "marker", "reclaim", "sweep", "compact", "repack", "handler:mkdir"])
def test_an_exception_in_a_background_job_or_a_handler_gives_failsafe_mode(mount_factory, point):
    env = {"CKPTFS_FAILPOINTS": point, "CKPTFS_CACHE_DURABLE_AFTER_S": "0", "CKPTFS_INGEST_BASE_GRACE_S": "0"}
    states = train_series(2) if point in ("compact", "repack") else []
    m = mount_factory(env=env)
    m.expect_errors = True
    files = {"before.bin": os.urandom(1 << 20)}
    m.path("before.bin").write_bytes(files["before.bin"])
    if states:  # float checkpoints: compaction has work 2 s after the last write; repack once ck0 goes
        import torch

        for i, state in enumerate(states):
            torch.save(state, m.path(f"ck{i}.pt"))
            m.wait_local(f"ck{i}.pt")  # ck1 is delta-coded against ck0 only if ck0 is in by then
        if point == "repack":
            os.unlink(m.path("ck0.pt"))  # ck1's deltas are all that hold ck0's chunks now
        files.update({n: m.path(n).read_bytes() for n in os.listdir(m.mnt) if n.endswith(".pt")})
    elif point == "handler:mkdir":
        with pytest.raises(OSError) as e:
            os.mkdir(m.path("d"))
        assert e.value.errno == errno.EIO
    state = _wait_failsafe(m)
    assert "failsafe mode since" in state and "failpoint" in state
    _assert_failsafe_serving(m, files)
    log = m.log()
    assert log.count("entering failsafe mode") == 1 and log.count("Traceback") == 1, log
    assert _stop(m) == 3
    m.env.pop("CKPTFS_FAILPOINTS")
    m.expect_errors = False
    m.start()
    with pytest.raises(OSError):
        os.getxattr(m.mnt, "user.ckptfs.failsafe")
    for name, data in files.items():
        assert m.path(name).read_bytes() == data
    m.path("after.bin").write_bytes(b"works again")
    m.wait_local("after.bin", *files)
    m.expect_errors = True  # the previous run's failsafe mode is reported as a warning
    m.umount()
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data")
    assert " 0 problems" in res.stdout


@pytest.mark.slow
def test_unwritable_metadata_gives_failsafe_mode_and_nothing_committed_is_lost(mount_factory, tmp_path):
    disk = PowerCutDisk(tmp_path).start()
    m = None
    try:
        m = mount_factory(cache=disk.mnt / "cache")
        m.expect_errors = True
        files = {f"f{i}.bin": os.urandom((i + 1) << 20) for i in range(3)}
        for name, data in files.items():
            m.path(name).write_bytes(data)
        m.wait_local(*files)
        disk.fail({"meta.db": "EROFS"})  # the metadata database can no longer be written
        with pytest.raises(OSError) as e:
            os.mkdir(m.path("newdir"))
        assert e.value.errno == errno.EIO
        assert "failsafe mode since" in _wait_failsafe(m)
        _assert_failsafe_serving(m, files)
        assert (m.cache / "FAILSAFE").read_text().strip()  # the cache disk still takes other files
        disk.fail({})  # the cause is fixed
        assert _stop(m) == 3
        m.start()
        for name, data in files.items():
            assert m.path(name).read_bytes() == data
        assert not (m.cache / "FAILSAFE").exists()
        m.path("new.bin").write_bytes(b"ok")
        m.wait_local("new.bin")
        m.umount()
        res = m.cli("fsck", "--cache", str(m.cache), "--verify-data")
        assert " 0 problems" in res.stdout, res.stdout
    finally:
        if m is not None:
            m.cleanup()  # before the disk: the daemon's files live there
        disk.stop()
