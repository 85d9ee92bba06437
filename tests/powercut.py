"""A test-only FUSE file system that can lose power: what was not fsync'd is gone after a restart.

Run under the ckptfs cache directory (``PowerCutFS`` below starts and stops it) it plays a disk with
a volatile write cache, the way LazyFS does, but at the POSIX level:

* file data written since the file's last ``fsync`` lives only in the *current* state
  (``STATE/current/<id>``); ``fsync`` copies it into the *durable* state (``STATE/durable/<id>``);
* directory entries made since the directory's last ``fsync`` (create, mkdir, rename, unlink) are
  current only; ``fsyncdir`` makes that directory's entry list durable (a file whose entry is durable
  but whose data never was reads as empty, as on ext4);
* every (re)start is a power-on: the file system comes up in the durable state. With ``--torn SEED``
  a file whose current content differs from its durable content comes up *torn* instead: a random
  subset of its unsynced 4 KiB pages made it to disk, and a random size between the two. That is the
  state a power cut leaves on a disk that reorders writes.

Stopping it (SIGTERM) is the power cut: nothing is synced on the way out. SIGUSR1 *stalls* the disk:
every ``fsync``/``fsyncdir`` blocks until SIGUSR2 or the cut — a deterministic way to hold the system
in the window before a durability point. Writes keep going meanwhile. The metadata database
(``meta.db*``) and the directory holding it are exempt: the kernel holds a FUSE file's inode lock for
the whole of an fsync, so a stalled WAL fsync would block the daemon's next commit, which no real disk
does to a writer of an unrelated page.

    python -m tests.powercut STATE MOUNTPOINT [--torn SEED]

It also injects I/O errors: on SIGHUP it reads ``STATE/faults`` (lines ``<name prefix> <errno name>``,
e.g. ``meta.db EROFS``) and from then on every write and fsync of a file whose name starts with a
prefix fails with that errno.

Single-threaded (one trio loop), no hard links, symlinks or xattrs: just what ckptfs's cache needs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from tests.helpers import stop_process

PAGE = 4096
ROOT = pyfuse3.ROOT_INODE


@dataclass
class Node:
    kind: str  # "d" or "f"
    mode: int
    uid: int
    gid: int
    children: dict[bytes, int] = field(default_factory=dict)  # directories
    nlink: int = 1
    opens: int = 0
    mtime_ns: int = 0


class PowerCutOps(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, state: Path, torn_seed: int | None) -> None:
        super().__init__()
        self.state = state
        self.cur = state / "current"
        self.dur = state / "durable"
        self.cur.mkdir(parents=True, exist_ok=True)
        self.dur.mkdir(parents=True, exist_ok=True)
        self.meta_path = state / "durable.json"
        self.nodes: dict[int, Node] = {}
        self.durable: dict[str, dict] = {}  # id -> node attrs (+ children for directories)
        self.fds: dict[int, tuple[int, int]] = {}  # fh -> (node id, os fd)
        self.next_fh = 1
        self.stalled = trio.Event()
        self.stalled.set()  # set = not stalled
        self.dead = False  # the power is cut: nothing becomes durable any more
        self.faults: dict[bytes, int] = {}  # file name prefix -> errno of its writes and fsyncs
        self._power_on(torn_seed)

    # -- power on: the durable state (optionally torn) becomes the current one ----------------

    def _power_on(self, torn_seed: int | None) -> None:
        if self.meta_path.exists():
            saved = json.loads(self.meta_path.read_text())
            self.durable = saved["nodes"]
            self.next_id = saved["next_id"]
        else:
            now = time.time_ns()
            self.durable = {str(ROOT): {"kind": "d", "mode": stat.S_IFDIR | 0o755, "uid": 0, "gid": 0,
                                        "children": {}, "mtime_ns": now}}
            self.next_id = ROOT + 1
        ids = [int(p.name) for p in self.cur.iterdir() if p.name.isdigit()]
        self.next_id = max([self.next_id, *[i + 1 for i in ids]])
        rng = random.Random(torn_seed)
        reachable: set[int] = set()
        stack = [ROOT]
        while stack:
            nid = stack.pop()
            if nid in reachable or str(nid) not in self.durable:
                continue
            reachable.add(nid)
            d = self.durable[str(nid)]
            if d["kind"] == "d":
                stack.extend(int(c) for c in d["children"].values())
        for nid in sorted(reachable):
            d = self.durable[str(nid)]
            children = {bytes.fromhex(k): int(v) for k, v in d.get("children", {}).items()}
            children = {k: v for k, v in children.items() if v in reachable}
            self.nodes[nid] = Node(d["kind"], d["mode"], d["uid"], d["gid"], children, mtime_ns=d["mtime_ns"])
            if d["kind"] == "f":
                self._restore_file(nid, rng if torn_seed is not None else None)
        for nid in ids:  # files that did not survive
            if nid not in reachable:
                (self.cur / str(nid)).unlink(missing_ok=True)
        for node in self.nodes.values():
            if node.kind == "d":
                node.nlink = 2 + sum(1 for c in node.children.values() if self.nodes[c].kind == "d")
        self._save_durable()

    def _restore_file(self, nid: int, rng: random.Random | None) -> None:
        cur, dur = self.cur / str(nid), self.dur / str(nid)
        durable = dur.read_bytes() if dur.exists() else b""
        if rng is None or not cur.exists():
            cur.write_bytes(durable)
            return
        current = cur.read_bytes()
        if current == durable:
            return
        lo, hi = sorted((len(durable), len(current)))
        size = rng.randint(lo, hi)
        out = bytearray(durable[:size].ljust(size, b"\0"))
        for p in range(0, size, PAGE):
            if current[p : p + PAGE] != durable[p : p + PAGE] and rng.random() < 0.5:
                piece = current[p : min(p + PAGE, size)]
                out[p : p + len(piece)] = piece.ljust(min(PAGE, size - p), b"\0")
        cur.write_bytes(bytes(out))

    def _save_durable(self) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nodes": self.durable, "next_id": self.next_id}))
        os.replace(tmp, self.meta_path)

    def _attrs(self, nid: int) -> dict:
        n = self.nodes[nid]
        return {"kind": n.kind, "mode": n.mode, "uid": n.uid, "gid": n.gid, "mtime_ns": n.mtime_ns}

    async def _disk(self, nid: int) -> None:
        """A durability point: waits while the disk is stalled (but see the module docstring); after the
        power cut, fails."""
        if not self._exempt(nid):
            await self.stalled.wait()
        if self.dead:
            raise pyfuse3.FUSEError(errno.EIO)

    def _exempt(self, nid: int) -> bool:
        node = self.nodes.get(nid)
        if node is None:
            return False
        if node.kind == "d":
            return any(name.startswith(b"meta.db") for name in node.children)
        return any(name.startswith(b"meta.db") for name in self._names(nid))

    def _names(self, nid: int) -> list[bytes]:
        return [name for d in self.nodes.values() for name, c in d.children.items() if c == nid]

    def _check_fault(self, nid: int) -> None:
        if self.faults:
            for name in self._names(nid):
                for prefix, code in self.faults.items():
                    if name.startswith(prefix):
                        raise pyfuse3.FUSEError(code)

    def load_faults(self) -> None:
        path = self.state / "faults"
        text = path.read_text() if path.exists() else ""
        self.faults = {}
        for line in text.splitlines():
            if line.strip():
                prefix, code = line.split()
                self.faults[prefix.encode()] = getattr(errno, code)

    # -- attributes ---------------------------------------------------------------------------

    def _entry(self, nid: int) -> pyfuse3.EntryAttributes:
        n = self.nodes.get(nid)
        if n is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(nid)
        e.st_mode = pyfuse3.ModeT(n.mode)
        e.st_nlink = n.nlink
        e.st_uid, e.st_gid = n.uid, n.gid
        e.st_size = os.stat(self.cur / str(nid)).st_size if n.kind == "f" else 0
        e.st_blksize = PAGE
        e.st_blocks = (e.st_size + 511) // 512
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = n.mtime_ns
        e.entry_timeout = e.attr_timeout = 0
        return e

    def _dir(self, nid: int) -> Node:
        n = self.nodes.get(nid)
        if n is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if n.kind != "d":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return n

    async def lookup(self, parent_inode, name, ctx):
        child = self._dir(parent_inode).children.get(bytes(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(child)

    async def getattr(self, inode, ctx):
        return self._entry(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self.nodes[inode]
        if fields.update_size:
            os.truncate(self.cur / str(inode), attr.st_size)
        if fields.update_mode:
            n.mode = (n.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        n.mtime_ns = time.time_ns()
        return self._entry(inode)

    async def statfs(self, ctx):
        st = os.statvfs(self.state)
        out = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, k, getattr(st, k))
        out.f_namemax = 255
        return out

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):
        return []

    # -- namespace ----------------------------------------------------------------------------

    def _new(self, parent: int, name: bytes, kind: str, mode: int, ctx) -> int:
        d = self._dir(parent)
        if name in d.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        nid = self.next_id
        self.next_id += 1
        self.nodes[nid] = Node(kind, mode, ctx.uid, ctx.gid, nlink=2 if kind == "d" else 1, mtime_ns=time.time_ns())
        d.children[name] = nid
        if kind == "d":
            d.nlink += 1
        else:
            (self.cur / str(nid)).write_bytes(b"")
        return nid

    async def mkdir(self, parent_inode, name, mode, ctx):
        nid = self._new(parent_inode, bytes(name), "d", stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx)
        return self._entry(nid)

    async def create(self, parent_inode, name, mode, flags, ctx):
        nid = self._new(parent_inode, bytes(name), "f", stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx)
        return self._open(nid, flags), self._entry(nid)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._entry(self._new(parent_inode, bytes(name), "f", mode & ~ctx.umask, ctx))

    def _drop_link(self, nid: int) -> None:
        n = self.nodes[nid]
        n.nlink -= 1
        if n.kind == "d" or (n.nlink <= 0 and n.opens == 0):
            self._forget_node(nid)

    def _forget_node(self, nid: int) -> None:
        self.nodes.pop(nid, None)
        if str(nid) not in self.durable:  # a durable entry may still name it until its directory is synced
            (self.cur / str(nid)).unlink(missing_ok=True)

    async def unlink(self, parent_inode, name, ctx):
        d = self._dir(parent_inode)
        nid = d.children.pop(bytes(name), None)
        if nid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._drop_link(nid)

    async def rmdir(self, parent_inode, name, ctx):
        d = self._dir(parent_inode)
        nid = d.children.get(bytes(name))
        if nid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.nodes[nid].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del d.children[bytes(name)]
        d.nlink -= 1
        self._drop_link(nid)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        src, dst = self._dir(parent_inode_old), self._dir(parent_inode_new)
        nid = src.children.get(bytes(name_old))
        if nid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        old = dst.children.get(bytes(name_new))
        if old is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        del src.children[bytes(name_old)]
        dst.children[bytes(name_new)] = nid
        if old is not None and old != nid:
            self._drop_link(old)

    async def forget(self, inode_list):
        return None

    async def opendir(self, inode, ctx):
        self._dir(inode)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh, start_id, token):
        items = sorted(self._dir(fh).children.items())
        for i, (name, nid) in enumerate(items[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), self._entry(nid), i):
                return

    async def releasedir(self, fh):
        return None

    async def fsyncdir(self, fh, datasync):
        await self._disk(fh)
        d = self.nodes.get(fh)
        if d is None:
            return
        for nid in d.children.values():
            if str(nid) not in self.durable:
                entry = self._attrs(nid)
                if entry["kind"] == "d":
                    entry["children"] = {}
                self.durable[str(nid)] = entry
        entry = self.durable.get(str(fh), self._attrs(fh))
        entry["children"] = {k.hex(): v for k, v in d.children.items()}
        self.durable[str(fh)] = entry
        self._save_durable()

    # -- file data ----------------------------------------------------------------------------

    def _open(self, nid: int, flags: int) -> pyfuse3.FileInfo:
        mode = flags & os.O_ACCMODE
        fd = os.open(self.cur / str(nid), mode | (flags & os.O_TRUNC))
        fh = self.next_fh
        self.next_fh += 1
        self.fds[fh] = (nid, fd)
        self.nodes[nid].opens += 1
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh))

    async def open(self, inode, flags, ctx):
        if inode not in self.nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._open(inode, flags)

    async def read(self, fh, off, size):
        return os.pread(self.fds[fh][1], size, off)

    async def write(self, fh, off, buf):
        nid, fd = self.fds[fh]
        self._check_fault(nid)
        self.nodes[nid].mtime_ns = time.time_ns()
        return os.pwrite(fd, buf, off)

    async def flush(self, fh):
        return None

    async def release(self, fh):
        nid, fd = self.fds.pop(fh)
        os.close(fd)
        n = self.nodes.get(nid)
        if n is not None:
            n.opens -= 1
            if n.nlink <= 0 and n.opens == 0:
                self._forget_node(nid)

    async def fsync(self, fh, datasync):
        nid, _fd = self.fds[fh]
        self._check_fault(nid)
        await self._disk(nid)
        shutil.copyfile(self.cur / str(nid), self.dur / str(nid))
        entry = self._attrs(nid)
        self.durable[str(nid)] = entry
        self._save_durable()


async def _serve(ops: PowerCutOps) -> None:
    async with trio.open_nursery() as nursery:

        async def signals() -> None:
            sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
            with trio.open_signal_receiver(*sigs) as it:
                async for sig in it:
                    if sig == signal.SIGHUP:
                        ops.load_faults()
                    elif sig == signal.SIGUSR1:
                        ops.stalled = trio.Event()  # not set: durability points wait
                    elif sig == signal.SIGUSR2:
                        ops.stalled.set()
                    else:  # the power cut: nothing syncs any more, blocked syncs fail, no sync on the way out
                        ops.dead = True
                        ops.stalled.set()
                        pyfuse3.terminate()
                        return

        nursery.start_soon(signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("state")
    ap.add_argument("mountpoint")
    ap.add_argument("--torn", type=int, default=None, help="come up torn, with this random seed")
    args = ap.parse_args()
    ops = PowerCutOps(Path(args.state), args.torn)
    pyfuse3.init(ops, args.mountpoint, {"fsname=powercut", "default_permissions"})
    try:
        trio.run(_serve, ops)
    finally:
        pyfuse3.close(unmount=True)


class PowerCutDisk:
    """Runs ``tests.powercut`` on ``base/disk`` (state in ``base/disk-state``) for a test: ``stall()`` the
    disk, ``cut()`` the power (the file system comes back in its durable state, torn with a seed)."""

    def __init__(self, base: Path) -> None:
        self.state = base / "disk-state"
        self.mnt = base / "disk"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def start(self, torn: int | None = None) -> PowerCutDisk:
        cmd = [sys.executable, "-m", "tests.powercut", str(self.state), str(self.mnt)]
        if torn is not None:
            cmd += ["--torn", str(torn)]
        self.proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"power-cut disk did not come up (exit {self.proc.poll()})")
            time.sleep(0.05)
        return self

    def stall(self) -> None:
        """From now on every fsync blocks (until ``resume`` or the cut): writes go on, nothing gets durable."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)  # the signal is handled by the trio loop

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR2)

    def fail(self, faults: dict[str, str]) -> None:
        """From now on writes and fsyncs of files named ``prefix*`` fail with errno ``faults[prefix]``
        (e.g. ``{"meta.db": "EROFS"}``); ``{}`` clears them."""
        assert self.proc is not None
        (self.state / "faults").write_text("".join(f"{k} {v}\n" for k, v in faults.items()))
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)

    def cut(self) -> None:
        """Cut the power: nothing becomes durable any more, stalled fsyncs fail, users of the disk get
        ENOTCONN. (A process blocked in a FUSE request cannot even be killed until it is answered: cut
        first, then kill the daemon, then ``start`` again.)"""
        self.stop()
        self.cuts += 1

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # SIGTERM: the power cut
            self.proc = None
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


if __name__ == "__main__":
    main()
