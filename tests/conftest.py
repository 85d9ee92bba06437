"""Shared fixtures: a real ckptfs mount in a subprocess (``mount``/``mount_factory``).

In CI, ``CKPTFS_TEST_DISALLOW_SKIP=fuse`` turns "FUSE not available" skips into failures, so a
broken environment cannot pass by skipping everything (restic's ``SkipDisallowed``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import stop_process

ROOT = Path(__file__).resolve().parent.parent
# libfuse reports a reply to a request the kernel already dropped (a release racing the unmount).
_BENIGN = re.compile(r"pyfuse3: fuse_\w+\(\): fuse_reply_\* failed with No such file or directory")


def _fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and fusermount3 is missing"
    return None


def _skip_or_fail(kind: str, reason: str) -> None:
    disallowed = {s.strip() for s in os.environ.get("CKPTFS_TEST_DISALLOW_SKIP", "").split(",")}
    if kind in disallowed:
        pytest.fail(f"{kind} tests may not be skipped here (CKPTFS_TEST_DISALLOW_SKIP): {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "e2e" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.fuse)


@pytest.fixture(autouse=True)
def _require_fuse(request):
    if request.node.get_closest_marker("fuse"):
        problem = _fuse_problem()
        if problem:
            _skip_or_fail("fuse", problem)


class Mount:
    """A ckptfs daemon in a subprocess (``ckptfs mount --foreground``) and its mountpoint."""

    def __init__(
        self, base: Path, env: dict[str, str] | None = None, cache: Path | None = None, store: str | None = None
    ) -> None:
        self.base = base
        self.mnt = base / "mnt"
        self.cache = cache or base / "cache"
        self.store = base / "store"
        self.store_url = store or f"file://{self.store}"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = base / "daemon.log"
        self.expect_errors = False

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "ckptfs", *args], capture_output=True, text=True,
                             env=self.env, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"ckptfs {' '.join(args)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def start(self) -> Mount:
        assert self.proc is None
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckptfs", "mount", "--foreground", "--cache", str(self.cache),
             "--store", self.store_url, str(self.mnt)],
            stdout=log, stderr=log, env=self.env,
        )
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mount did not come up:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)

    def umount(self, timeout: float = 120) -> None:
        """Clean unmount: the daemon must exit 0 and log no error."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True, capture_output=True)
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        text = self.log()
        assert rc == 0, f"daemon exited with {rc}:\n{text}"
        if not self.expect_errors:
            bad = [ln for ln in text.splitlines() if (" ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln)
                   and not _BENIGN.search(ln)]
            assert not bad, "daemon logged errors:\n" + "\n".join(bad)

    def kill9(self, detach: bool = True) -> None:
        """SIGKILL the daemon; with ``detach``, also lazily unmount the dead mount (ENOTCONN until then).
        Stop every writer first: after the detach, writes land in the plain directory underneath."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        if detach:
            self.detach()

    def detach(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def cleanup(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def state(self, rel: str) -> str:
        return os.getxattr(self.path(rel), "user.ckptfs.state").decode()

    def wait_local(self, *rels: str, timeout: float = 120) -> None:
        """Wait until every file named has been ingested (state ``local`` or, uploaded since, ``remote``)."""
        self.wait_state(("local", "remote"), *rels, timeout=timeout)

    def wait_remote(self, *rels: str, timeout: float = 120) -> None:
        """Wait until every file named is in the object store (state ``remote``)."""
        self.wait_state(("remote",), *rels, timeout=timeout)

    def wait_state(self, states: tuple[str, ...], *rels: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for rel in rels:
            while self.state(rel) not in states:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{rel} still {self.state(rel)} after {timeout}s:\n{self.log()}")
                time.sleep(0.05)

    def stats(self, rel: str = "") -> dict:
        import json

        res = self.cli("stats", "--json", str(self.path(rel)) if rel else str(self.mnt))
        return json.loads(res.stdout)


@pytest.fixture
def mount_factory(tmp_path):
    mounts: list[Mount] = []

    def make(
        env: dict[str, str] | None = None, cache: Path | None = None, start: bool = True, store: str | None = None
    ) -> Mount:
        m = Mount(tmp_path / f"m{len(mounts)}", env, cache, store)
        mounts.append(m)
        return m.start() if start else m

    yield make
    for m in mounts:
        m.cleanup()


@pytest.fixture
def mount(mount_factory):
    m = mount_factory()
    yield m
    if m.proc is not None:
        m.umount()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS server on loopback for the whole session (tests that stop it use their own)."""
    from tests.s3server import running_server

    server = running_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the session's server."""
    return s3_server.new_bucket()
