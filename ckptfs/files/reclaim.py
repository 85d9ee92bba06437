"""Deleting files whose metadata is gone: chunk frames and staging files, only once that is durable.

SQLite commits are not fsync'd (WAL, ``synchronous=NORMAL``), so a power cut can undo the commit that
stopped referring to a file. Deleting the file right after such a commit could leave a committed
version whose chunk or staging file is gone. So every deletion goes through here: queued by the trio
thread (``ChunkIndex.collect``, ``FileContents``), then, in batches, one worker thread fsyncs the WAL
and unlinks — never a loop of unlinks on the trio thread, which would stall every FUSE request
while a large checkpoint is deleted.

Chunk ids are content hashes, so a deleted chunk can be stored again: a chunk that has a row again
by the time its batch runs is skipped, and while a batch is being deleted its chunks are *claimed*
(``ChunkIndex.claim``), so an ingest that wants to store one of them waits and then stores it anew.

A crash leaves what was queued as stray files: stray staging files are deleted at the next start (after
its recovery is durable); stray chunk files are reported and removed by ``ckptfs fsck --repair``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import trio

from ckptfs import failpoints
from ckptfs.cache import ChunkCache
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.staging import StagingArea
from ckptfs.files.workers import Workers
from ckptfs.meta import Database

log = logging.getLogger(__name__)


def _sync_and_unlink(db: Database, paths: list[Path]) -> None:
    """Worker thread: make the metadata durable, then delete the files. Idempotent."""
    db.sync_wal()
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class Reclaimer:
    def __init__(
        self,
        db: Database,
        chunks: ChunkIndex,
        staging: StagingArea,
        workers: Workers,
        allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.allowed = allowed  # False in failsafe mode: nothing is deleted
        self.db = db
        self.chunks = chunks
        self.staging = staging
        self.workers = workers
        self._staging: list[str] = []
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def staging_file(self, name: str) -> None:
        """Delete staging file ``name`` once the metadata that forgot it is durable. No checkpoint."""
        self._staging.append(name)
        self._poke()

    def _poke(self) -> None:
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    @property
    def pending(self) -> bool:
        return bool(self._staging or self.chunks.doomed)

    async def run(self) -> None:
        """Until cancelled: delete queued files in batches."""
        self.chunks.on_doomed = self._poke
        while True:
            if not self.pending or not self.allowed():
                self._idle.set()
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            failpoints.hit("reclaim")
            await self.reclaim_once()

    async def reclaim_once(self) -> int:
        """Delete one batch: everything queued now. Returns the files deleted."""
        cache: ChunkCache = self.chunks.cache
        doomed = self.chunks.doomed
        self.chunks.doomed = set()
        cids = [c for c in doomed if not self.chunks.has(c) and self.chunks.claim(c) is None]
        names, self._staging = self._staging, []
        paths = [cache.path(c) for c in cids] + [self.staging.root / n for n in names]
        if not paths:
            return 0
        try:
            await self.workers.run_io(_sync_and_unlink, self.db, paths)
        finally:
            for c in cids:
                self.chunks.release_claim(c)
        log.debug("deleted %d chunk files and %d staging files", len(cids), len(names))
        return len(paths)

    async def wait_idle(self, timeout: float = math.inf) -> None:
        """Return once nothing is queued (or after ``timeout`` seconds)."""
        with trio.move_on_after(timeout):
            while (self.pending and self.allowed()) or not self._idle.is_set():
                await self._idle.wait()
