"""``pyfuse3.Operations`` for ckptfs: a thin adapter over ``namespace.Tree``.

This is the only module that raises ``pyfuse3.FUSEError``. Every handler goes through ``_edge``,
which maps ckptfs errors to errnos with one table and answers EIO for anything unexpected — after
putting the daemon in failsafe mode (``health``) — so no exception can end ``pyfuse3.main`` and
unmount the filesystem under a running trainer.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, RequestContext, XAttrNameT

from ckptfs import failpoints
from ckptfs.errors import CacheFull, CorruptChunk, Failsafe, NotFound, NotInStore, PosixError
from ckptfs.health import Health, is_fatal
from ckptfs.namespace import ROOT, Attr, Tree
from ckptfs.types import InodeId

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
Handler = Callable[P, Coroutine[Any, Any, R]]

_STATE_XATTR = b"user.ckptfs.state"
_FAILSAFE_XATTR = b"user.ckptfs.failsafe"  # on the root, only while in failsafe mode
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
_ERRNO_OF: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, errno.ENOENT),
    (CacheFull, errno.ENOSPC),
    (CorruptChunk, errno.EIO),
    (NotInStore, errno.EIO),
)


def _errno_for(exc: BaseException) -> int:
    if isinstance(exc, PosixError):
        return exc.errno
    for cls, code in _ERRNO_OF:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return errno.ENOSPC
    return 0


def _edge(*, writes: bool = False) -> Callable[[Handler[P, R]], Handler[P, R]]:
    """Translate every exception a handler raises into a ``FUSEError``. One the daemon cannot go on
    after (``health.is_fatal``: a bug, unwritable metadata, a cache-disk I/O error) also puts it in
    failsafe mode; there, handlers that ``writes`` answer EIO before doing anything."""

    def deco(fn: Handler[P, R]) -> Handler[P, R]:
        name = fn.__name__

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            health: Health = args[0].health  # type: ignore[attr-defined]
            try:
                failpoints.hit(f"handler:{name}")
                if writes:
                    health.check()
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Failsafe:
                raise pyfuse3.FUSEError(errno.EIO) from None
            except Exception as exc:
                code = _errno_for(exc)
                if code == 0 or is_fatal(exc):
                    health.trip(f"unexpected error in the {name} handler", exc)
                    code = errno.EIO
                elif code in (errno.EIO, errno.ENOSPC):
                    log.warning("%s: %s", name, exc)
                raise pyfuse3.FUSEError(code) from None

        return wrapper

    return deco


def direct_writes_supported(release: str) -> bool:
    """Does this kernel (``os.uname().release``) drop cached pages under a FOPEN_DIRECT_IO write? Since
    6.6 (``fuse_direct_io``: ``invalidate_inode_pages2_range``); before, a reader's kept pages could go
    stale."""
    parts = release.split(".")
    try:
        major, minor = int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (6, 6)


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = InodeT(attr.ino)
    e.generation = 0
    e.entry_timeout = 1.0
    e.attr_timeout = 1.0
    e.st_mode = ModeT(attr.mode)
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = 131072
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


class Operations(pyfuse3.Operations):
    """The FUSE handlers. Known gaps: see ``namespace.tree``'s docstring."""

    # Measured: with the kernel's writeback cache a 100 MB sequential write into the mount took 2-3x
    # longer (pages are copied into the page cache, then written back to us in 128 KiB-1 MiB pieces)
    # than without it, where each write(2) reaches us directly in pieces of up to 1 MiB.
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(
        self,
        tree: Tree,
        statfs_path: str,
        health: Health,
        remote_fsync: Callable[[list[bytes]], Awaitable[None]] | None = None,
        direct_writes: bool = False,
    ) -> None:
        super().__init__()
        self.tree = tree
        self.statfs_path = statfs_path
        self.health = health
        # upload.fsync_remote: fsync(2) of a closed file's fd returns once its paths are in the store
        self.remote_fsync = remote_fsync
        self.direct_writes = direct_writes

    def _direct(self, flags: int) -> bool:
        """``mount.direct_writes``: a write-only open (``torch.save``'s ``"wb"``) bypasses the kernel's page
        cache (FOPEN_DIRECT_IO): each write(2) reaches us straight from the writer's pages instead of
        being copied into the mount's page cache first — a checkpoint no longer occupies that memory
        twice (here and in the staging file), and a 300 MB save took 3-4x less time. Reads through other
        handles keep the cache: the kernel drops the cached pages of each range a direct write covers
        (since 6.6, which ``direct_writes_supported`` checks). Not for O_RDWR: a direct-io file cannot be
        mmap()ed shared."""
        return self.direct_writes and (flags & os.O_ACCMODE) == os.O_WRONLY

    @_edge()
    async def lookup(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(self.tree.lookup(InodeId(parent_inode), bytes(name)))

    @_edge()
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        if not self.health.failsafe:  # a forget may purge a deleted file: a write
            self.tree.forget([(InodeId(i), n) for i, n in inode_list])

    @_edge()
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(self.tree.getattr(InodeId(inode)))

    @_edge(writes=True)
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> pyfuse3.EntryAttributes:
        new = await self.tree.setattr(
            InodeId(inode),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return _entry(new)

    @_edge()
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return FileNameT(self.tree.readlink(InodeId(inode)))

    @_edge(writes=True)
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(self.tree.mknod(InodeId(parent_inode), bytes(name), mode & ~ctx.umask, rdev, ctx.uid, ctx.gid))

    @_edge(writes=True)
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(self.tree.mkdir(InodeId(parent_inode), bytes(name), mode & ~ctx.umask, ctx.uid, ctx.gid))

    @_edge(writes=True)
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.tree.unlink(InodeId(parent_inode), bytes(name))

    @_edge(writes=True)
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self.tree.rmdir(InodeId(parent_inode), bytes(name))

    @_edge(writes=True)
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(self.tree.symlink(InodeId(parent_inode), bytes(name), bytes(target), ctx.uid, ctx.gid))

    @_edge(writes=True)
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        if not flags & pyfuse3.RENAME_NOREPLACE:
            await self.tree.durable_before_replace(
                InodeId(parent_inode_old),
                bytes(name_old),
                InodeId(parent_inode_new),
                bytes(name_new),
                exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
            )
        self.tree.rename(
            InodeId(parent_inode_old),
            bytes(name_old),
            InodeId(parent_inode_new),
            bytes(name_new),
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
        )

    @_edge(writes=True)
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(self.tree.link(InodeId(inode), InodeId(new_parent_inode), bytes(new_name)))

    @_edge()
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> pyfuse3.FileInfo:
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self.health.check()
        # keep_cache: the kernel keeps the file's pages across opens. Safe because an inode's bytes change
        # only through this kernel's writes and truncates (which update its pages); ingest never changes
        # them, and another node's version of a path arrives as a new inode (tier.refresh).
        fh = await self.tree.open(InodeId(inode), flags)
        return pyfuse3.FileInfo(fh=FileHandleT(fh), keep_cache=True, direct_io=self._direct(flags))

    @_edge(writes=True)
    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.tree.create(
            InodeId(parent_inode), bytes(name), mode & ~ctx.umask, flags, ctx.uid, ctx.gid
        )
        return pyfuse3.FileInfo(fh=FileHandleT(fh), direct_io=self._direct(flags)), _entry(attr)

    @_edge()
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return await self.tree.read(fh, off, size)

    @_edge(writes=True)
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self.tree.write(fh, off, buf)

    @_edge()
    async def flush(self, fh: FileHandleT) -> None:
        self.tree.flush(fh)  # data is in the staging file already; sealing happens at release

    @_edge()
    async def release(self, fh: FileHandleT) -> None:
        self.tree.release(fh)

    @_edge(writes=True)
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.tree.fsync(fh)
        ino = self.tree.handle(fh).inode
        if self.remote_fsync is not None and not self.tree.being_written(ino):
            # (a file still open for writing cannot be ingested, let alone uploaded, before its last close:
            # that fsync returns at local durability)
            await self.remote_fsync(self.tree.paths_of(ino))

    @_edge()
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        if not stat.S_ISDIR(self.tree.getattr(InodeId(inode)).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return FileHandleT(inode)

    @_edge()
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, next_id in self.tree.readdir(InodeId(fh), start_id):
            if not pyfuse3.readdir_reply(token, FileNameT(name), _entry(attr), next_id):
                return
            self.tree.add_ref(attr.ino)  # readdirplus: the kernel now holds a reference

    @_edge()
    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    @_edge(writes=True)
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.tree.sync_namespace()

    @_edge()
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.statfs_path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = 255
        return out

    @_edge()
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        ino = InodeId(inode)
        if bytes(name) == _FAILSAFE_XATTR and ino == ROOT and self.health.failsafe:
            return self.health.describe().encode()
        if bytes(name) == _STATE_XATTR:
            state = self.tree.state(ino)
            if state is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return state.value.encode()
        value = self.tree.getxattr(ino, bytes(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_edge(writes=True)
    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext) -> None:
        if bytes(name) == _STATE_XATTR:
            return  # a copy of the state (cp -a, rsync -X of a copy) coming back: ignored, it is computed
        if bytes(name).startswith(b"user.ckptfs."):
            raise pyfuse3.FUSEError(errno.EPERM)
        if bytes(name).startswith(b"system.posix_acl_"):
            # ACLs are not enforced here; storing one as a plain xattr made cp -p drop the group and
            # other bits (0644 -> 0600). Refusing it makes cp fall back to chmod.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if len(name) > _XATTR_NAME_MAX:
            raise pyfuse3.FUSEError(errno.ERANGE)
        if len(value) > _XATTR_SIZE_MAX:
            raise pyfuse3.FUSEError(errno.E2BIG)
        self.tree.setxattr(InodeId(inode), bytes(name), bytes(value))

    @_edge()
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        # user.ckptfs.state is readable but not listed: cp -a and rsync -X would copy it elsewhere
        return [XAttrNameT(n) for n in self.tree.listxattr(InodeId(inode))]

    @_edge(writes=True)
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        if bytes(name).startswith(b"user.ckptfs."):
            raise pyfuse3.FUSEError(errno.EPERM)
        if not self.tree.removexattr(InodeId(inode), bytes(name)):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
