"""Bad input gets a one-line error and a non-zero exit; background mount/umount work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def ckptfs(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ckptfs", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def _one_line_error(res, *needles):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptfs: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_background_mount_and_umount(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = ckptfs("mount", "--cache", str(tmp_path / "c"), "--store", f"file://{tmp_path}/s", str(mnt))
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)
        (mnt / "x").write_bytes(b"abc")
        second = ckptfs("mount", "--cache", str(tmp_path / "c"), str(tmp_path / "other"))
        _one_line_error(second, "does not exist")
        other = tmp_path / "other"
        other.mkdir()
        second = ckptfs("mount", "--cache", str(tmp_path / "c"), str(other))
        _one_line_error(second, "another ckptfs daemon", "is already using")
        again = ckptfs("mount", "--cache", str(tmp_path / "c2"), str(mnt))
        _one_line_error(again, "already a mount point")
        stats = ckptfs("stats", str(mnt))
        assert stats.returncode == 0 and "TOTAL" in stats.stdout
    finally:
        res = ckptfs("umount", str(mnt))
        if res.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert res.returncode == 0, res.stderr
    assert not os.path.ismount(mnt)
    res = ckptfs("mount", "--cache", str(tmp_path / "c"), "--store", f"file://{tmp_path}/s", str(mnt))
    assert res.returncode == 0, res.stderr
    try:
        assert (mnt / "x").read_bytes() == b"abc"
    finally:
        assert ckptfs("umount", str(mnt)).returncode == 0


@pytest.mark.parametrize(
    "case",
    ["missing", "not_dir", "cache_unwritable", "store_unwritable", "no_fuse", "bad_config", "bad_store_url"],
)
def test_mount_bad_input(tmp_path, case):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache, store = tmp_path / "cache", f"file://{tmp_path}/store"
    env = {}
    args = ["mount", "--cache", str(cache), "--store", store, str(mnt)]
    needles: tuple[str, ...] = ()
    if case == "missing":
        args[-1] = str(tmp_path / "nope")
        needles = ("does not exist",)
    elif case == "not_dir":
        (tmp_path / "file").write_text("x")
        args[-1] = str(tmp_path / "file")
        needles = ("not a directory",)
    elif case == "cache_unwritable":
        (tmp_path / "blocker").write_text("x")
        args[2] = str(tmp_path / "blocker" / "cache")
        needles = ("cache directory", "not writable")
    elif case == "store_unwritable":
        (tmp_path / "blocker").write_text("x")
        args[4] = f"file://{tmp_path}/blocker/store"
        needles = ("not writable",)
    elif case == "no_fuse":
        env = {"CKPTFS_MOUNT_FUSE_DEVICE": str(tmp_path / "no-fuse-here")}
        needles = ("FUSE device", "missing")
    elif case == "bad_config":
        cfg = tmp_path / "c.toml"
        cfg.write_text("[ingest]\nzstd_level = 99\n")
        args[1:1] = ["--config", str(cfg)]
        needles = ("zstd_level",)
    elif case == "bad_store_url":
        args[4] = "ftp://nowhere"
        needles = ("unknown URL scheme",)
    res = ckptfs(*args, env=env)
    _one_line_error(res, *needles)
    assert not os.path.ismount(mnt)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a read-only tmpfs")
def test_read_only_cache_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        res = ckptfs("mount", "--cache", str(ro / "cache"), "--store", f"file://{tmp_path}/s", str(mnt))
        _one_line_error(res, "not writable")
    finally:
        subprocess.run(["umount", str(ro)])


def test_fsck_and_stats_without_daemon(tmp_path):
    res = ckptfs("fsck", "--cache", str(tmp_path / "empty"))
    assert res.returncode == 1 and "no metadata database" in res.stdout
    res = ckptfs("stats", str(tmp_path))
    _one_line_error(res, "not inside a ckptfs mount")
