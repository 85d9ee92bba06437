"""POSIX namespace semantics over the metadata database.

Trio thread only. Every mutating method is a run of SQLite statements with no checkpoint, so it is
atomic with respect to every other request, except where a docstring says it awaits (opening a file
for writing may copy committed content into a staging file first).

Known gaps (documented in the README): hard links to directories are refused (EPERM, as
everywhere); '.' and '..' are not listed by readdir (the kernel resolves them).
Lookup counts live in memory: after a restart, inodes without a directory entry are purged.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ckptfs.errors import PosixError
from ckptfs.files import Active, FileContents
from ckptfs.meta import Database
from ckptfs.types import InodeId, VersionState

log = logging.getLogger(__name__)
ROOT = InodeId(1)
NAME_MAX = 255
LOST_FOUND = b"lost+found"
_ATTR_COLS = "id, mode, uid, gid, nlink, size, atime_ns, mtime_ns, ctime_ns, rdev"


@dataclass(slots=True)
class Attr:
    ino: InodeId
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0


@dataclass(slots=True)
class Handle:
    inode: InodeId
    writable: bool
    active: Active | None = None
    wrote: bool = False


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise PosixError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise PosixError(errno.EINVAL)


class Tree:
    def __init__(self, db: Database, contents: FileContents) -> None:
        self.db = db
        self.contents = contents
        self._lookups: Counter[InodeId] = Counter()
        self._opens: Counter[InodeId] = Counter()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        if self.db.one("SELECT 1 FROM inodes WHERE id=?", (ROOT,)) is None:
            now = time.time_ns()
            self.db.execute(
                f"INSERT INTO inodes ({_ATTR_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), 2, 0, now, now, now, 0),
            )

    # -- attributes ----------------------------------------------------------------------------

    def getattr(self, ino: InodeId) -> Attr:
        row = self.db.one(f"SELECT {_ATTR_COLS} FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise PosixError(errno.ENOENT)
        attr = Attr(*row)
        live = self.contents.size(ino)
        if live is not None:
            attr.size = live
        return attr

    def _child(self, parent: InodeId, name: bytes) -> InodeId | None:
        row = self.db.one("SELECT inode FROM dirents WHERE parent=? AND name=?", (parent, name))
        return None if row is None else InodeId(int(row[0]))

    def _dir(self, ino: InodeId) -> None:
        row = self.db.one("SELECT mode FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise PosixError(errno.ENOENT)
        if not stat.S_ISDIR(int(row[0])):
            raise PosixError(errno.ENOTDIR)

    def lookup(self, parent: InodeId, name: bytes) -> Attr:
        """Resolve a name; counts one kernel lookup reference on success."""
        if len(name) > NAME_MAX:
            raise PosixError(errno.ENAMETOOLONG)
        if name == b".":
            ino: InodeId | None = parent
        elif name == b"..":
            row = self.db.one("SELECT parent FROM dirents WHERE inode=?", (parent,))
            ino = ROOT if row is None else InodeId(int(row[0]))
        else:
            ino = self._child(parent, name)
        if ino is None:
            raise PosixError(errno.ENOENT)
        attr = self.getattr(ino)
        self._lookups[ino] += 1
        return attr

    def add_ref(self, ino: InodeId) -> None:
        """The kernel took a reference without a lookup (readdirplus)."""
        self._lookups[ino] += 1

    def forget(self, items: list[tuple[InodeId, int]]) -> None:
        for ino, n in items:
            self._lookups[ino] -= n
            if self._lookups[ino] <= 0:
                del self._lookups[ino]
                self._maybe_purge(ino)

    async def setattr(
        self,
        ino: InodeId,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attr:
        """Change attributes. Truncation awaits (it may stage the file first)."""
        attr = self.getattr(ino)
        now = time.time_ns()
        if size is not None:
            if stat.S_ISDIR(attr.mode):
                raise PosixError(errno.EISDIR)
            if not stat.S_ISREG(attr.mode):
                raise PosixError(errno.EINVAL)
            await self.contents.truncate(ino, size)
            mtime_ns = now if mtime_ns is None else mtime_ns
        sets, vals = ["ctime_ns=?"], [now]
        if mode is not None:
            sets.append("mode=?")
            vals.append((attr.mode & ~0o7777) | (mode & 0o7777))
        for col, val in (("uid", uid), ("gid", gid), ("atime_ns", atime_ns), ("mtime_ns", mtime_ns)):
            if val is not None:
                sets.append(f"{col}=?")
                vals.append(val)
        self.db.execute(f"UPDATE inodes SET {', '.join(sets)} WHERE id=?", (*vals, ino))
        return self.getattr(ino)

    # -- creating ------------------------------------------------------------------------------

    def _new_inode(
        self,
        parent: InodeId,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        target: bytes | None,
        rdev: int = 0,
        first: Callable[[sqlite3.Connection, InodeId], None] | None = None,
    ) -> Attr:
        """Insert an inode and its entry in one transaction; ``first`` adds to that transaction (a new
        file's first version)."""
        _check_name(name)
        self._dir(parent)
        if self._child(parent, name) is not None:
            raise PosixError(errno.EEXIST)
        parent_mode, parent_gid = self.db.one("SELECT mode, gid FROM inodes WHERE id=?", (parent,)) or (0, gid)
        if parent_mode & stat.S_ISGID:  # BSD group semantics in a setgid directory, as Linux filesystems do
            gid = parent_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        nlink = 2 if stat.S_ISDIR(mode) else 1
        with self.db.transaction() as c:  # atomic: no await until commit
            ino = c.execute(
                f"INSERT INTO inodes ({_ATTR_COLS[4:]}, target) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (mode, uid, gid, nlink, len(target or b""), now, now, now, rdev, target),
            ).lastrowid
            c.execute("INSERT INTO dirents (parent, name, inode) VALUES (?,?,?)", (parent, name, ino))
            bump = 1 if stat.S_ISDIR(mode) else 0
            c.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink+? WHERE id=?", (now, now, bump, parent))
            if first is not None:
                first(c, InodeId(ino or 0))
        attr = self.getattr(InodeId(ino or 0))
        self._lookups[attr.ino] += 1
        return attr

    def mkdir(self, parent: InodeId, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._new_inode(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, None)

    def mknod(self, parent: InodeId, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        """Regular files, FIFOs, sockets and device nodes (the kernel serves the special ones itself)."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise PosixError(errno.EINVAL)
        dev = rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return self._new_inode(parent, name, kind | (mode & 0o7777), uid, gid, None, dev)

    def link(self, ino: InodeId, parent: InodeId, name: bytes) -> Attr:
        """A hard link: one more entry for a non-directory inode."""
        _check_name(name)
        self._dir(parent)
        attr = self.getattr(ino)
        if stat.S_ISDIR(attr.mode):
            raise PosixError(errno.EPERM)
        if self._child(parent, name) is not None:
            raise PosixError(errno.EEXIST)
        now = time.time_ns()
        with self.db.transaction() as c:  # atomic: no await until commit
            c.execute("INSERT INTO dirents (parent, name, inode) VALUES (?,?,?)", (parent, name, ino))
            c.execute("UPDATE inodes SET nlink=nlink+1, ctime_ns=? WHERE id=?", (now, ino))
            c.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, parent))
        self._lookups[ino] += 1
        return self.getattr(ino)

    def symlink(self, parent: InodeId, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        return self._new_inode(parent, name, stat.S_IFLNK | 0o777, uid, gid, target)

    def readlink(self, ino: InodeId) -> bytes:
        row = self.db.one("SELECT target FROM inodes WHERE id=?", (ino,))
        if row is None:
            raise PosixError(errno.ENOENT)
        if row[0] is None:
            raise PosixError(errno.EINVAL)
        return bytes(row[0])

    async def create(self, parent: InodeId, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Attr]:
        made: list[Active] = []
        try:
            attr = self._new_inode(
                parent,
                name,
                stat.S_IFREG | (mode & 0o7777),
                uid,
                gid,
                None,
                first=lambda c, ino: made.append(self.contents.first_version_in(c, ino)),
            )
        except BaseException:
            for act in made:  # created, then rolled back with the transaction
                self.contents.abandon(act)
            raise
        self.contents.adopt(made[0])
        fh = await self.open(attr.ino, flags & ~os.O_TRUNC)  # empty already; no second version
        if (flags & os.O_ACCMODE) == os.O_RDONLY:
            self.contents.seal(made[0])  # created, never written: an empty file, durable as it is
        return fh, self.getattr(attr.ino)

    # -- removing ------------------------------------------------------------------------------

    def _unlink_entry(self, parent: InodeId, name: bytes, ino: InodeId, is_dir: bool) -> None:
        now = time.time_ns()
        with self.db.transaction() as c:  # atomic: no await until commit
            c.execute("DELETE FROM dirents WHERE parent=? AND name=?", (parent, name))
            if is_dir:
                c.execute("UPDATE inodes SET nlink=0, ctime_ns=? WHERE id=?", (now, ino))
            else:
                c.execute("UPDATE inodes SET nlink=nlink-1, ctime_ns=? WHERE id=?", (now, ino))
            c.execute(
                "UPDATE inodes SET mtime_ns=?, ctime_ns=?, nlink=nlink-? WHERE id=?",
                (now, now, 1 if is_dir else 0, parent),
            )
        self._maybe_purge(ino)

    def unlink(self, parent: InodeId, name: bytes) -> None:
        ino = self._child(parent, name)
        if ino is None:
            raise PosixError(errno.ENOENT)
        if stat.S_ISDIR(self.getattr(ino).mode):
            raise PosixError(errno.EISDIR)
        self._unlink_entry(parent, name, ino, False)

    def _is_empty(self, ino: InodeId) -> bool:
        return self.db.one("SELECT 1 FROM dirents WHERE parent=? LIMIT 1", (ino,)) is None

    def rmdir(self, parent: InodeId, name: bytes) -> None:
        ino = self._child(parent, name)
        if ino is None:
            raise PosixError(errno.ENOENT)
        if not stat.S_ISDIR(self.getattr(ino).mode):
            raise PosixError(errno.ENOTDIR)
        if not self._is_empty(ino):
            raise PosixError(errno.ENOTEMPTY)
        self._unlink_entry(parent, name, ino, True)

    def _maybe_purge(self, ino: InodeId) -> None:
        """Delete an inode and its data once no entry, lookup or open handle refers to it."""
        if ino == ROOT or self._lookups.get(ino) or self._opens.get(ino):
            return
        row = self.db.one("SELECT nlink FROM inodes WHERE id=?", (ino,))
        if row is None or int(row[0]) > 0:
            return
        self.contents.drop(ino)
        with self.db.transaction() as c:
            c.execute("DELETE FROM xattrs WHERE inode=?", (ino,))
            c.execute("DELETE FROM inodes WHERE id=?", (ino,))

    def rescue(self, inodes: list[InodeId]) -> list[str]:
        """At start-up: move files that have no durable version (a power cut came before their first
        durability point) out of their directories into ``/lost+found``, as ``<name>.<inode>``; returns
        where each went ("old path -> new name"). Their bytes, as the staging file kept them, stay
        readable there; the path no longer shows them. No checkpoint."""
        if not inodes:
            return []
        lost = self._child(ROOT, LOST_FOUND)
        if lost is None:
            lost = self.mkdir(ROOT, LOST_FOUND, 0o700, os.getuid(), os.getgid()).ino
            self._lookups[lost] -= 1  # no kernel reference: nobody looked it up
        elif not stat.S_ISDIR(self.getattr(lost).mode):
            raise PosixError(errno.ENOTDIR, "/lost+found exists and is not a directory")
        moved = []
        for ino in inodes:
            entries = self.db.execute("SELECT parent, name FROM dirents WHERE inode=?", (ino,)).fetchall()
            if not entries:
                continue  # unlinked already: purged with the orphans
            old = self.path_of(ino)
            name = bytes(entries[0][1])[: NAME_MAX - 12] + f".{ino}".encode()
            now = time.time_ns()
            with self.db.transaction() as c:  # atomic: no await until commit
                c.execute("DELETE FROM dirents WHERE inode=?", (ino,))
                c.execute("INSERT INTO dirents (parent, name, inode) VALUES (?,?,?)", (lost, name, ino))
                c.execute("UPDATE inodes SET nlink=1, ctime_ns=? WHERE id=?", (now, ino))
                for parent, _ in entries:
                    c.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, parent))
            moved.append(f"{old} -> lost+found/{name.decode(errors='replace')}")
        return moved

    # -- changes another node made (tier/refresh.py) ----------------------------------------------

    def entry_at(self, path: bytes) -> tuple[InodeId, bytes, InodeId | None] | None:
        """(parent inode, name, inode or None) of an absolute path; None if a parent is missing."""
        parts = [p for p in path.split(b"/") if p]
        if not parts:
            return None
        parent = ROOT
        for part in parts[:-1]:
            child = self._child(parent, part)
            if child is None or not stat.S_ISDIR(self.getattr(child).mode):
                return None
            parent = child
        return parent, parts[-1], self._child(parent, parts[-1])

    def make_parents(self, path: bytes) -> InodeId | None:
        """The parent directory of ``path``, made (0755) where missing; None if a non-directory is in the way."""
        parent = ROOT
        for part in [p for p in path.split(b"/") if p][:-1]:
            child = self._child(parent, part)
            if child is None:
                child = self.mkdir(parent, part, 0o755, os.getuid(), os.getgid()).ino
                self._lookups[child] -= 1  # no kernel reference: nobody looked it up
            elif not stat.S_ISDIR(self.getattr(child).mode):
                return None
            parent = child
        return parent

    def remove_entry(self, parent: InodeId, name: bytes) -> bool:
        """Remove a file, symlink or empty directory (an open file stays readable through its handle).
        False if it is a directory that is not empty."""
        ino = self._child(parent, name)
        if ino is None:
            return True
        if stat.S_ISDIR(self.getattr(ino).mode):
            if not self._is_empty(ino):
                return False
            self._unlink_entry(parent, name, ino, True)
        else:
            self._unlink_entry(parent, name, ino, False)
        return True

    def new_entry(self, parent: InodeId, name: bytes, mode: int, uid: int, gid: int, target: bytes | None) -> InodeId:
        """A new inode no kernel has looked up (a file is empty until its version is imported)."""
        ino = self._new_inode(parent, name, mode, uid, gid, target).ino
        self._lookups[ino] -= 1
        return ino

    def _names_up(self, ino: InodeId, limit: int) -> tuple[list[bytes], bool]:
        """The names from the root down to ``ino`` (its first entry at each level, at most ``limit``), and
        whether the walk reached the root (False: unlinked on the way)."""
        names: list[bytes] = []
        while ino != ROOT and len(names) < limit:
            row = self.db.one("SELECT parent, name FROM dirents WHERE inode=? LIMIT 1", (ino,))
            if row is None:
                return names[::-1], False
            names.append(bytes(row[1]))
            ino = InodeId(int(row[0]))
        return names[::-1], True

    def path_of(self, ino: InodeId) -> str:
        """A path of ``ino`` from the root (its first entry at each level), for messages."""
        names, rooted = self._names_up(ino, 256)
        text = "/".join(n.decode(errors="replace") for n in names)
        return ("/" if rooted else "(unlinked)/") + text

    def purge_orphans(self) -> int:
        """At start-up: purge inodes no directory entry refers to (unlinked while open before a stop)."""
        rows = self.db.execute("SELECT id FROM inodes WHERE nlink <= 0 AND id <> ?", (ROOT,)).fetchall()
        for (ino,) in rows:
            self._maybe_purge(InodeId(ino))
        return len(rows)

    # -- rename --------------------------------------------------------------------------------

    async def durable_before_replace(
        self, p_old: InodeId, n_old: bytes, p_new: InodeId, n_new: bytes, exchange: bool
    ) -> None:
        """Before a rename replaces a regular file: make the replacing file's staged content durable
        (fsync + mark; may await), as ext4's ``auto_da_alloc`` does for the tmp + rename pattern.
        Otherwise a power cut after the rename's commit shows neither the old content (its inode is
        gone with the rename) nor the new one (never durable): the path would lose a durable version."""
        src, dst = self._child(p_old, n_old), self._child(p_new, n_new)
        if src is None or dst is None or src == dst or not stat.S_ISREG(self.getattr(dst).mode):
            return
        for ino in (src, dst) if exchange else (src,):
            if self.contents.undurable(ino):
                await self.contents.fsync(ino)

    def rename(
        self, p_old: InodeId, n_old: bytes, p_new: InodeId, n_new: bytes, noreplace: bool, exchange: bool
    ) -> None:
        _check_name(n_new)
        self._dir(p_new)
        src = self._child(p_old, n_old)
        if src is None:
            raise PosixError(errno.ENOENT)
        dst = self._child(p_new, n_new)
        if dst == src:
            return
        src_dir = stat.S_ISDIR(self.getattr(src).mode)
        now = time.time_ns()
        if exchange:
            if dst is None:
                raise PosixError(errno.ENOENT)
            dst_dir = stat.S_ISDIR(self.getattr(dst).mode)
            with self.db.transaction() as c:  # atomic: no await until commit
                c.execute("UPDATE dirents SET inode=? WHERE parent=? AND name=?", (dst, p_old, n_old))
                c.execute("UPDATE dirents SET inode=? WHERE parent=? AND name=?", (src, p_new, n_new))
                if src_dir != dst_dir and p_old != p_new:
                    d = 1 if src_dir else -1
                    c.execute("UPDATE inodes SET nlink=nlink+? WHERE id=?", (d, p_new))
                    c.execute("UPDATE inodes SET nlink=nlink-? WHERE id=?", (d, p_old))
                c.execute("UPDATE inodes SET ctime_ns=? WHERE id IN (?,?)", (now, src, dst))
                c.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id IN (?,?)", (now, now, p_old, p_new))
            return
        if dst is not None:
            if noreplace:
                raise PosixError(errno.EEXIST)
            dst_dir = stat.S_ISDIR(self.getattr(dst).mode)
            if src_dir and not dst_dir:
                raise PosixError(errno.ENOTDIR)
            if dst_dir and not src_dir:
                raise PosixError(errno.EISDIR)
            if dst_dir and not self._is_empty(dst):
                raise PosixError(errno.ENOTEMPTY)
        with self.db.transaction() as c:  # atomic: no await until commit
            if dst is not None:
                c.execute("DELETE FROM dirents WHERE parent=? AND name=?", (p_new, n_new))
                c.execute(
                    "UPDATE inodes SET nlink=CASE WHEN ? THEN 0 ELSE nlink-1 END, ctime_ns=? WHERE id=?",
                    (dst_dir, now, dst),
                )
                if src_dir:  # the replaced empty directory's '..' link goes away
                    c.execute("UPDATE inodes SET nlink=nlink-1 WHERE id=?", (p_new,))
            c.execute("UPDATE dirents SET parent=?, name=? WHERE parent=? AND name=?", (p_new, n_new, p_old, n_old))
            if src_dir and p_old != p_new:
                c.execute("UPDATE inodes SET nlink=nlink-1 WHERE id=?", (p_old,))
                c.execute("UPDATE inodes SET nlink=nlink+1 WHERE id=?", (p_new,))
            c.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (now, src))
            c.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id IN (?,?)", (now, now, p_old, p_new))
        if dst is not None:
            self._maybe_purge(dst)

    # -- directories ---------------------------------------------------------------------------

    def readdir(self, ino: InodeId, start: int) -> list[tuple[bytes, Attr, int]]:
        """Entries after offset ``start`` as (name, attributes, next offset)."""
        rows = self.db.execute(
            "SELECT id, name, inode FROM dirents WHERE parent=? AND id>? ORDER BY id LIMIT 1000", (ino, start)
        ).fetchall()
        return [(bytes(name), self.getattr(InodeId(child)), int(did)) for did, name, child in rows]

    # -- open files ----------------------------------------------------------------------------

    async def open(self, ino: InodeId, flags: int) -> int:
        """Open a file; for writing, the file gets a staged version first (may await, see FileContents)."""
        attr = self.getattr(ino)
        if stat.S_ISDIR(attr.mode):
            raise PosixError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        handle = Handle(ino, writable)
        self._opens[ino] += 1
        try:
            if writable:
                keep = 0 if flags & os.O_TRUNC else None
                handle.active = await self.contents.open_write(ino, keep)
                if flags & os.O_TRUNC:  # POSIX: O_TRUNC marks mtime and ctime for update
                    now = time.time_ns()
                    self.db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, ino))
            elif flags & os.O_TRUNC:
                raise PosixError(errno.EACCES)
        except BaseException:
            self._opens[ino] -= 1
            raise
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise PosixError(errno.EBADF)
        return h

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handle(fh)
        return await self.contents.read(h.inode, off, size, f"inode {h.inode}")

    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Checkpoints only while an fsync of the same file is hashing it (``FileContents.write``)."""
        h = self.handle(fh)
        if h.active is None:
            raise PosixError(errno.EBADF)
        h.wrote = True
        return await self.contents.write(h.active, off, data)

    def flush(self, fh: int) -> None:
        """close(2) of a descriptor of the handle: the writes so far change the file's times now. FUSE
        sends the release after close() has returned, so a reader that opens the file at once would
        cache pages under the old mtime, and the kernel would drop them once it saw the new one."""
        self._touch(self.handle(fh))

    def _touch(self, h: Handle) -> None:
        if h.wrote:
            h.wrote = False
            now = time.time_ns()
            self.db.execute("UPDATE inodes SET mtime_ns=?, ctime_ns=? WHERE id=?", (now, now, h.inode))

    def release(self, fh: int) -> None:
        """Close a handle; the last writer seals the version (no checkpoint)."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        self._touch(h)  # writes after the last flush (mmap write-back)
        if h.writable:
            self.contents.release_write(h.inode)
        self._opens[h.inode] -= 1
        if self._opens[h.inode] <= 0:
            del self._opens[h.inode]
            self._maybe_purge(h.inode)

    async def fsync(self, fh: int) -> None:
        await self.contents.fsync(self.handle(fh).inode)

    async def sync_namespace(self) -> None:
        """fsync(2) of a directory: every namespace change so far (create, rename, unlink, ...) is durable
        once the WAL is synced. Checkpoints."""
        await self.contents.sync_metadata()

    def being_written(self, ino: InodeId) -> bool:
        return self.contents.being_written(ino)

    def paths_of(self, ino: InodeId) -> list[bytes]:
        """Every path of ``ino`` (one per hard link), absolute, as bytes."""
        out = []
        for parent, name in self.db.execute("SELECT parent, name FROM dirents WHERE inode=?", (ino,)).fetchall():
            names, rooted = self._names_up(InodeId(int(parent)), 4096)
            if rooted:
                out.append(b"/" + b"/".join([*names, bytes(name)]))
        return out

    def state(self, ino: InodeId) -> VersionState | None:
        return self.contents.state(ino)

    # -- extended attributes -------------------------------------------------------------------

    def getxattr(self, ino: InodeId, name: bytes) -> bytes | None:
        row = self.db.one("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name))
        return None if row is None else bytes(row[0])

    def setxattr(self, ino: InodeId, name: bytes, value: bytes) -> None:
        self.getattr(ino)
        self.db.execute("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?,?,?)", (ino, name, value))
        self.db.execute("UPDATE inodes SET ctime_ns=? WHERE id=?", (time.time_ns(), ino))

    def listxattr(self, ino: InodeId) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.execute("SELECT name FROM xattrs WHERE inode=?", (ino,))]

    def removexattr(self, ino: InodeId, name: bytes) -> bool:
        cur = self.db.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name))
        return cur.rowcount > 0
