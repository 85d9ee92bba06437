"""The uploader: durable local versions -> frames and packs in the store -> a journal segment naming them
-> state ``remote``. The protocol and its order are in docs/architecture.md ("What the uploader does").

One trio task. Metadata through ``meta.tiering`` on the trio thread; frames read and objects put in
worker threads, at most ``concurrency`` requests at once, optionally under a bandwidth cap.

Failures never lose anything: a transient backend error (the store down, 503, resets) leaves every
row queued with its attempts and last error, and the next round tries again after a backoff; a
permanent one (credentials, a missing bucket) is logged by name once and retried slowly, so fixing
the cause resumes uploads. Local writes go on into the cache either way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ckptfs.backend.base import ObjectStore
from ckptfs.cache import ChunkCache
from ckptfs.cache.store import SMALL_FRAME
from ckptfs.errors import (
    BackendError,
    CacheFull,
    ChunkMissing,
    NotInStore,
    ObjectNotFound,
    PermanentBackendError,
    UserError,
)
from ckptfs.files.workers import run_niced
from ckptfs.meta import Database
from ckptfs.meta.tiering import ChunkRow, FileLayout, Tiering
from ckptfs.tier import journal
from ckptfs.tier.gcview import GcView
from ckptfs.tier.layout import (
    MARKER_KEY,
    build_pack,
    check_marker,
    encode_segment,
    marker,
    new_segment_id,
    path_bytes,
    path_text,
    segment_key,
)
from ckptfs.types import ChunkId, VersionId, VersionState

log = logging.getLogger(__name__)

_BATCH = 32  # versions per round
_PACK_BYTES = 32 * 1024 * 1024  # a pack is closed once its frames reach this
_PACKS_IN_FLIGHT = 4  # packs built and not yet put: at most this many (x _PACK_BYTES) in memory
_STRAYS = 256  # re-encoded chunks of uploaded versions put up again per round


@dataclass
class UploadStats:
    """What ``ckptfs status`` and the benchmarks report."""

    bytes_sent: int = 0
    objects_sent: int = 0
    segments: int = 0
    rounds: int = 0
    last_error: str | None = None
    last_error_ns: int | None = None


def prepare_store(store: ObjectStore) -> None:
    """Blocking, before mounting: the store's format marker is one we read, or it is written now."""
    try:
        data = store.get(MARKER_KEY)
    except ObjectNotFound:
        store.put(MARKER_KEY, marker())
        return
    problem = check_marker(data)
    if problem:
        raise UserError(f"store: refusing to use it: {problem}")


class _Throttle:
    """A token bucket in bytes per second (0 = no cap)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0

    async def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            await trio.sleep(start - now)


class Uploader:
    def __init__(
        self,
        db: Database,
        cache: ChunkCache,
        store: ObjectStore,
        writer: str,
        concurrency: int = 8,
        bandwidth: float = 0.0,
        interval: float = 0.5,
        healthy: Callable[[], bool] = lambda: True,
        compact_wait: float = 0.0,
        gc_view: GcView | None = None,
        nice: int = 0,
    ) -> None:
        self.nice = nice  # of the threads that pack, read frames and talk to the store
        self.waiting = 0  # flushes (and remote fsyncs) waiting for the store now
        self.gc = gc_view  # the store's gc records as this writer last read them (None: no gc runs on it)
        self.compact_wait = compact_wait  # a version waits this long for its chunks' compaction
        self.healthy = healthy  # failsafe mode stops uploads: they write metadata
        self.db = db
        self.tiering = Tiering(db)
        self.cache = cache
        self.store = store
        self.writer = writer
        self.interval = interval
        self._limit = trio.CapacityLimiter(concurrency)
        self._packs = trio.Semaphore(max(1, min(_PACKS_IN_FLIGHT, concurrency)))
        self._throttle = _Throttle(bandwidth)
        self._wake = trio.Event()
        self._seen_changes = -1
        self._last_ts = 0
        self.stats = UploadStats()
        self._round = trio.Lock()  # the loop and a drain at unmount never run a round at once
        self._force = False  # a flush asked for a round whatever the change counter says
        self._finished = 0  # rounds finished
        self._round_done = trio.Event()
        self._sent: list[tuple[float, int]] = []  # (monotonic time, bytes) of recent puts, for the rate

    def wake(self) -> None:
        self._wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        requeued = self.tiering.requeue_local()
        if requeued:
            log.info("upload: %d local versions queued again", requeued)
        task_status.started()
        backoff = 0.0
        while True:
            with trio.move_on_after(backoff or self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            changes = self.db.conn.total_changes
            idle = changes == self._seen_changes and not self.tiering.queued()
            if not self.healthy() or (idle and not backoff and not self._force):
                continue  # nothing was written since the last round that finished, nothing waits
            hurry, self._force = self._force, False
            try:
                await self.round(hurry)
            except BackendError as exc:
                backoff = min(max(1.0, backoff * 2), 60.0)
                self._failed(exc)
                continue
            backoff = 0.0
            self._seen_changes = changes

    def _failed(self, exc: BackendError) -> None:
        """A round failed: note it on the queued versions; log it once per distinct message."""
        message = str(exc)
        first = self.stats.last_error != message
        self.stats.last_error, self.stats.last_error_ns = message, time.time_ns()
        self.tiering.failed(self.tiering.pending(_BATCH), message)
        if first:
            level = logging.ERROR if isinstance(exc, PermanentBackendError) else logging.WARNING
            log.log(level, "upload: %s; retrying (nothing is lost)", message)

    async def round(self, hurry: bool = False) -> None:
        """Upload what the queue holds — without ``hurry`` (a flush, an unmount), only versions whose
        chunks are compacted or that waited ``compact_wait`` — then publish the namespace changes.
        Raises ``BackendError``."""
        async with self._round:
            self.stats.rounds += 1
            await self._gc_check()
            waited = None if hurry or not self.compact_wait else time.time_ns() - int(self.compact_wait * 1e9)
            vids = self.tiering.pending(_BATCH, waited)
            if vids:
                await self._upload_chunks(self.tiering.closure(vids))
            # frames re-encoded (repack, compaction) after their versions went up: their new frames go up
            # too, or the chunks could never leave the cache
            await self._upload_chunks(self.tiering.not_uploaded(_STRAYS))
            if hurry:  # a flush: what ingest has stored of a version still being chunked goes up already
                await self._upload_chunks(self.tiering.being_ingested(_STRAYS))
            await self._publish(vids)
            self._finished += 1
            self._round_done.set()
            self._round_done = trio.Event()

    # -- remote garbage collection: the writer's half ------------------------------------------------------

    async def _gc_check(self) -> None:
        """Keep the view of the gc records young enough to publish (``tier.gcview``; raises ``BackendError``
        when it cannot be read), and stop naming every object it shows as marked or swept."""
        if self.gc is None or not self.gc.stale():
            return
        await run_niced(self._limit, self.nice, self.gc.refresh)
        if self.gc.dead:
            await self._forget_dead(self.tiering.rows_in_objects(self.gc.dead))

    async def _forget_dead(self, rows: list[ChunkRow]) -> None:
        """Frames whose store copy a gc marked: fetch back into the cache (durably) what only that copy
        holds, then drop the rows' locations, so they go up again under new names before any segment
        names them. A frame that cannot be fetched back is logged by name and keeps its row as it is."""
        assert self.gc is not None
        dead = self.gc.dead
        todo = [r for r in rows if r.remote in dead]
        if not todo:
            return
        ok: list[ChunkRow] = []

        async def one(r: ChunkRow) -> None:
            if not self.cache.holds(r.id):
                try:
                    frame = await run_niced(self._limit, self.nice, self._fetch_back, r)
                except (ChunkMissing, CacheFull, OSError) as exc:
                    log.error(
                        "gc: chunk %s is only in %s, which a gc marked, and cannot be fetched back: %s",
                        r.id.hex(),
                        r.remote,
                        exc,
                    )
                    return
                if self.cache.is_small(frame):
                    self.tiering.keep_small_frame(r.id, frame, replace=False)
            ok.append(r)

        async with trio.open_nursery() as nursery:
            for r in todo:
                nursery.start_soon(one, r)
        n = self.tiering.forget_remote(ok)
        if n:
            log.info("gc: %d frames in objects a gc marked go up again under new names", n)

    def _fetch_back(self, row: ChunkRow) -> bytes:
        """Blocking: the row's frame from the store, kept in the cache and synced (small ones are the
        caller's to keep: rows of meta.db). Raises ``ChunkMissing``, ``CacheFull``."""
        frame = self.cache.remote_frame(row.id)
        if frame is None:
            raise ChunkMissing(f"chunk {row.id.hex()} has no copy in the store any more")
        if not self.cache.is_small(frame):
            self.cache.put(row.id, frame, replace=False, sync=True)
        return frame

    # -- frames and packs ---------------------------------------------------------------------------------

    async def _upload_chunks(self, rows: list[ChunkRow]) -> None:
        """Put up every row's frame that is not in the store yet, in packs of about ``_PACK_BYTES``
        (frames read in order, at most ``_PACKS_IN_FLIGHT`` packs in memory, put in parallel). What went
        up is recorded even when something beside it failed; then the first error is raised.

        No ``head`` first: the index of what is in the store is ``chunks.remote``, which also holds what
        other writers' journal segments named (``tier.refresh``), so a chunk already up is not sent
        again; and a pack's name is random, so two writers never write one name."""
        todo = [r for r in rows if r.remote is None]
        if not todo:
            return
        done: list[tuple[ChunkRow, str, int, int]] = []
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            batch: list[tuple[ChunkRow, bytes]] = []
            size = 0
            for r in todo:
                frame = await self._frame(r, errors)
                if frame is None:
                    continue
                batch.append((r, frame))
                size += len(frame)
                if size >= _PACK_BYTES:
                    await self._packs.acquire()
                    nursery.start_soon(self._put_pack, batch, done, errors)
                    batch, size = [], 0
            if batch:
                await self._packs.acquire()
                nursery.start_soon(self._put_pack, batch, done, errors)
        self.tiering.record_remote(done)
        if errors:
            raise errors[0]

    async def _frame(self, row: ChunkRow, errors: list[BaseException]) -> bytes | None:
        """The row's frame from the cache, or None if it is gone (collected meanwhile: its version is gone
        too; or missing while the metadata names it: then the error is collected, by id)."""
        if row.stored <= SMALL_FRAME:
            frame = self.cache.small(row.id)
            if frame is not None:
                return frame
        try:
            return await run_niced(self._limit, self.nice, self.cache.get, row.id)
        except ChunkMissing as exc:
            if self.db.one("SELECT 1 FROM chunks WHERE id=?", (row.id,)) is not None:
                errors.append(exc)
            return None

    async def _put_pack(
        self,
        frames: list[tuple[ChunkRow, bytes]],
        done: list[tuple[ChunkRow, str, int, int]],
        errors: list[BaseException],
    ) -> None:
        """One pack (its slot in ``_packs`` taken by the caller, released here). A backend error is
        collected, not raised: the packs beside it go on."""
        try:
            # (copies 32 MiB and hashes every frame: off the trio thread, which serves the mount)
            pack = await run_niced(self._limit, self.nice, build_pack, [(r.id, f) for r, f in frames])
            try:
                await self._put(pack.key, pack.data)
            except BackendError as exc:
                errors.append(exc)
                return
            done += [(r, pack.key, *pack.offsets[r.id]) for r, _ in frames]
        finally:
            self._packs.release()

    async def _put(self, key: str, data: bytes) -> None:
        await self._throttle.take(len(data))
        await run_niced(self._limit, self.nice, self.store.put, key, data)
        self.stats.bytes_sent += len(data)
        self.stats.objects_sent += 1
        now = time.monotonic()
        self._sent.append((now, len(data)))
        while self._sent and self._sent[0][0] < now - 60:
            self._sent.pop(0)

    # -- the namespace journal ----------------------------------------------------------------------------

    async def _publish(self, queued: list[VersionId]) -> None:
        await self._gc_check()  # the round may have taken long: the view must be young when the segment goes
        dead = self.gc.dead if self.gc is not None else frozenset()
        revive: list[ChunkRow] = []
        entries = self.tiering.namespace()
        old = self.tiering.published()
        events: list[dict[str, Any]] = []
        changes: dict[bytes, bytes | None] = {}
        remote: list[VersionId] = []
        seen = set()
        waiting: set[int] = set()  # inodes at a path that cannot be published yet
        for e in entries:
            seen.add(e.path)
            d = journal.digest(e)
            prev = old.get(e.path)
            if prev is not None and prev.digest == d:
                continue
            extents: list[tuple[int, int, ChunkId]] = []
            rows: list[ChunkRow] = []
            layout: FileLayout | None = None
            if journal.kind_of(e.mode) == "file" and e.version is not None:
                if e.state == VersionState.STAGED.value:
                    waiting.add(e.inode)
                    continue  # its last published version stays until this one is remote
                rows = self.tiering.closure([e.version])
                if any(r.remote is None for r in rows):
                    waiting.add(e.inode)
                    continue  # not all up yet (a later round)
                if dead and any(r.remote in dead for r in rows):
                    revive += rows
                    waiting.add(e.inode)
                    continue  # names an object a gc marked: its frames go up again first (a later round)
                extents, layout = self.tiering.extents(e.version)
                if e.state == VersionState.LOCAL.value:
                    remote.append(e.version)
            events.append(journal.event(e, extents, rows, layout))
            changes[e.path] = d
        for path, prev in old.items():
            if path not in seen:
                if prev.inode in waiting:
                    continue  # renamed, and the new path cannot be published yet: the old one stays till then
                events.append(journal.tombstone(path))
                changes[path] = None
        if revive:
            await self._forget_dead(revive)
        if events:
            ts = max(time.time_ns(), self._last_ts + 1)
            self._last_ts = ts
            sid = new_segment_id()
            key = segment_key(self.writer, ts, sid)
            await self._put(key, encode_segment(self.writer, ts, events, sid))
            self.stats.segments += 1
            ranks = {path_bytes(ev["path"]): (ts, self.writer, sid, i) for i, ev in enumerate(events)}
            inodes = {e.path: e.inode for e in entries if e.path in changes}
            self.tiering.commit_published(changes, remote, ranks, inodes)
        # queued versions no path shows (fallbacks, unlinked while open) leave the queue once uploaded
        shown = set(remote)
        stray = [v for v in queued if v not in shown and all(r.remote is not None for r in self.tiering.closure([v]))]
        if stray:
            current = {e.version for e in entries}
            self.tiering.uploaded_unpublished([v for v in stray if v not in current])

    def rate(self) -> float:
        """Bytes per second put over the last minute."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._sent if t >= now - 60]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(1.0, now - recent[0][0])

    def unpublished(self, prefix: bytes = b"") -> list[str]:
        """Paths at or under ``prefix`` whose current state is not in the store's journal yet: a changed or
        new path (a staged or not yet uploaded file included), or a removed one."""
        old = self.tiering.published()
        out: list[str] = []
        seen = set()

        def under(path: bytes) -> bool:
            return not prefix or path == prefix or path.startswith(prefix.rstrip(b"/") + b"/")

        for e in self.tiering.namespace():
            seen.add(e.path)
            prev = old.get(e.path)
            if under(e.path) and (prev is None or prev.digest != journal.digest(e)):
                out.append(path_text(e.path))
        out += [path_text(p) + " (removed)" for p in old if p not in seen and under(p)]
        return sorted(out)

    async def flush(self, prefix: bytes, timeout: float) -> list[str]:
        """Until everything under ``prefix`` is in the store or ``timeout`` passes: the paths still missing.
        Counted in ``waiting`` meanwhile (encoding does not wait for idle cores then)."""
        missing = self.unpublished(prefix)
        self.waiting += 1
        try:
            with trio.move_on_after(timeout):
                while missing:
                    target = self._finished + 1 + self._round.locked()  # a round that starts from now
                    while self._finished < target:
                        self._force = True
                        self.wake()
                        await self._round_done.wait()
                    missing = self.unpublished(prefix)
                    if missing:
                        await trio.sleep(0.1)  # ingest or the store is still at it: do not spin
        finally:
            self.waiting -= 1
        return missing

    async def wait_paths(self, paths: list[bytes], timeout: float) -> None:
        """``upload.fsync_remote``: until every one of ``paths`` is in the store. Raises ``NotInStore``."""
        missing: list[str] = []
        for path in paths:
            missing += await self.flush(path, timeout)
        if missing:
            raise NotInStore(f"not in the store after {timeout:.0f} s: {', '.join(missing[:5])}")

    async def drain(self, timeout: float) -> bool:
        """At unmount: upload until the queue is empty or ``timeout`` passes. True if it emptied."""
        if not self.healthy():
            return False
        with trio.move_on_after(timeout if math.isfinite(timeout) else 1e9):
            while self.tiering.pending(1):
                try:
                    await self.round(hurry=True)
                except BackendError as exc:
                    self._failed(exc)
                    await trio.sleep(1)
            try:
                await self.round(hurry=True)  # namespace changes with no version to upload
            except BackendError as exc:
                self._failed(exc)
                return False
            return True
        return False
