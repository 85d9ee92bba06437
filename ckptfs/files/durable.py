"""Durable marks: when a staged version's bytes are known to be on the cache disk.

A staged version is *durable* once its staging file is fsync'd, the staging directory entry too, and
a mark naming its size and xxh3-128 is committed and the WAL synced (``meta.Versions.mark_durable``).
After a power cut, recovery trusts a staged version only if its staging file still hashes to its
mark; everything else goes back to the file's previous durable version (docs/architecture.md,
"Durability contract").

Marks are taken

* by ``fsync(2)`` on the file (foreground: writes to that file wait meanwhile, so the bytes hashed are
  the bytes synced);
* in the background for a sealed version that ingest has not committed ``durable_after_s`` seconds
  after its close. A version that ingest commits first never needs its staging file on the disk at
  all (it is deleted after the commit), which is why the mark is not taken at once: measured in
  ``scripts/bench_write.py`` (bytes written to the cache disk per byte saved);
* at a clean unmount, for whatever is still staged.

The background marker gives up on a version that changes while it is being hashed; its next close
schedules it again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
import xxhash

from ckptfs import failpoints
from ckptfs.errors import FileChanged
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.reclaim import Reclaimer
from ckptfs.files.staging import StagingArea
from ckptfs.files.workers import Workers
from ckptfs.meta import Database, Versions
from ckptfs.types import InodeId, VersionId

log = logging.getLogger(__name__)
_BLOCK = 4 * 1024 * 1024


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
    marked_gen: int | None = None  # ``gen`` when the durable mark was taken (None = no mark)
    dir_synced: bool = False  # the staging file's directory entry is durable
    fsyncing: trio.Event | None = None  # set while a foreground fsync hashes the file: writes wait
    gone: bool = False  # committed, superseded or deleted: no longer the inode's staged version
    sealed_at: float = 0.0  # time.monotonic() of the last seal

    @property
    def durable(self) -> bool:
        return self.marked_gen is not None and self.marked_gen == self.gen


def sync_and_hash(fd: int, size: int, sync_dir: StagingArea | None) -> bytes:
    """Worker thread: fsync ``fd`` (and the staging directory), then xxh3-128 of its first ``size`` bytes.
    Closes ``fd``. Raises ``FileChanged`` if the file is shorter than ``size``."""
    try:
        os.fsync(fd)
        if sync_dir is not None:
            sync_dir.sync_dir()
        return hash_prefix(fd, size)
    finally:
        os.close(fd)


def hash_prefix(fd: int, size: int) -> bytes:
    """xxh3-128 of the first ``size`` bytes of ``fd``. Raises ``FileChanged`` if the file is shorter."""
    h = xxhash.xxh3_128()
    buf = bytearray(min(_BLOCK, max(size, 1)))
    view = memoryview(buf)
    pos = 0
    while pos < size:
        want = min(len(buf), size - pos)
        n = os.preadv(fd, [view[:want]], pos)
        if n <= 0:
            raise FileChanged(f"staging file ended at {pos} of {size} bytes")
        h.update(view[:n])
        pos += n
    return h.digest()


class DurableMarker:
    """Takes durable marks (foreground for fsync, background after ``delay_s``). Trio thread."""

    def __init__(
        self,
        db: Database,
        versions: Versions,
        chunks: ChunkIndex,
        staging: StagingArea,
        reclaimer: Reclaimer,
        workers: Workers,
        delay_s: float,
        allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.db = db
        self.versions = versions
        self.chunks = chunks
        self.staging = staging
        self.reclaimer = reclaimer
        self.workers = workers
        self.delay_s = delay_s
        self.allowed = allowed  # False in failsafe mode: no background writes
        self._send, self._recv = trio.open_memory_channel[Active](math.inf)

    def schedule(self, act: Active) -> None:
        """Mark ``act`` durable ``delay_s`` after its seal unless ingest commits it first. No checkpoint."""
        self._send.send_nowait(act)

    async def mark(self, act: Active, *, foreground: bool) -> bool:
        """fsync + hash ``act``'s staging file and record the mark. Returns False when the version changed
        or went away meanwhile (then nothing is recorded). Checkpoints. Raises ``OSError``."""
        gen, size = act.gen, act.size
        sync_dir = None if act.dir_synced else self.staging
        run = self.workers.run_foreground if foreground else self.workers.run_io
        digest = await run(sync_and_hash, os.dup(act.fd), size, sync_dir)
        if act.gone or act.gen != gen or act.size != size:
            return False
        act.dir_synced = True
        self.record(act, digest)
        await run(self.db.sync_wal)
        return True

    def record(self, act: Active, digest: bytes) -> None:
        """Record ``act``'s mark at its current size and gen (the caller synced and hashed it, or it is
        empty); drop its fallbacks if it is sealed. Durable once the WAL is synced. No checkpoint."""
        touched, names = self.versions.mark_durable(
            act.inode, act.version, act.size, digest, drop_fallbacks=act.writers == 0
        )
        act.marked_gen = act.gen
        self.chunks.collect(touched)
        for name in names:
            self.reclaimer.staging_file(name)

    async def run(self) -> None:
        """Until cancelled: take the background marks that come due."""
        async for act in self._recv:
            await trio.sleep(max(0.0, act.sealed_at + self.delay_s - time.monotonic()))
            failpoints.hit("marker")
            if act.gone or act.writers or act.dirty or act.durable or not self.allowed():
                continue
            try:
                await self.mark(act, foreground=False)
            except FileChanged:
                continue  # truncated meanwhile: its next seal schedules it again
