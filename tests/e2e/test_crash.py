"""kill -9 of the daemon at awkward moments: every file closed before the kill survives bit-exact."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from tests.helpers import digest

WRITER = r"""
import os, sys, random
root, log = sys.argv[1], sys.argv[2]
rng = random.Random(int(sys.argv[3]))
i = 0
while True:
    # checkpoint-like: a big incompressible-ish body with a few sparse changes per version
    size = rng.choice([100_000, 1_500_000, 6_000_000])
    base = random.Random(size).randbytes(size)
    body = bytearray(base)
    for _ in range(8):
        off = rng.randrange(size)
        body[off:off + 16] = rng.randbytes(16)
    name = f"ckpt_{i:04d}.bin"
    try:
        with open(os.path.join(root, name), "wb") as f:
            f.write(body)
    except OSError:
        break
    with open(log, "a") as lf:  # only after close() returned
        lf.write(f"{name} {__import__('hashlib').sha256(body).hexdigest()}\n")
        lf.flush()
        os.fsync(lf.fileno())
    i += 1
"""


def _closed_files(log):
    if not os.path.exists(log):
        return {}
    out = {}
    for line in open(log).read().splitlines():
        name, h = line.split()
        out[name] = h
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_during_checkpoint_series(mount_factory, tmp_path, seed):
    m = mount_factory()
    m.expect_errors = True
    log = tmp_path / f"closed{seed}.log"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mnt), str(log), str(seed)],
                              stderr=subprocess.DEVNULL)
    rng = random.Random(seed)
    try:
        deadline = time.monotonic() + 60
        while len(_closed_files(log)) < 3 + seed and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.random() * 0.5)  # somewhere mid-write and mid-ingest
        m.kill9(detach=False)
    finally:
        writer.kill()
        writer.wait()
        m.detach()  # only now: a writer still running would write into the plain directory underneath
    closed = _closed_files(log)
    assert len(closed) >= 3, "the writer made no progress before the kill"
    m.start()
    for name, h in closed.items():
        assert digest(m.path(name)) == h, f"{name} changed after kill -9"
    m.wait_local(*closed, timeout=180)
    m.umount()
    m.start()
    for name, h in closed.items():
        assert digest(m.path(name)) == h, f"{name} changed after re-ingest"
    res = m.cli("fsck", "--cache", str(m.cache), "--verify-data")
    assert "0 problems" in res.stdout, res.stdout
    m.umount()


@pytest.mark.slow
def test_kill9_right_after_close_before_ingest(mount_factory):
    """A closed file whose ingest never ran is re-ingested on the next mount."""
    m = mount_factory(env={"CKPTFS_INGEST_NICE": "19"})
    m.expect_errors = True
    data = os.urandom(20 << 20)
    m.path("big.bin").write_bytes(data)
    m.kill9()
    m.start()
    assert m.path("big.bin").read_bytes() == data
    m.wait_local("big.bin")
    m.umount()
    m.start()
    assert m.path("big.bin").read_bytes() == data
    m.umount()


def test_dead_daemon_does_not_expose_the_plain_directory(mount_factory):
    """After a crash the mountpoint errors (ENOTCONN) instead of taking writes into the directory below."""
    m = mount_factory()
    m.path("a").write_bytes(b"x")
    m.proc.kill()
    m.proc.wait()
    m.proc = None
    with pytest.raises(OSError):
        (m.mnt / "b").write_bytes(b"lost?")
    subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], check=True)
    assert os.listdir(m.mnt) == []  # nothing leaked into the plain directory
    m.start()
    assert m.path("a").read_bytes() == b"x"
    m.umount()
