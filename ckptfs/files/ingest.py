"""The ingest pipeline: sealed staged versions -> chunks in the cache -> committed ``local`` version.

Runs in the background; no FUSE request ever waits for it. Per version:

1. snapshot (dup'd fd, size, gen) of the sealed version                      [trio thread]
2. plan pieces (format-aware or CDC)                                          [worker thread]
3. per piece, bounded in parallel: choose the slot's delta base [trio]; read + hash + encode in one
   worker call (pieces <= 16 KiB inline) — skipping the encode when the piece equals its slot's
   previous chunk; dedup against the index and the other in-flight jobs [trio]; for a new chunk:
   put (fsync) [I/O thread], record row [trio] — a small frame goes into the row's transaction
   instead (``cache.store``). Content-defined pieces (no slot) are mostly duplicates, so they are
   read + hashed first and encoded only when new
4. fsync the chunk directories                                                [worker thread]
5. commit in one transaction, only if the version is still sealed with the same gen: extents,
   refcounts, state 'local', drop the inode's fallback versions             [trio thread, atomic]
6. collect chunks that lost their last reference (their files are queued) [trio thread]
7. fsync the WAL (the commit is durable; the state reads 'local' only now); ``files.reclaim`` then
   deletes the staging files and the collected chunks' files              [worker threads]

A full disk or a passing I/O error leaves the version staged and retries it later with backoff; the
data stays readable from the staging file. An unexpected error, unwritable metadata or a cache-disk
I/O error puts the daemon in failsafe mode (``health``). A crash anywhere before 5 leaves the version
staged and start-up re-queues it; chunk rows left at refcount 0 are collected at start-up. SQLite
commits are not fsync'd (WAL, synchronous=NORMAL), so without 7's order a power loss could undo the
commit after the staging file was gone; a crash between 5 and 7 leaves a stray staging file, deleted
at start-up.

The ingester also runs the two background jobs that re-encode stored chunks, each taking the gate
that ingest jobs share alone (``files.gate``) and both waiting for a pause in writes (``busy``):
``files.repack`` (live chunks coded against deleted ones) and ``files.compact`` (pcodec where it is
denser).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass

import trio

from ckptfs import failpoints
from ckptfs.cache import ChunkCache
from ckptfs.codec import chunk_id
from ckptfs.errors import CacheFull, CorruptChunk, FileChanged
from ckptfs.files.chunks import ChunkIndex, SlotBase
from ckptfs.files.compact import Compactor, CompactSettings
from ckptfs.files.contents import FileContents
from ckptfs.files.cpuload import CpuLoad, thread_ticks
from ckptfs.files.delta import choose_base, encode_piece
from ckptfs.files.flat import FlatCopies
from ckptfs.files.gate import Gate
from ckptfs.files.lru import BytesLRU
from ckptfs.files.plan import plan_file
from ckptfs.files.repack import Repacker, RepackSettings
from ckptfs.files.reverse import Reverser, ReverseSettings
from ckptfs.files.workers import Workers
from ckptfs.health import Health, guarded, is_fatal
from ckptfs.meta import Versions, add_refs
from ckptfs.meta.tiering import queue_in
from ckptfs.types import ChunkId, InodeId, Piece, VersionId, VersionState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestSettings:
    piece_size: int
    cdc_avg: int
    zstd_level: int
    files_at_once: int
    parallel_pieces: int
    max_chain: int = 4
    base_grace_s: int = 600
    base_cache_bytes: int = 512 * 1024 * 1024
    pco_level: int = 10
    newest_keyframe: bool = False
    idle_cores: float = 0.5  # compaction and reverse deltas wait until others leave this many cores free


# Writes this recent keep repack and compaction waiting (a checkpoint is being saved).
_QUIET_S = 2.0
# Smaller unparsed files keep content-defined chunking even when a same-named twin exists.
_MIN_POSITIONAL = 1024 * 1024
# Pieces up to this size (zip headers, small records) are read and encoded on the trio thread: that
# takes less time than handing them to a worker thread and back.
_INLINE = 16 * 1024


def _read_and_hash(fd: int, piece: Piece) -> tuple[bytes, ChunkId]:
    data = os.pread(fd, piece.length, piece.offset)
    if len(data) != piece.length:
        raise FileChanged(f"short read at offset {piece.offset}")
    return data, chunk_id(data)


@dataclass(frozen=True, slots=True)
class _PieceJob:
    """What a worker needs to read, hash and encode one piece."""

    fd: int
    piece: Piece
    level: int
    base: ChunkId | None  # the delta base chosen for the piece's slot
    base_bytes: bytes | None  # its plain bytes when in memory
    previous: ChunkId | None  # the slot's chunk in the previous version


def _read_and_encode(
    cache: ChunkCache, job: _PieceJob
) -> tuple[bytes, ChunkId, tuple[bytes, int, ChunkId | None] | None]:
    """Worker thread: read and hash a slotted piece and, unless it is the slot's previous chunk again
    (a frozen tensor), encode it right away: one thread round trip instead of two, which cost ~0.3 ms
    of CPU each here. Should the chunk turn out to exist already, the frame is thrown away."""
    data, cid = _read_and_hash(job.fd, job.piece)
    if cid == job.previous:
        return data, cid, None
    return data, cid, encode_piece(cache, data, job.level, job.piece.elem_width, job.base, job.base_bytes)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Ingester:
    """Owns the queue of sealed versions and the worker tasks that ingest them."""

    def __init__(
        self,
        contents: FileContents,
        chunks: ChunkIndex,
        workers: Workers,
        settings: IngestSettings,
        health: Health | None = None,
    ):
        self.health = health or Health()
        self.contents = contents
        self.chunks = chunks
        self.workers = workers
        self.settings = settings
        self._send, self._recv = trio.open_memory_channel[tuple[InodeId, VersionId]](math.inf)
        self._queued: dict[VersionId, float] = {}  # queued or running -> time.monotonic() of its submit
        self._again: set[VersionId] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._layout_turns: dict[str, trio.Event] = {}  # layout signature -> the latest job's "done"
        self.bases = BytesLRU(settings.base_cache_bytes, keep_last=False)  # plain bytes of likely bases
        self.gate = Gate()  # ingest jobs share it; a repack of a delta tree takes it alone
        self.repacker = Repacker(
            chunks, workers, self.gate, self.busy, RepackSettings(settings.max_chain, settings.zstd_level)
        )
        # the idle pool's threads are this daemon's deferrable work; its FUSE loop is not
        self.load = CpuLoad(own_ticks=lambda: thread_ticks(tuple(workers.idle_threads)))
        self.compactor = Compactor(chunks, workers, self.gate, self.no_idle_core, CompactSettings(settings.pco_level))
        self.reverser = (
            Reverser(
                chunks, workers, self.gate, self.no_idle_core, ReverseSettings(settings.max_chain, settings.zstd_level)
            )
            if settings.newest_keyframe and settings.max_chain
            else None
        )

    def busy(self) -> bool:
        """Is a version waiting for ingest, or was anything written in the last 2 s? Re-encoding stored
        chunks waits meanwhile: on a 2-core node, compaction next to a torch.save made the save 35 %
        slower. (A file merely held open, like a log, does not count.) Always busy in failsafe mode:
        nothing is re-encoded then."""
        return self.health.failsafe or self.pending > 0 or time.monotonic() - self.contents.last_write < _QUIET_S

    def others_leave_no_core(self) -> bool:
        """The other processes leave less than ``idle_cores`` cores free (a trainer on the CPU)."""
        return self.load.free_cores() < self.settings.idle_cores

    def no_idle_core(self) -> bool:
        """``busy``, or ``others_leave_no_core``: the optional re-encodings (compaction, reverse
        deltas) wait for real idle time."""
        no_core = self.others_leave_no_core()  # first: it keeps the load sampled
        return self.busy() or no_core

    def submit(self, inode: InodeId, vid: VersionId) -> None:
        """Queue a sealed version (idempotent while queued). No checkpoint; callable from any trio task."""
        if vid in self._queued:
            self._again.add(vid)  # sealed again while queued or running: run once more afterwards
            return
        self._queued[vid] = time.monotonic()
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._send.send_nowait((inode, vid))

    @property
    def pending(self) -> int:
        return len(self._queued)

    def oldest_wait(self) -> float:
        """Seconds the longest-queued version has waited for (or been in) ingest; 0 when none is."""
        return time.monotonic() - min(self._queued.values()) if self._queued else 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the worker tasks until cancelled."""
        h = self.health
        async with trio.open_nursery() as nursery:
            for _ in range(self.settings.files_at_once):
                recv = self._recv.clone()
                nursery.start_soon(guarded, h, "ingest", functools.partial(self._worker, recv, nursery))
            nursery.start_soon(guarded, h, "the delta-base slot sweep", self._sweep_slots)
            nursery.start_soon(guarded, h, "repack", self.repacker.run)
            nursery.start_soon(guarded, h, "compaction", self.compactor.run)
            if self.reverser is not None:
                nursery.start_soon(guarded, h, "reversing deltas", self.reverser.run)
            task_status.started()

    async def _sweep_slots(self) -> None:
        """Release delta bases of deleted files once their grace period is over."""
        period = max(1.0, min(60.0, self.settings.base_grace_s / 4))
        while not self.health.failsafe:
            await trio.sleep(period)
            failpoints.hit("sweep")
            n = self.chunks.sweep_slots(self.settings.base_grace_s * 1_000_000_000)
            if n:
                log.debug("released %d delta-base slots of deleted files", n)

    async def wait_idle(self) -> None:
        """Return once nothing is queued or being ingested."""
        while self._queued:
            await self._idle.wait()

    async def _worker(self, recv: trio.MemoryReceiveChannel[tuple[InodeId, VersionId]], nursery: trio.Nursery) -> None:
        retries: Counter[VersionId] = Counter()
        async for inode, vid in recv:
            try:
                if self.health.failsafe:
                    continue  # background writes stopped: it stays staged (and readable)
                async with self.gate.shared():
                    failpoints.hit("ingest")
                    await self._ingest(inode, vid)
                retries.pop(vid, None)
            except FileChanged as exc:
                log.debug("version %d changed during ingest (%s)", vid, exc)
            except (CacheFull, OSError, sqlite3.OperationalError) as exc:
                if is_fatal(exc):
                    self.health.trip(f"ingest of version {vid} failed", exc)
                    continue
                retries[vid] += 1
                delay = min(60.0, 2.0 ** retries[vid])
                log.warning("ingest of version %d failed (%s); retrying in %.0f s", vid, exc, delay)
                nursery.start_soon(self._retry_later, inode, vid, delay)
            except Exception as exc:
                self.health.trip(f"ingest of version {vid} failed unexpectedly", exc)
            finally:
                self._queued.pop(vid, None)
                if vid in self._again:
                    self._again.discard(vid)
                    self.submit(inode, vid)
                if not self._queued:
                    self._idle.set()

    async def _retry_later(self, inode: InodeId, vid: VersionId, delay: float) -> None:
        await trio.sleep(delay)
        if self.contents.is_sealed(inode, vid):
            self.submit(inode, vid)

    async def _ingest(self, inode: InodeId, vid: VersionId) -> None:
        snap = self.contents.ingest_snapshot(inode, vid)
        if snap is None:
            return  # reopened, superseded or deleted since it was sealed
        fd, size, gen = snap
        started = time.monotonic()
        pinned: list[ChunkId] = []
        turn: trio.Event | None = None
        signature: str | None = None
        try:
            s = self.settings
            positional = self._positional_key(inode, size)
            layout, signature, pieces = await self.workers.run_background(
                plan_file, fd, size, s.piece_size, s.cdc_avg, positional
            )
            if signature:
                # Versions of one layout are ingested in the order they were planned: each is coded
                # against the one before, whether it arrived minutes later or while that one was still
                # being ingested (back-to-back saves would otherwise get keyframes, or bases two
                # versions old, and store more).
                before = self._layout_turns.get(signature)
                turn = self._layout_turns[signature] = trio.Event()
                if before is not None:
                    await before.wait()
            slot_map = self.chunks.slot_bases(signature) if signature else {}
            results: dict[int, ChunkId] = {}
            new_chunks: list[ChunkId] = []
            new_files: list[ChunkId] = []  # new chunks with a frame file of their own
            used_bases: list[tuple[ChunkId, VersionId | None]] = []  # with the version it came from
            limit = trio.Semaphore(s.parallel_pieces)

            async def one(piece: Piece) -> None:
                try:
                    candidate = slot_map.get(piece.slot) if piece.slot else None
                    flat = self.contents.reader.flat
                    base = choose_base(self.chunks, candidate, s.max_chain, self.bases, inode, flat.ids if flat else ())
                    base_bytes = None if base is None else base[2]
                    if base is not None:
                        self.chunks.pin(base[0])
                        pinned.append(base[0])
                        if base_bytes is None and base[1] > 0 and flat is not None:
                            base_bytes = await self._flat_bytes(flat, base[0])
                    job = _PieceJob(
                        fd,
                        piece,
                        s.zstd_level,
                        None if base is None else base[0],
                        base_bytes,
                        None if candidate is None else candidate.chunk,
                    )
                    if not piece.slot:  # content-defined: most often a duplicate; encode only what is new
                        data, cid = await self.workers.run_background(_read_and_hash, fd, piece)
                        encoded = None
                    elif piece.length <= _INLINE:
                        data, cid, encoded = _read_and_encode(self.chunks.cache, job)
                    else:
                        data, cid, encoded = await self.workers.run_background(_read_and_encode, self.chunks.cache, job)
                    self.chunks.pin(cid)
                    pinned.append(cid)
                    results[piece.offset] = cid
                    while not self.chunks.has(cid):
                        wait = self.chunks.claim(cid)
                        if wait is not None:
                            await wait.wait()
                            continue
                        try:
                            if encoded is None:
                                encoded = await self.workers.run_background(
                                    encode_piece,
                                    self.chunks.cache,
                                    data,
                                    s.zstd_level,
                                    piece.elem_width,
                                    job.base,
                                    job.base_bytes,
                                )
                            frame, codec, used = encoded
                            small = self.chunks.cache.is_small(frame)
                            if small:
                                self.chunks.cache.check_space(cid, len(frame))
                            else:
                                await self.workers.run_io(self.chunks.cache.put, cid, frame)
                                new_files.append(cid)
                                self.chunks.unsynced.add(cid)
                            depth = base[1] + 1 if used is not None and base is not None else 0
                            self.chunks.record_stored(
                                cid, codec, len(data), len(frame), used, depth, frame if small else None
                            )
                            if used is not None:
                                same = candidate is not None and used == candidate.chunk
                                used_bases.append((used, candidate.version if same and candidate else None))
                            new_chunks.append(cid)
                        finally:
                            self.chunks.release_claim(cid)
                    if piece.slot:
                        self._keep_base(candidate, cid, data)
                finally:
                    limit.release()

            try:
                async with trio.open_nursery() as nursery:
                    for piece in pieces:
                        if not self.contents.still_sealed(inode, vid, gen):
                            break
                        await limit.acquire()
                        nursery.start_soon(one, piece)
            except BaseExceptionGroup as group:
                raise _first_leaf(group) from group
            if not self.contents.still_sealed(inode, vid, gen):
                log.debug("version %d changed during ingest; will be ingested again", vid)
                return
            # also the entries of chunks another job stored and this version dedups against: that job
            # may not have fsynced their directories yet when this version's commit becomes durable
            to_sync = set(new_files) | (self.chunks.unsynced & set(results.values()))
            await self.workers.run_io(self.chunks.cache.sync_dirs, to_sync)
            self.chunks.unsynced -= to_sync
            if not self.contents.still_sealed(inode, vid, gen):
                return
            base_version = self._base_version(used_bases)
            dropped = self._commit(inode, vid, size, layout, signature, base_version, pieces, results, new_chunks)
            await self.contents.committed(inode, dropped)
            log.debug(
                "version %d: %d bytes -> %d pieces (%s) in %.2fs",
                vid,
                size,
                len(pieces),
                layout,
                time.monotonic() - started,
            )
        finally:
            if turn is not None and signature:
                turn.set()
                if self._layout_turns.get(signature) is turn:
                    del self._layout_turns[signature]
            os.close(fd)
            self.chunks.unpin(pinned)
            self.chunks.collect(set(pinned))

    async def _flat_bytes(self, flat: FlatCopies, cid: ChunkId) -> bytes | None:
        """A delta base's plain bytes from its flat copy; None if it has gone or is torn (then the
        encode decodes the base's chain, as the reader does; the reader drops a bad copy)."""
        try:
            return await self.workers.run_background(flat.read, cid)
        except (CorruptChunk, OSError):  # ChunkMissing is a CorruptChunk
            return None

    def _keep_base(self, previous: SlotBase | None, cid: ChunkId, data: bytes) -> None:
        """Keep in memory what the next version of a slot will use as its base: this chunk, unless its
        chain is full (then the next one goes back to the keyframe). The slot's previous chunk is not
        needed any more; a keyframe is kept, but first in line for eviction. Without this, ingesting
        a checkpoint larger than half the cache evicted the previous version's bases before they were
        used, and 40 % of the pieces decoded their base from disk."""
        depth = self.chunks.depth(cid)
        if depth is not None and depth < self.settings.max_chain:
            self.bases.put(cid, data)
        if previous is not None and previous.chunk != cid:
            if previous.depth > 0:
                self.bases.pop(previous.chunk)
            else:
                self.bases.demote(previous.chunk)

    def _positional_key(self, inode: InodeId, size: int) -> str | None:
        """'name:size' when another existing file has this file's name and size (a sibling shard of an
        earlier step), so pieces at fixed offsets can be delta-coded against it; else None."""
        if size < _MIN_POSITIONAL:
            return None
        db = self.contents.db
        row = db.one("SELECT name FROM dirents WHERE inode=? LIMIT 1", (inode,))
        if row is None:
            return None
        twin = db.one(
            "SELECT 1 FROM dirents d JOIN inodes i ON i.id = d.inode"
            " WHERE d.name=? AND i.size=? AND i.id<>? AND i.nlink > 0 LIMIT 1",
            (row[0], size, inode),
        )
        return None if twin is None else f"{bytes(row[0]).decode(errors='replace')}:{size}"

    def _base_version(self, used_bases: list[tuple[ChunkId, VersionId | None]]) -> VersionId | None:
        """The version most of this version's delta bases came from (for ``ls-versions``): the slot's
        version when the base was the slot's latest chunk (known even if that file is gone by now, as
        when tmp + rename replaced it during the ingest), else the newest version using the chunk."""
        votes: Counter[int] = Counter()
        for cid, version in used_bases[:64]:
            if version is None:
                row = self.contents.db.one(
                    "SELECT version FROM extents WHERE chunk=? ORDER BY version DESC LIMIT 1", (cid,)
                )
                version = None if row is None else VersionId(int(row[0]))
            if version is not None:
                votes[int(version)] += 1
        return VersionId(votes.most_common(1)[0][0]) if votes else None

    def _commit(
        self,
        inode: InodeId,
        vid: VersionId,
        size: int,
        layout: str,
        signature: str | None,
        base_version: VersionId | None,
        pieces: list[Piece],
        results: dict[int, ChunkId],
        new_chunks: list[ChunkId],
    ) -> list[str]:
        """Commit the version as ``local`` and drop its fallbacks; return their staging files' names (deleted,
        with the version's own, once this is durable: ``FileContents.committed``)."""
        touched: list[ChunkId] = []
        with self.contents.db.transaction() as c:  # atomic: no await until commit
            ChunkIndex.queue_compaction_in(c, new_chunks)
            c.executemany(
                "INSERT INTO extents (version, offset, length, chunk, slot) VALUES (?,?,?,?,?)",
                [(vid, p.offset, p.length, results[p.offset], p.slot) for p in pieces],
            )
            add_refs(c, Counter(results[p.offset] for p in pieces))
            row = c.execute("SELECT inode FROM versions WHERE id=?", (base_version,)).fetchone()
            c.execute(
                "UPDATE versions SET state=?, staging=NULL, layout=?, size=?, signature=?, base_version=?,"
                " base_inode=? WHERE id=?",
                (VersionState.LOCAL.value, layout, size, signature, base_version, row and row[0], vid),
            )
            if signature is not None:
                slots = [(p.slot, results[p.offset]) for p in pieces if p.slot]
                touched += ChunkIndex.set_slots(c, signature, vid, slots)
            c.execute("UPDATE inodes SET size=? WHERE id=?", (size, inode))
            queue_in(c, vid)
            for v in self.contents.versions.history(inode):
                self.contents.reader.forget_version(v.id)
            dropped, names = Versions.drop_older_in(c, inode, vid)
        self.chunks.collect(touched + dropped)
        return names
