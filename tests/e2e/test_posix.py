"""The POSIX surface training code and everyday tools use, through a real mount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess

import pytest


def test_create_write_read_append_sparse_truncate(mount):
    p = mount.path("f.bin")
    with open(p, "wb") as f:
        f.write(b"hello")
    with open(p, "ab") as f:
        f.write(b" world")
    assert p.read_bytes() == b"hello world"
    with open(p, "r+b") as f:  # random write into the middle
        f.seek(6)
        f.write(b"WORLD")
    assert p.read_bytes() == b"hello WORLD"
    with open(p, "r+b") as f:  # sparse: write past the end leaves a zero-filled hole
        f.seek(100)
        f.write(b"!")
    data = p.read_bytes()
    assert len(data) == 101 and data[11:100] == b"\0" * 89 and data[100:] == b"!"
    os.truncate(p, 5)
    assert p.read_bytes() == b"hello"
    with open(p, "r+b") as f:
        f.truncate(8)
    assert p.read_bytes() == b"hello\0\0\0"
    assert os.stat(p).st_size == 8


def test_modify_a_committed_file(mount):
    """Appending to / overwriting part of a file that is already chunked keeps the rest."""
    data = os.urandom(3 << 20) + bytes(2 << 20)
    p = mount.path("c.bin")
    p.write_bytes(data)
    mount.wait_local("c.bin")
    with open(p, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X" * 10)
    with open(p, "ab") as f:
        f.write(b"tail")
    expect = data[: 1 << 20] + b"X" * 10 + data[(1 << 20) + 10 :] + b"tail"
    assert p.read_bytes() == expect
    mount.wait_local("c.bin")
    assert p.read_bytes() == expect
    os.truncate(p, 1234)
    assert p.read_bytes() == expect[:1234]


def test_directories_and_errors(mount):
    d = mount.path("a", "b")
    d.mkdir(parents=True)
    assert os.listdir(mount.path("a")) == ["b"]
    with pytest.raises(FileExistsError):
        os.mkdir(d)
    (d / "f").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.rmdir(d)
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        os.rmdir(d / "f")
    with pytest.raises(IsADirectoryError):
        os.unlink(d)
    with pytest.raises(FileNotFoundError):
        os.unlink(d / "missing")
    with pytest.raises(OSError) as e:
        os.mkdir(mount.path("x" * 256))
    assert e.value.errno == errno.ENAMETOOLONG
    os.unlink(d / "f")
    os.rmdir(d)
    assert os.listdir(mount.path("a")) == []
    assert os.stat(mount.path("a")).st_nlink == 2
    many = mount.path("many")
    many.mkdir()
    names = {f"file{i:04d}" for i in range(1500)}  # more than one readdir batch
    for n in names:
        (many / n).touch()
    assert set(os.listdir(many)) == names


def test_rename_semantics(mount):
    a, b = mount.path("a"), mount.path("b")
    a.write_bytes(b"new")
    b.write_bytes(b"old")
    fd = os.open(b, os.O_RDONLY)  # an open handle keeps the replaced file readable
    os.replace(a, b)
    assert b.read_bytes() == b"new" and not a.exists()
    assert os.pread(fd, 10, 0) == b"old"
    os.close(fd)
    mount.path("d1").mkdir()
    mount.path("d2").mkdir()
    mount.path("d1", "x").write_bytes(b"x")
    os.rename(mount.path("d1"), mount.path("d3"))
    assert mount.path("d3", "x").read_bytes() == b"x"
    with pytest.raises(OSError) as e:
        os.rename(mount.path("d2"), mount.path("d3"))  # non-empty target directory
    assert e.value.errno == errno.ENOTEMPTY
    os.rename(mount.path("d3"), mount.path("d2"))  # replaces the empty directory
    assert sorted(os.listdir(mount.mnt)) == ["b", "d2"]
    with pytest.raises(IsADirectoryError):
        os.rename(mount.path("b"), mount.path("d2"))
    with pytest.raises(NotADirectoryError):
        os.rename(mount.path("d2"), mount.path("b"))
    os.rename(mount.path("b"), mount.path("d2", "b"))
    assert mount.path("d2", "b").read_bytes() == b"new"


def test_unlinked_open_file_stays_readable(mount):
    p = mount.path("f")
    p.write_bytes(b"data" * 1000)
    with open(p, "rb") as f:
        os.unlink(p)
        assert f.read() == b"data" * 1000
    assert not p.exists()


def test_symlink_chmod_chown_utime_xattr_statfs(mount):
    target = mount.path("t.txt")
    target.write_text("hi")
    os.symlink("t.txt", mount.path("ln"))
    assert os.readlink(mount.path("ln")) == "t.txt"
    assert mount.path("ln").read_text() == "hi"
    assert stat.S_ISLNK(os.lstat(mount.path("ln")).st_mode)
    os.chmod(target, 0o600)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    os.chown(target, 1234, 5678)
    st = os.stat(target)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(target, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(target).st_mtime_ns == 2_000_000_000
    os.setxattr(target, "user.note", b"v1")
    assert os.getxattr(target, "user.note") == b"v1"
    assert set(os.listxattr(target)) == {"user.note"}  # the state is readable, not listed (cp -a, rsync -X)
    assert os.getxattr(target, "user.ckptfs.state") in (b"staged", b"local", b"remote")
    os.removexattr(target, "user.note")
    with pytest.raises(OSError) as e:
        os.getxattr(target, "user.note")
    assert e.value.errno == errno.ENODATA
    os.setxattr(target, "user.ckptfs.state", b"remote")  # a copied state coming back: accepted, ignored
    assert os.getxattr(target, "user.ckptfs.state") in (b"staged", b"local", b"remote")
    with pytest.raises(PermissionError):
        os.setxattr(target, "user.ckptfs.other", b"x")
    entries = ((1, 6), (4, 4), (32, 4))  # user::rw- group::r-- other::r--
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)
    with pytest.raises(OSError) as e:
        os.setxattr(target, "system.posix_acl_access", acl)
    assert e.value.errno == errno.EOPNOTSUPP
    sv = os.statvfs(mount.mnt)
    assert sv.f_blocks > 0 and sv.f_namemax == 255


def test_fsync_and_state_xattr(mount):
    p = mount.path("f")
    with open(p, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
        assert os.getxattr(p, "user.ckptfs.state") == b"staged"  # still open: not sealed
    mount.wait_local("f")


@pytest.mark.slow
def test_cp_tar_rsync_du(mount, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "b.txt").write_text("hello\n" * 1000)
    os.symlink("a.bin", src / "link")
    shutil.copytree(src, mount.path("cp"), symlinks=True)
    subprocess.run(["cp", "-a", str(src), str(mount.path("cpa"))], check=True)
    subprocess.run(["tar", "-C", str(src), "-cf", str(mount.path("x.tar")), "."], check=True)
    (mount.path("untar")).mkdir()
    subprocess.run(["tar", "-C", str(mount.path("untar")), "-xf", str(mount.path("x.tar"))], check=True)
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-a", f"{src}/", str(mount.path("rs"))], check=True)
        subprocess.run(["rsync", "-a", f"{mount.path('rs')}/", str(tmp_path / "back")], check=True)
        subprocess.run(["diff", "-r", str(src), str(tmp_path / "back")], check=True)
    for d in ("cp", "cpa", "untar"):
        subprocess.run(["diff", "-r", "--no-dereference", str(src), str(mount.path(d))], check=True)
    out = subprocess.run(["du", "-sb", str(mount.path("cp"))], check=True, capture_output=True, text=True)
    assert int(out.stdout.split()[0]) >= 306_000


def test_hard_links_and_special_files(mount):
    a = mount.path("a")
    a.write_bytes(b"one")
    os.link(a, mount.path("b"))
    assert os.stat(a).st_nlink == 2 and os.stat(a).st_ino == os.stat(mount.path("b")).st_ino
    with open(mount.path("b"), "ab") as f:
        f.write(b"+two")
    assert a.read_bytes() == b"one+two"
    os.unlink(a)
    assert mount.path("b").read_bytes() == b"one+two" and os.stat(mount.path("b")).st_nlink == 1
    os.link(mount.path("b"), mount.path("c"))
    mount.path("d").write_bytes(b"d")
    os.replace(mount.path("d"), mount.path("c"))  # replacing one of two links leaves the other
    assert mount.path("b").read_bytes() == b"one+two" and os.stat(mount.path("b")).st_nlink == 1
    mount.path("dir").mkdir()
    with pytest.raises(PermissionError):
        os.link(mount.path("dir"), mount.path("dir2"))
    with pytest.raises(FileExistsError):
        os.link(mount.path("b"), mount.path("c"))
    os.mkfifo(mount.path("fifo"))
    assert stat.S_ISFIFO(os.stat(mount.path("fifo")).st_mode)
    os.mknod(mount.path("null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(mount.path("null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    mount.umount()
    mount.start()
    assert stat.S_ISFIFO(os.stat(mount.path("fifo")).st_mode)
    assert mount.path("b").read_bytes() == b"one+two"
    res = mount.cli("fsck", "--cache", str(mount.cache))
    assert "0 problems" in res.stdout, res.stdout


def test_setgid_directory_passes_its_group_on(mount):
    d = mount.path("shared")
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2775)
    (d / "f").write_bytes(b"x")
    (d / "sub").mkdir()
    assert os.stat(d / "f").st_gid == 4321
    assert os.stat(d / "sub").st_gid == 4321 and os.stat(d / "sub").st_mode & stat.S_ISGID


def test_open_with_o_trunc_updates_times(mount):
    p = mount.path("t")
    p.write_bytes(b"content")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    ctime = os.stat(p).st_ctime_ns
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    st = os.stat(p)
    assert st.st_size == 0 and st.st_mtime_ns > 1_000_000_000 and st.st_ctime_ns >= ctime
