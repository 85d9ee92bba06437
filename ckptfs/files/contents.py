"""File contents: which version an inode shows, staged writes, sealing, and reads.

Trio thread only. Await points and what holds across them are stated per method. The rules:

* An inode's content is either its *staged* version (an ``Active`` entry: a staging file that is
  the content) or its committed version (extents in SQLite), or nothing (empty file).
* Writes go to the staging file with ``pwrite`` inline: page-cache writes are fast and doing them
  without a checkpoint keeps the ordering of FUSE writes trivially correct.
* A version is *sealed* when its last writer releases it; sealed versions are handed to the
  ingester. Every modification bumps ``gen``, and an ingest commits only if ``gen`` is unchanged
  and nobody has the file open for writing; otherwise it discards its result, and the next
  release hands the version to the ingester again.
* Thread work on a staging file always uses its own ``dup()`` of the fd, so closing an ``Active``
  can never hand a recycled fd to a running thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ckptfs.cache import ChunkCache
from ckptfs.errors import CacheFull
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.reader import ChunkReader, fetch_and_decode
from ckptfs.files.staging import StagingArea
from ckptfs.files.workers import Workers
from ckptfs.meta import Database
from ckptfs.types import ChunkId, InodeId, VersionId, VersionState

log = logging.getLogger(__name__)
_SPACE_CHECK_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class Active:
    """A staged version held open by the daemon."""

    version: VersionId
    inode: InodeId
    fd: int
    staging: str
    size: int
    writers: int = 0
    gen: int = 0
    dirty: bool = False  # written since the last seal


def _materialize(cache: ChunkCache, fd: int, extents: list[tuple[int, int, bytes]], upto: int) -> None:
    """Worker thread: write the first ``upto`` bytes of a committed version into staging fd ``fd``."""
    try:
        for off, _length, cid in extents:
            if off >= upto:
                break
            data = fetch_and_decode(cache, ChunkId(cid))[: upto - off]
            os.pwrite(fd, data, off)
        os.ftruncate(fd, upto)
    finally:
        os.close(fd)


def _fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileContents:
    def __init__(
        self,
        db: Database,
        staging: StagingArea,
        chunks: ChunkIndex,
        reader: ChunkReader,
        workers: Workers,
        reserve_bytes: int,
        on_sealed: Callable[[InodeId, VersionId], None],
    ) -> None:
        self.db = db
        self.staging = staging
        self.chunks = chunks
        self.reader = reader
        self.workers = workers
        self.reserve_bytes = reserve_bytes
        self.on_sealed = on_sealed
        self.active: dict[InodeId, Active] = {}
        self._locks: dict[InodeId, trio.Lock] = {}
        self._since_space_check = _SPACE_CHECK_BYTES
        self._space_low = True
        self._gens = itertools.count(1)  # modification stamps, unique across all versions
        self.last_write = -math.inf  # time.monotonic() of the latest write (background re-encoding yields)

    # -- queries -------------------------------------------------------------------------------

    def size(self, inode: InodeId) -> int | None:
        """Size of a staged file as the daemon sees it now, or None when not staged."""
        act = self.active.get(inode)
        return None if act is None else act.size

    def state(self, inode: InodeId) -> VersionState | None:
        if inode in self.active:
            return VersionState.STAGED
        row = self.db.one("SELECT v.state FROM inodes i JOIN versions v ON v.id = i.version WHERE i.id=?", (inode,))
        return None if row is None else VersionState(str(row[0]))

    # -- writing -------------------------------------------------------------------------------

    def _lock(self, inode: InodeId) -> trio.Lock:
        lock = self._locks.get(inode)
        if lock is None:
            lock = self._locks[inode] = trio.Lock()
        return lock

    async def open_write(self, inode: InodeId, keep: int | None) -> Active:
        """Make sure ``inode`` has a staged version and count one writer on it.

        ``keep``: how many bytes of the current content to keep (None = all, 0 for O_TRUNC).
        Checkpoints while copying committed content into the new staging file (under a per-inode
        lock; the new version is not visible until that copy is complete).
        """
        async with self._lock(inode):
            act = self.active.get(inode)
            if act is not None:
                act.writers += 1
                if keep is not None and keep < act.size:
                    self._truncate_active(act, keep)
                return act
            row = self.db.one(
                "SELECT i.version, i.size, v.state FROM inodes i LEFT JOIN versions v ON v.id=i.version WHERE i.id=?",
                (inode,),
            )
            assert row is not None, f"inode {inode} vanished"
            old_vid, old_size = row[0], int(row[1])
            upto = old_size if keep is None else min(keep, old_size)
            self._check_space(upto)
            now = time.time_ns()
            with self.db.transaction() as c:  # atomic: no await until commit
                vid = VersionId(
                    c.execute(
                        "INSERT INTO versions (inode, state, size, staging, created_ns) VALUES (?,?,?,?,?)",
                        (inode, VersionState.STAGED.value, upto, "", now),
                    ).lastrowid
                    or 0
                )
                name = self.staging.name(vid)
                c.execute("UPDATE versions SET staging=? WHERE id=?", (name, vid))
            fd = self.staging.create(vid)
            act = Active(vid, inode, fd, name, upto, writers=1, dirty=True)
            if old_vid is not None and upto > 0:
                ext = self.db.execute(
                    "SELECT offset, length, chunk FROM extents WHERE version=? ORDER BY offset", (old_vid,)
                ).fetchall()
                try:
                    await self.workers.run_foreground(_materialize, self.chunks.cache, os.dup(fd), ext, upto)
                except BaseException:
                    os.close(fd)
                    self.staging.remove(name)
                    self.db.execute("DELETE FROM versions WHERE id=?", (vid,))
                    raise
            # atomic: the new version becomes the inode's content in one step
            self.db.execute("UPDATE inodes SET version=?, size=? WHERE id=?", (vid, upto, inode))
            self.active[inode] = act
            return act

    def _check_space(self, incoming: int) -> None:
        """Refuse data that would eat into the reserve kept for metadata and ingest (checked on every
        write once free space is within 4 check intervals of the reserve, else every 8 MiB)."""
        st = os.statvfs(self.staging.root)
        free = st.f_bavail * st.f_frsize
        self._space_low = free < self.reserve_bytes + 4 * _SPACE_CHECK_BYTES
        if free < self.reserve_bytes + incoming:
            raise CacheFull("cache disk is full")

    def write(self, act: Active, off: int, data: bytes) -> int:
        """Write into the staging file. No checkpoint. Raises ``CacheFull`` or ``OSError``."""
        self._since_space_check += len(data)
        if self._since_space_check >= _SPACE_CHECK_BYTES or self._space_low:
            self._since_space_check = 0
            self._check_space(len(data))
        try:
            n = os.pwrite(act.fd, data, off)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull("cache disk is full") from exc
            raise
        act.gen = next(self._gens)
        act.dirty = True
        self.last_write = time.monotonic()
        if off + n > act.size:
            act.size = off + n
        return n

    def _truncate_active(self, act: Active, size: int) -> None:
        os.ftruncate(act.fd, size)
        act.size = size
        act.gen = next(self._gens)
        act.dirty = True

    async def truncate(self, inode: InodeId, size: int) -> None:
        """Set the file size (truncate(2)); seals at once when nobody has the file open for writing."""
        act = await self.open_write(inode, keep=size)
        if size > act.size:
            self._check_space(0)
            self._truncate_active(act, size)
        elif size < act.size:
            self._truncate_active(act, size)
        self.release_write(inode)

    def release_write(self, inode: InodeId) -> None:
        """One writer is done. Seals the version (persist size, hand to ingest) when it was the last."""
        act = self.active.get(inode)
        if act is None:
            return
        act.writers -= 1
        if act.writers == 0:
            if act.dirty:
                self.seal(act)
            else:  # unchanged, but an ingest may have given up while it was open: queue it again
                self.on_sealed(act.inode, act.version)

    def seal(self, act: Active) -> None:
        """Persist the staged version's size and hand it to the ingester. No checkpoint."""
        act.dirty = False
        with self.db.transaction() as c:  # atomic: no await until commit
            c.execute("UPDATE versions SET size=? WHERE id=?", (act.size, act.version))
            c.execute("UPDATE inodes SET size=? WHERE id=?", (act.size, act.inode))
        self.on_sealed(act.inode, act.version)

    async def fsync(self, inode: InodeId) -> None:
        """Make the staged bytes and the metadata naming them durable on the cache disk."""
        act = self.active.get(inode)
        if act is not None:
            with self.db.transaction() as c:
                c.execute("UPDATE versions SET size=? WHERE id=?", (act.size, act.version))
                c.execute("UPDATE inodes SET size=? WHERE id=?", (act.size, act.inode))
            await self.workers.run_foreground(_fsync_fd, os.dup(act.fd))
            await self.workers.run_foreground(self.staging.sync_dir)
        self.db.checkpoint()

    # -- reading -------------------------------------------------------------------------------

    async def read(self, inode: InodeId, off: int, size: int, what: str) -> bytes:
        """Read from the staged file (inline pread, no checkpoint) or from committed chunks."""
        act = self.active.get(inode)
        if act is not None:
            if off >= act.size:
                return b""
            return os.pread(act.fd, min(size, act.size - off), off)
        row = self.db.one("SELECT version, size FROM inodes WHERE id=?", (inode,))
        if row is None or row[0] is None:
            return b""
        return await self.reader.read(VersionId(int(row[0])), int(row[1]), off, size, what)

    # -- ingest hand-off -----------------------------------------------------------------------

    def ingest_snapshot(self, inode: InodeId, vid: VersionId) -> tuple[int, int, int] | None:
        """For the ingester: (dup'd fd, size, gen) of a sealed version, or None if it is not ingestible now."""
        act = self.active.get(inode)
        if act is None or act.version != vid or act.writers > 0 or act.dirty:
            return None
        return os.dup(act.fd), act.size, act.gen

    def is_sealed(self, inode: InodeId, vid: VersionId) -> bool:
        act = self.active.get(inode)
        return act is not None and act.version == vid and act.writers == 0 and not act.dirty

    def still_sealed(self, inode: InodeId, vid: VersionId, gen: int) -> bool:
        act = self.active.get(inode)
        return act is not None and act.version == vid and act.gen == gen and act.writers == 0

    def finish_ingest(self, inode: InodeId) -> str:
        """The version was committed: forget its staging file, and return its name. The caller deletes
        it once the commit is durable (``Database.sync_wal``): until then, a power loss could undo the
        commit and leave the version staged. No checkpoint."""
        act = self.active.pop(inode)
        os.close(act.fd)
        self._locks.pop(inode, None)
        return act.staging

    # -- lifecycle -----------------------------------------------------------------------------

    def drop(self, inode: InodeId) -> None:
        """Delete every version of a purged inode and collect chunks nothing references any more."""
        act = self.active.pop(inode, None)
        if act is not None:
            os.close(act.fd)
            self.staging.remove(act.staging)
        touched: list[ChunkId] = []
        with self.db.transaction() as c:  # atomic: no await until commit
            for (vid,) in c.execute("SELECT id FROM versions WHERE inode=?", (inode,)).fetchall():
                touched += self.chunks.drop_version_refs(c, vid)
                c.execute("DELETE FROM versions WHERE id=?", (vid,))
                self.reader.forget_version(VersionId(vid))
        self._locks.pop(inode, None)
        self.chunks.collect(touched)

    def recover(self) -> list[Active]:
        """At start-up: reopen staged versions (their staging file is their content). No checkpoint."""
        recovered = []
        rows = self.db.execute(
            "SELECT v.id, v.inode, v.staging FROM versions v JOIN inodes i ON i.version = v.id WHERE v.state=?",
            (VersionState.STAGED.value,),
        ).fetchall()
        for vid, inode, name in rows:
            try:
                fd = self.staging.open(name)
            except FileNotFoundError:
                log.error("staging file %s of inode %d is missing; the file reads as empty", name, inode)
                with self.db.transaction() as c:
                    c.execute("UPDATE inodes SET version=NULL, size=0 WHERE id=?", (inode,))
                    c.execute("DELETE FROM versions WHERE id=?", (vid,))
                continue
            size = os.fstat(fd).st_size
            with self.db.transaction() as c:
                c.execute("UPDATE versions SET size=? WHERE id=?", (size, vid))
                c.execute("UPDATE inodes SET size=? WHERE id=?", (size, inode))
            act = Active(VersionId(vid), InodeId(inode), fd, name, size)
            self.active[act.inode] = act
            recovered.append(act)
        # Versions that are no inode's current content (superseded before a crash) are garbage.
        stale = self.db.execute(
            "SELECT id, staging, state FROM versions WHERE id NOT IN"
            " (SELECT version FROM inodes WHERE version IS NOT NULL)"
        ).fetchall()
        for vid, name, state in stale:
            with self.db.transaction() as c:
                self.chunks.drop_version_refs(c, vid)
                c.execute("DELETE FROM versions WHERE id=?", (vid,))
            if state == VersionState.STAGED.value and name:
                self.staging.remove(name)
        known = {a.staging for a in self.active.values()}
        for name in self.staging.names():
            if name not in known:
                self.staging.remove(name)
        return recovered
