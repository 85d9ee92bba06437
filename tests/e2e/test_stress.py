"""Several processes of mixed operations on the same few files: the daemon never dies (a concurrent
truncate of a file being chunked was a SIGBUS through mmap), and nothing it committed is damaged."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

WORKER = r"""
import os, random, sys
root, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
names = [f"f{i}" for i in range(6)]
blob = random.Random(0).randbytes(5 << 20)
for _ in range(n):
    p = os.path.join(root, rng.choice(names))
    op = rng.random()
    try:
        if op < 0.3:  # a file large enough for content-defined chunking, then closed (ingest starts)
            with open(p, "wb") as f:
                f.write(blob[: rng.randrange(1 << 20, 5 << 20)])
        elif op < 0.55:
            os.truncate(p, rng.randrange(0, 4 << 20))
        elif op < 0.7:
            with open(p, "r+b") as f:
                f.seek(rng.randrange(0, 4 << 20))
                f.write(rng.randbytes(4096))
        elif op < 0.8:
            os.rename(p, os.path.join(root, rng.choice(names)))
        elif op < 0.88:
            os.unlink(p)
        else:
            with open(p, "rb") as f:
                f.read()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == 107:  # ENOTCONN: the daemon died
            sys.exit(3)
        raise
"""


@pytest.mark.slow
def test_four_processes_of_mixed_operations_with_truncates_during_ingest(mount):
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(mount.mnt), str(seed), "250"])
        for seed in range(4)
    ]
    deadline = time.monotonic() + 240
    for p in procs:
        rc = p.wait(timeout=max(1, deadline - time.monotonic()))
        assert rc == 0, f"a worker exited with {rc} (3: ENOTCONN, the daemon died):\n{mount.log()[-3000:]}"
    assert os.path.ismount(mount.mnt)
    try:
        os.getxattr(mount.mnt, "user.ckptfs.failsafe")
        raise AssertionError(f"the daemon went into failsafe mode:\n{mount.log()[-3000:]}")
    except OSError as exc:
        assert exc.errno == errno.ENODATA
    contents = {n: mount.path(n).read_bytes() for n in os.listdir(mount.mnt)}
    mount.wait_local(*contents)
    mount.umount()
    mount.start()
    for name, data in contents.items():
        assert mount.path(name).read_bytes() == data, name
    mount.umount()
    res = mount.cli("fsck", "--cache", str(mount.cache), "--verify-data")
    assert " 0 problems" in res.stdout, res.stdout
