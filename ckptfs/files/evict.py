"""The bounded cache: when the chunk files and staged bytes pass ``cache.max_gb`` / ``cache.max_percent``
(or the cache disk runs low), drop every flat copy of the newest chunks (``files.flatten``: a speed-up,
never the only copy of anything), then delete the local files of chunks whose current frame is in the
store, least recently read first, until usage is back under 90 % of the cap.

What may go (docs/architecture.md, "Eviction and cold reads"): a chunk whose row says where its current
frame is in the store (``chunks.remote``), made durable first (a WAL fsync, so a power cut cannot
leave a row that forgot where the only copy is), and that no job has pinned (ingest, and the frame
swaps of repack and compaction, pin what they work on). Its base chain needs nothing more: a base is
either in the store too, or not evictable. The check and the unlink run on the trio thread with no
checkpoint between them, so no swap can slip in. Frames of at most 32 KiB (rows of ``meta.db``) and
staged or local-only data are never evicted; a later read of an evicted chunk fetches it from the store
(``cache.remote``) and keeps it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import trio

from ckptfs.cache import ChunkCache
from ckptfs.cache.store import SMALL_FRAME
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.flat import FlatCopies
from ckptfs.files.workers import Workers
from ckptfs.meta import Database
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)

_RECENT_S = 10.0  # a chunk read this recently stays, whatever the pressure
_BATCH = 2048  # candidates looked at per pass


class Evictor:
    def __init__(
        self,
        db: Database,
        chunks: ChunkIndex,
        cache: ChunkCache,
        workers: Workers,
        cap_bytes: int,
        low_disk_bytes: int,
        staged_bytes: Callable[[], int],
        healthy: Callable[[], bool],
        flat: FlatCopies | None = None,
    ) -> None:
        self.db = db
        self.chunks = chunks
        self.cache = cache
        self.workers = workers
        self.cap = cap_bytes  # 0: no cap (only a low disk evicts)
        self.low_disk = low_disk_bytes
        self.staged_bytes = staged_bytes
        self.healthy = healthy
        self.flat = flat  # decoded copies of the newest chunks (files.flatten): counted, and the first to go
        self.evicted = 0
        self.evicted_bytes = 0

    def usage(self) -> int:
        """Bytes the cap counts: chunk files, flat copies and staged versions."""
        return self.cache.file_bytes + (self.flat.size if self.flat else 0) + self.staged_bytes()

    def room(self, nbytes: int) -> bool:
        """May an optional copy of ``nbytes`` (``files.flatten``) be written: usage stays within 90 % of
        the cap (where eviction stops, so copies never make it evict), the disk stays above twice the
        low mark?"""
        if self.cap and self.usage() + nbytes > int(self.cap * 0.9):
            return False
        st = os.statvfs(self.cache.root)
        return st.f_bavail * st.f_frsize - nbytes >= self.low_disk * 2

    def _need(self) -> int:
        """Bytes to free now (0: none)."""
        need = 0
        if self.cap:
            used = self.usage()
            if used > self.cap:
                need = used - int(self.cap * 0.9)
        st = os.statvfs(self.cache.root)
        free = st.f_bavail * st.f_frsize
        if free < self.low_disk:
            need = max(need, self.low_disk * 2 - free)
        return need

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(1.0)
            if self.healthy():
                await self.evict()

    async def evict(self) -> int:
        """One pass; returns the bytes freed."""
        need = self._need()
        if need <= 0:
            return 0
        if self.flat is not None and self.flat.ids:
            dropped = self.flat.size
            for cid in list(self.flat.ids):  # a speed-up only: all of them go before any chunk does
                self.flat.drop(cid)
            log.info("cache: dropped the flat copies of the newest checkpoints (%.1f MB)", dropped / 1e6)
            need = self._need()
            if need <= 0:
                return dropped
        rows = self.db.execute(
            "SELECT c.id, c.stored, c.remote FROM chunks c"
            " WHERE c.remote IS NOT NULL AND c.stored > ?"
            " ORDER BY (SELECT max(x.version) FROM extents x WHERE x.chunk = c.id) LIMIT ?",
            (SMALL_FRAME, _BATCH),
        ).fetchall()
        now = time.monotonic()
        recent = self.cache.recent
        # never read this session first (oldest versions first), then least recently read
        order = sorted(
            ((ChunkId(bytes(r[0])), int(r[1]), str(r[2])) for r in rows), key=lambda item: recent.get(item[0], -1.0)
        )
        await self.workers.run_io(self.db.sync_wal)  # the remote flags of these rows are durable from here on
        freed = n = 0
        for cid, stored, remote in order:
            if freed >= need:
                break
            if now - recent.get(cid, -1e9) < _RECENT_S or self.chunks.pinned(cid):
                continue
            # no await from this check to the unlink: a frame swap cannot start in between
            row = self.db.one("SELECT remote FROM chunks WHERE id=?", (cid,))
            if row is None or row[0] != remote or not self.cache.has_file(cid):
                continue  # gone, or re-encoded since (a newer flag may not be durable yet)
            self.cache.delete(cid)
            freed += stored
            n += 1
            if n % 64 == 0:
                await trio.sleep(0)
        if n:
            self.evicted += n
            self.evicted_bytes += freed
            log.info("cache: evicted %d chunk files (%.1f MB) already in the store", n, freed / 1e6)
        elif need:
            log.debug("cache: %.1f MB over, nothing evictable yet (not uploaded, pinned or just read)", need / 1e6)
        return freed
