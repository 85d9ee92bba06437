"""File contents: which version an inode shows, staged writes, sealing, durability, reads, recovery.

Trio thread only. Await points and what holds across them are stated per method. The rules:

* An inode's content is either its *staged* version (an ``Active`` entry: a staging file that is
  the content) or its committed version (extents in SQLite), or nothing (empty file).
* Writes go to the staging file with ``pwrite`` inline: page-cache writes are fast and doing them
  without a checkpoint keeps the ordering of FUSE writes trivially correct. They wait only while a
  foreground ``fsync`` of the same file hashes it.
* A version is *sealed* when its last writer releases it; sealed versions are handed to the
  ingester and to the durable marker. Every modification bumps ``gen``, and an ingest commits only
  if ``gen`` is unchanged and nobody has the file open for writing; otherwise it discards its result,
  and the next release hands the version to the ingester again.
* A new version never replaces the previous durable one in the metadata until it is durable itself
  (``meta.versions``): after a power cut the path goes back to it. So opening a file whose staged
  version already has a durable mark copies it into a new staged version rather than writing into
  the marked bytes.
* Thread work on a staging file always uses its own ``dup()`` of the fd, so closing an ``Active``
  can never hand a recycled fd to a running thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable

import trio
import xxhash

from ckptfs.cache import ChunkCache
from ckptfs.errors import CacheFull, FileChanged, MetadataUnwritable
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.durable import Active, DurableMarker, hash_prefix
from ckptfs.files.reader import ChunkReader, fetch_and_decode
from ckptfs.files.reclaim import Reclaimer
from ckptfs.files.staging import StagingArea
from ckptfs.files.workers import Workers
from ckptfs.meta import Database, VersionRow
from ckptfs.types import ChunkId, InodeId, VersionId, VersionState

log = logging.getLogger(__name__)
_SPACE_CHECK_BYTES = 8 * 1024 * 1024
_EMPTY_HASH = xxhash.xxh3_128_digest(b"")

__all__ = ["Active", "FileContents"]


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


def _copy_prefix(src: int, dst: int, upto: int) -> None:
    """Worker thread: copy the first ``upto`` bytes of staging fd ``src`` into ``dst`` (in the kernel where
    it can). Closes both."""
    try:
        pos = 0
        while pos < upto:
            try:
                n = os.copy_file_range(src, dst, upto - pos, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                block = os.pread(src, min(upto - pos, 4 << 20), pos)
                n = os.pwrite(dst, block, pos) if block else 0
            if n <= 0:
                raise FileChanged(f"staging file ended at {pos} of {upto} bytes while copied")
            pos += n
        os.ftruncate(dst, upto)
    finally:
        os.close(src)
        os.close(dst)


class FileContents:
    def __init__(
        self,
        db: Database,
        staging: StagingArea,
        chunks: ChunkIndex,
        reader: ChunkReader,
        workers: Workers,
        marker: DurableMarker,
        reclaimer: Reclaimer,
        reserve_bytes: int,
        on_sealed: Callable[[InodeId, VersionId], None],
    ) -> None:
        self.db = db
        self.versions = marker.versions
        self.staging = staging
        self.chunks = chunks
        self.reader = reader
        self.workers = workers
        self.marker = marker
        self.reclaimer = reclaimer
        self.reserve_bytes = reserve_bytes
        self.on_sealed = on_sealed
        self.active: dict[InodeId, Active] = {}
        self._syncing: set[InodeId] = set()  # committed, WAL not synced yet: still reported 'staged'
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

    def being_written(self, inode: InodeId) -> bool:
        """Is the inode's staged version open for writing (it cannot be ingested before the last close)?"""
        act = self.active.get(inode)
        return act is not None and act.writers > 0

    def undurable(self, inode: InodeId) -> bool:
        """Does the inode show a staged version that a power cut would not bring back?"""
        act = self.active.get(inode)
        return act is not None and not act.durable

    def state(self, inode: InodeId) -> VersionState | None:
        """``staged`` until the version's ``local`` commit is durable, then ``local``."""
        if inode in self.active or inode in self._syncing:
            return VersionState.STAGED
        return self.versions.current(inode)[2]

    # -- writing -------------------------------------------------------------------------------

    def _lock(self, inode: InodeId) -> trio.Lock:
        lock = self._locks.get(inode)
        if lock is None:
            lock = self._locks[inode] = trio.Lock()
        return lock

    def _release_lock(self, inode: InodeId) -> None:
        lock = self._locks.get(inode)
        if lock is not None and not lock.locked():
            del self._locks[inode]

    def first_version_in(self, conn: sqlite3.Connection, inode: InodeId) -> Active:
        """Inside the transaction that creates ``inode`` (a new regular file): its first staged version,
        current at once, and an empty staging file. One change, so a power cut never leaves the file
        without a version (which would read as a durable empty file instead of going to lost+found).
        The caller hands the result to ``adopt`` once the transaction committed, else to ``abandon``."""
        self._check_space(0)
        vid = self.versions.create_staged_in(conn, inode, 0, time.time_ns(), self.staging.name, current=True)
        fd = self.staging.create(vid)
        return Active(vid, inode, fd, self.staging.name(vid), 0, dirty=True)

    def adopt(self, act: Active) -> None:
        """A new file's first version is committed: it is the inode's staged content."""
        self.active[act.inode] = act

    def abandon(self, act: Active) -> None:
        """A new file's creation was rolled back: drop its staging file."""
        os.close(act.fd)
        self.staging.remove(act.staging)

    async def open_write(self, inode: InodeId, keep: int | None) -> Active:
        """Make sure ``inode`` has a staged version and count one writer on it.

        ``keep``: how many bytes of the current content to keep (None = all, 0 for O_TRUNC). Checkpoints
        while copying the current content into a new staging file (under a per-inode lock; the new
        version is not visible until that copy is complete). The previous version stays in the metadata
        as the fallback a power cut returns to, until the new one is durable.
        """
        async with self._lock(inode):
            act = self.active.get(inode)
            while act is not None and act.fsyncing is not None:
                await act.fsyncing.wait()
                act = self.active.get(inode)
            if act is not None and (act.writers > 0 or act.marked_gen is None):
                act.writers += 1  # not durable yet: nothing to protect, write in place
                if keep is not None and keep < act.size:
                    self._truncate_active(act, keep)
                return act
            old_vid, old_size, _ = self.versions.current(inode)
            source_size = old_size if act is None else act.size
            upto = source_size if keep is None else min(keep, source_size)
            self._check_space(upto)
            vid = self.versions.create_staged(inode, upto, time.time_ns(), self.staging.name)
            fd = self.staging.create(vid)
            new = Active(vid, inode, fd, self.staging.name(vid), upto, writers=1, dirty=True)
            try:
                if upto > 0 and act is not None:
                    await self.workers.run_foreground(_copy_prefix, os.dup(act.fd), os.dup(fd), upto)
                elif upto > 0 and old_vid is not None:
                    ext = self.versions.extents(old_vid)
                    await self.workers.run_foreground(_materialize, self.chunks.cache, os.dup(fd), ext, upto)
            except BaseException:
                os.close(fd)
                self.staging.remove(new.staging)  # nothing names it durably: a power cut finds no mark
                self.versions.discard(vid)
                raise
            previous = self.active.get(inode)
            if previous is not None:  # the marked version (or whatever replaced it meanwhile) is a fallback now
                previous.gone = True
                os.close(previous.fd)
            # atomic: the new version becomes the inode's content in one step
            self.versions.make_current(inode, vid, upto)
            self.active[inode] = new
            return new

    def _check_space(self, incoming: int) -> None:
        """Refuse data that would eat into the reserve kept for metadata and ingest (checked on every
        write once free space is within 4 check intervals of the reserve, else every 8 MiB)."""
        st = os.statvfs(self.staging.root)
        free = st.f_bavail * st.f_frsize
        self._space_low = free < self.reserve_bytes + 4 * _SPACE_CHECK_BYTES
        if free < self.reserve_bytes + incoming:
            raise CacheFull("cache disk is full")

    async def write(self, act: Active, off: int, data: bytes) -> int:
        """Write into the staging file. Checkpoints only while an fsync of the file is hashing it.
        Raises ``CacheFull`` or ``OSError``."""
        while act.fsyncing is not None:
            await act.fsyncing.wait()
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
        """Persist the staged version's size and hand it to the ingester and the durable marker. An empty
        version is durable at once: there are no bytes to lose. No checkpoint."""
        act.dirty = False
        act.sealed_at = time.monotonic()
        if act.size == 0:
            self.marker.record(act, _EMPTY_HASH)
        else:
            self.versions.record_size(act.inode, act.version, act.size)
            self.marker.schedule(act)
        self.on_sealed(act.inode, act.version)

    async def fsync(self, inode: InodeId) -> None:
        """Make the file's current content durable on the cache disk: a durable mark for a staged version
        (writes to the file wait meanwhile), the WAL for a committed one. Raises ``OSError``."""
        act = self.active.get(inode)
        while act is not None and not act.durable:
            if act.fsyncing is not None:
                await act.fsyncing.wait()
                act = self.active.get(inode)
                continue
            act.fsyncing = event = trio.Event()
            try:
                if await self.marker.mark(act, foreground=True) or act.gone:
                    break
            finally:
                act.fsyncing = None
                event.set()
        if act is None or act.gone:
            await self.sync_metadata()  # committed: make that commit durable

    async def sync_metadata(self) -> None:
        """Make every metadata transaction so far durable (WAL fsync, foreground thread). Raises ``OSError``."""
        await self.workers.run_foreground(self.db.sync_wal)

    # -- reading -------------------------------------------------------------------------------

    async def read(self, inode: InodeId, off: int, size: int, what: str) -> bytes:
        """Read from the staged file (inline pread, no checkpoint) or from committed chunks."""
        act = self.active.get(inode)
        if act is not None:
            if off >= act.size:
                return b""
            return os.pread(act.fd, min(size, act.size - off), off)
        vid, fsize, _ = self.versions.current(inode)
        if vid is None:
            return b""
        return await self.reader.read(vid, fsize, off, size, what)

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

    async def committed(self, inode: InodeId, dropped_staging: list[str]) -> None:
        """The ingester committed the inode's staged version as ``local`` (dropping its fallbacks, whose
        staging files are ``dropped_staging``). Forgets the staging file and deletes it, and the
        fallbacks', once the commit is durable; the state reads ``local`` from then on. Checkpoints
        (the WAL fsync). Raises ``MetadataUnwritable`` if the WAL cannot be synced."""
        act = self.active.pop(inode)
        act.gone = True
        os.close(act.fd)
        self._release_lock(inode)
        self._syncing.add(inode)
        try:
            await self.workers.run_io(self.db.sync_wal)
        except OSError as exc:
            raise MetadataUnwritable(f"cannot fsync the metadata WAL: {exc}") from exc  # stays 'staged'
        self._syncing.discard(inode)
        for name in (act.staging, *dropped_staging):
            self.reclaimer.staging_file(name)

    # -- lifecycle -----------------------------------------------------------------------------

    def drop(self, inode: InodeId) -> None:
        """Delete every version of a purged inode; chunks and staging files go once that is durable."""
        act = self.active.pop(inode, None)
        if act is not None:
            act.gone = True
            os.close(act.fd)
        for v in self.versions.history(inode):
            self.reader.forget_version(v.id)
        touched, names = self.versions.drop_others(inode, None)
        self._release_lock(inode)
        self.chunks.collect(touched)
        for name in names:
            self.reclaimer.staging_file(name)

    def recover(self, same_boot: bool) -> tuple[list[Active], list[InodeId], list[str]]:
        """At start-up, before serving: decide what every file with a staged version shows.

        ``same_boot``: only the daemon died (kill -9, OOM), not the machine — the kernel still holds
        every byte it accepted, so each file's newest version is taken as it is (its fallbacks stay
        until it is durable). After a reboot, a staged version counts only if its staging file still
        hashes to its durable mark (cut back to the marked size); otherwise the file goes back to its
        newest durable version, and a file that has none keeps what its staging file holds but is
        returned for ``lost+found``. Returns (reopened staged versions, inodes for lost+found, staging
        files to delete once these changes are durable). No checkpoint; blocking reads (hashing)."""
        recovered: list[Active] = []
        rescue: list[InodeId] = []
        doomed: list[str] = []
        for inode in self.versions.inodes_with_staged():
            current, _, _ = self.versions.current(inode)
            history = [v for v in self.versions.history(inode) if current is not None and v.id <= current]
            chosen: VersionRow | None = None
            opened: tuple[int, int] | None = None
            for v in history:
                if v.state != VersionState.STAGED:
                    chosen = v
                    break
                opened = self._open_valid(v, same_boot)
                if opened is not None:
                    chosen = v
                    break
                if v.id == current:
                    why = "its staging file is missing" if same_boot else "it was not durable when the power went"
                    log.warning("recovery: inode %d: version %d does not count (%s)", inode, v.id, why)
            lost = chosen is None and bool(history)
            if lost:  # nothing durable: keep the bytes, but not at their path
                chosen, opened = history[0], self._open_any(history[0])
                rescue.append(inode)
            if same_boot and not lost and chosen is not None and chosen.id == current:
                # taken as it is, not durable yet: its fallbacks stay; only unfinished copies go
                touched, names = self.versions.drop_newer(inode, chosen.id)
            else:
                touched, names = self.versions.drop_others(inode, None if chosen is None else chosen.id)
            self.chunks.collect(touched)
            doomed += names
            if chosen is None or opened is None:
                self.versions.revert(inode, chosen)
                continue
            fd, size = opened
            self.versions.revert(inode, chosen, size)
            act = Active(chosen.id, inode, fd, self._staging_name(chosen), size)
            if not same_boot and not lost:
                act.marked_gen, act.dir_synced = act.gen, True  # hashed to its mark just now
            self.active[inode] = act
            recovered.append(act)
        known = {a.staging for a in self.active.values()}
        doomed += [n for n in self.staging.names() if n not in known]
        return recovered, rescue, doomed

    def _open_valid(self, v: VersionRow, same_boot: bool) -> tuple[int, int] | None:
        """(fd, size) of a staged version that recovery may show, or None."""
        try:
            fd = self.staging.open(self._staging_name(v))
        except FileNotFoundError:
            if v.durable_size == 0:  # durably empty: there was nothing to write
                return self.staging.create(v.id), 0
            return None
        size = os.fstat(fd).st_size
        if same_boot:
            return fd, size
        marked = v.durable_size
        try:
            ok = marked is not None and size >= marked and hash_prefix(fd, marked) == v.durable_hash
        except FileChanged:
            ok = False
        if not ok or marked is None:
            os.close(fd)
            return None
        os.ftruncate(fd, marked)
        return fd, marked

    def _open_any(self, v: VersionRow) -> tuple[int, int]:
        """(fd, size) of a staged version as its staging file holds it (an empty one if it is gone)."""
        try:
            fd = self.staging.open(self._staging_name(v))
        except FileNotFoundError:
            fd = self.staging.create(v.id)
        return fd, os.fstat(fd).st_size

    def _staging_name(self, v: VersionRow) -> str:
        return v.staging or self.staging.name(v.id)
