"""What a new user hit in their first hour: each is a bug with a test here."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.e2e.test_cli import _one_line_error, ckptfs


def _bg_mount(tmp_path, mnt, cwd=None, **env):
    return subprocess.run(
        [sys.executable, "-m", "ckptfs", "mount", "--cache", str(tmp_path / "c"), "--store",
         f"file://{tmp_path}/s", str(mnt)],
        capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, **env},
    )


def _daemon_pid(tmp_path) -> int:
    return int((tmp_path / "c" / "ckptfs.pid").read_text())


def test_mount_again_after_kill9_and_umount_of_the_dead_mount(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert _bg_mount(tmp_path, mnt).returncode == 0
    (mnt / "x").write_bytes(b"kept")
    os.kill(_daemon_pid(tmp_path), signal.SIGKILL)
    time.sleep(0.5)
    res = _bg_mount(tmp_path, mnt)  # on the dead mount: one line, no traceback
    _one_line_error(res, "dead mount", "ckptfs umount")
    assert ckptfs("umount", str(mnt)).returncode == 0
    assert (tmp_path / "c" / "ckptfs.pid").exists()  # stale: the killed daemon could not remove it
    res = _bg_mount(tmp_path, mnt)
    try:
        assert res.returncode == 0, res.stderr
        assert (mnt / "x").read_bytes() == b"kept"
    finally:
        assert ckptfs("umount", str(mnt)).returncode == 0


def test_a_folder_named_ckptfs_in_the_current_directory_does_not_break_mount(tmp_path):
    """The daemon is started with ``python -P -m ckptfs`` in ``/``; ``python -m ckptfs`` in the current
    directory imported the folder instead of the package."""
    (tmp_path / "ckptfs").mkdir()
    (tmp_path / "ckptfs" / "__init__.py").write_text("raise SystemExit('the wrong ckptfs')\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ckptfs"), "mount", "--cache", str(tmp_path / "c"),
         "--store", f"file://{tmp_path}/s", str(mnt)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)
    finally:
        ckptfs("umount", str(mnt))


def test_umount_does_not_wait_for_an_unreaped_daemon(tmp_path):
    """A foreground daemon whose parent has not reaped it is a zombie: kill(pid, 0) says alive."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptfs", "mount", "--foreground", "--cache", str(tmp_path / "c"), "--store",
         f"file://{tmp_path}/s", str(mnt)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        t0 = time.monotonic()
        res = ckptfs("umount", "--timeout", "30", str(mnt))  # we do not wait() for proc meanwhile
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t0 < 15
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        proc.wait(timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="cp -a keeps owners only as root")
def test_cp_p_and_cp_a_keep_modes_and_the_state_does_not_travel(mount, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(5000))
    (src / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "data.bin", 0o644)
    os.chmod(src / "run.sh", 0o755)
    subprocess.run(["cp", "-p", str(src / "data.bin"), str(mount.path("p.bin"))], check=True)
    subprocess.run(["cp", "-a", str(src), str(mount.path("tree"))], check=True)
    assert stat.S_IMODE(os.stat(mount.path("p.bin")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(mount.path("tree", "data.bin")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(mount.path("tree", "run.sh")).st_mode) == 0o755
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(mount.path("tree")), str(out)], check=True)
    assert "user.ckptfs.state" not in os.listxattr(out / "data.bin")
    os.setxattr(out / "data.bin", "user.ckptfs.state", b"local")  # a copy made by an older ckptfs
    res = subprocess.run(["rsync", "-aX", f"{out}/", f"{mount.path('back')}/"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert mount.path("back", "data.bin").read_bytes() == (src / "data.bin").read_bytes()


def test_stats_of_a_file_and_of_the_current_directory(mount):
    mount.path("d").mkdir()
    mount.path("d", "a.bin").write_bytes(os.urandom(300_000))
    mount.path("top.bin").write_bytes(os.urandom(100_000))
    mount.wait_local("d/a.bin", "top.bin")
    res = mount.cli("stats", str(mount.path("d", "a.bin")))
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith(("d ", "TOTAL"))]
    assert len(rows) == 2 and rows[1].split()[1] == "1", res.stdout  # one file, not an empty table
    here = subprocess.run([sys.executable, "-m", "ckptfs", "stats", "--json"], capture_output=True, text=True,
                          cwd=mount.path("d"), env=mount.env, timeout=60)
    import json

    assert json.loads(here.stdout)["total"]["files"] == 1  # the current directory, not the whole mount


def test_cache_dir_is_private_and_a_shared_one_is_refused(mount_factory, tmp_path):
    m = mount_factory()
    m.path("f").write_bytes(b"secret")
    m.wait_local("f")
    assert stat.S_IMODE(os.stat(m.cache).st_mode) == 0o700
    for p in m.cache.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
    m.umount()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    mnt = tmp_path / "mnt2"
    mnt.mkdir()
    res = ckptfs("mount", "--cache", str(shared), "--store", f"file://{tmp_path}/s", str(mnt))
    _one_line_error(res, "group- or world-writable", "chmod 700")


def test_bad_cache_path_reserve_and_fsck_messages(mount_factory, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "afile").write_text("x")
    res = ckptfs("mount", "--cache", str(tmp_path / "afile"), "--store", f"file://{tmp_path}/s", str(mnt))
    _one_line_error(res, "exists and is not a directory")
    res = ckptfs("mount", "--cache", str(tmp_path / "c"), "--store", f"file://{tmp_path}/s", str(mnt),
                 env={"CKPTFS_CACHE_RESERVE_MB": str(1 << 40)})
    _one_line_error(res, "cache.reserve_mb", "holds only")
    m = mount_factory()
    m.path("f").write_bytes(b"x")
    res = m.cli("fsck", "--cache", str(m.cache), "--repair", check=False)
    _one_line_error(res, "daemon stopped", "ckptfs umount")
    m.wait_local("f")
    res = m.cli("fsck", "--cache", str(m.cache))
    assert "1 file," in res.stdout and "0 problems" in res.stdout, res.stdout
