"""Reads of committed (chunked) versions, with an LRU of decoded chunks.

Trio thread for bookkeeping; fetching and decoding a chunk runs in a foreground worker thread.
Concurrent reads of one chunk share a single decode. Every decoded chunk is verified against its id
(``codec.decode``), so a corrupt frame raises ``CorruptChunk`` and never yields wrong bytes.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ckptfs.cache import ChunkCache
from ckptfs.codec import decode, parse_header
from ckptfs.errors import ChunkMissing, CorruptChunk
from ckptfs.files.flat import FlatCopies
from ckptfs.files.lru import BytesLRU
from ckptfs.files.workers import Workers
from ckptfs.meta import Database
from ckptfs.meta.tiering import Tiering
from ckptfs.types import ChunkId, VersionId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Extents:
    """A committed version's chunk map; immutable, so it is cached."""

    offsets: list[int]
    lengths: list[int]
    chunks: list[ChunkId]


# Chunks up to this size are decoded on the trio thread: faster than a thread round trip.
_INLINE_DECODE = 64 * 1024
# The read-ahead window of a sequential reader starts here and doubles per read.
_AHEAD_START = 1024 * 1024
# Frames of cold chunks are fetched from the store at most this far ahead of a sequential reader.
_FRAMES_AHEAD_MAX = 256 * 1024 * 1024
# Longer delta chains than this are treated as corrupt (they cannot be written; a cycle would loop).
MAX_CHAIN = 64


def fetch_and_decode(cache: ChunkCache, cid: ChunkId, _depth: int = 0) -> bytes:
    """Worker thread: read a chunk frame from the cache and decode it, its delta bases first (verifying ids)."""
    if _depth > MAX_CHAIN:
        raise CorruptChunk(f"delta chain through {cid.hex()} is longer than {MAX_CHAIN}")
    frame = cache.get(cid)
    hdr = parse_header(frame)
    base = fetch_and_decode(cache, hdr.base, _depth + 1) if hdr.base is not None else None
    return decode(frame, cid, base)


class ChunkReader:
    def __init__(
        self, db: Database, cache: ChunkCache, workers: Workers, cache_bytes: int, decode_threads: int = 4
    ) -> None:
        self.db = db
        self.cache = cache
        self.workers = workers
        self._decoded = BytesLRU(cache_bytes, keep_last=True)
        self.flat: FlatCopies | None = None  # decoded copies of the newest chunks (set by the daemon)
        self._pending: dict[ChunkId, trio.Event] = {}
        self._extents: OrderedDict[VersionId, Extents] = OrderedDict()
        # Read-ahead: per version, where the last read ended and the current window; at most half the
        # decoded cache is read ahead (more would evict what is being read), ``decode_threads`` chunks at once.
        self._streams: dict[VersionId, tuple[int, int]] = {}
        self._ahead_max = max(_AHEAD_START, cache_bytes // 2)
        self._ahead_limit = trio.CapacityLimiter(max(1, decode_threads))
        # Cold data: frames not in the cache are fetched from the store further ahead (up to
        # _FRAMES_AHEAD_MAX, 8 at once), into the cache, and decoded when the decode window gets there.
        self._frames_limit = trio.CapacityLimiter(8)
        self._frames_seen: set[ChunkId] = set()  # fetched ahead already, or found in the cache
        self._nursery: trio.Nursery | None = None
        self.prefetched = 0
        self.frames_prefetched = 0
        self.requests = 0  # reads of committed versions served (FUSE read requests), and their bytes
        self.request_bytes = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the read-ahead tasks until cancelled (without it, reads simply do not read ahead)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def decoded(self) -> BytesLRU:
        """The decoded-chunk cache (its ``size``, ``capacity`` and ``peak`` are in ``ckptfs status``)."""
        return self._decoded

    def extents(self, vid: VersionId) -> Extents:
        ext = self._extents.get(vid)
        if ext is None:
            rows = self.db.execute(
                "SELECT offset, length, chunk FROM extents WHERE version=? ORDER BY offset", (vid,)
            ).fetchall()
            ext = Extents([r[0] for r in rows], [r[1] for r in rows], [ChunkId(r[2]) for r in rows])
            self._extents[vid] = ext
            if len(self._extents) > 256:
                self._extents.popitem(last=False)
        else:
            self._extents.move_to_end(vid)
        return ext

    def forget_version(self, vid: VersionId) -> None:
        self._extents.pop(vid, None)

    async def chunk(self, cid: ChunkId, _depth: int = 0) -> bytes:
        """Decoded bytes of ``cid``, decoding its delta bases first. Raises ``CorruptChunk`` (``ChunkMissing`` too).

        Checkpoints. Concurrent callers for one chunk share a single decode.
        """
        data = self._decoded.get(cid)
        if data is not None:
            return data
        if _depth > MAX_CHAIN:
            raise CorruptChunk(f"delta chain through {cid.hex()} is longer than {MAX_CHAIN}")
        ev = self._pending.get(cid)
        if ev is not None:
            await ev.wait()
            return await self.chunk(cid, _depth)
        ev = self._pending[cid] = trio.Event()
        try:
            flat = await self._flat_copy(cid)
            if flat is not None:
                data = flat
            else:
                self._fetch_chain_ahead(cid)
                frame = await self._frame(cid)
                try:
                    data = await self._decode(cid, frame, _depth)
                except ChunkMissing:
                    raise
                except CorruptChunk as exc:
                    data = await self._heal(cid, frame, exc, _depth)
        finally:
            del self._pending[cid]
            ev.set()
        self._decoded.put(cid, data)
        return data

    async def _flat_copy(self, cid: ChunkId) -> bytes | None:
        """The chunk read from its decoded copy (``files.flatten``), if it has a good one; a torn or
        corrupt copy is dropped (the chain is read instead)."""
        flat = self.flat
        if flat is None or cid not in flat.ids:
            return None
        try:
            data = await self.workers.run_foreground(flat.read, cid)
        except (ChunkMissing, CorruptChunk, OSError) as exc:
            if cid in flat.ids:  # (not dropped meanwhile by the flattener)
                flat.drop(cid)
                log.warning("flat copy of chunk %s dropped, reading its delta chain: %s", cid.hex(), exc)
            return None
        flat.reads += 1
        return data

    def _fetch_chain_ahead(self, cid: ChunkId) -> None:
        """A chunk missing from the cache with a delta chain: fetch every base's frame at once (they are
        known from the rows), instead of one after the other as the decode reaches them."""
        if self._nursery is None or self.cache.holds(cid):
            return
        rows = self.db.execute(
            "WITH RECURSIVE t(id, n) AS (SELECT base, 1 FROM chunks WHERE id=? AND base IS NOT NULL"
            " UNION SELECT c.base, t.n + 1 FROM chunks c JOIN t ON c.id = t.id WHERE c.base IS NOT NULL AND t.n < ?)"
            " SELECT id FROM t",
            (cid, MAX_CHAIN),
        ).fetchall()
        for (base,) in rows:
            b = ChunkId(bytes(base))
            if self._decoded.get(b) is None and b not in self._pending:
                self._nursery.start_soon(self._prefetch, b)

    async def _prefetch(self, cid: ChunkId) -> None:
        """Decode ``cid`` into the LRU ahead of a read; errors are the demand read's to report."""
        async with self._ahead_limit:
            if self._decoded.get(cid) is not None or cid in self._pending:
                return
            try:
                await self.chunk(cid)
                self.prefetched += 1
            except CorruptChunk as exc:
                log.debug("read-ahead of chunk %s failed: %s", cid.hex(), exc)

    def _read_ahead(self, vid: VersionId, ext: Extents, off: int, end: int, nxt: int) -> None:
        """After a read of [off, end): if it continued the previous one, grow the window (doubling from
        1 MiB to half the decoded cache) and start decoding the chunks from index ``nxt`` that fall in
        it; a jump starts over."""
        if self._nursery is None:
            return
        last_end, window = self._streams.get(vid, (-1, 0))
        window = min(window * 2, self._ahead_max) if off == last_end else _AHEAD_START
        self._streams[vid] = (end, window)
        if len(self._streams) > 256:
            self._streams.pop(next(iter(self._streams)))
        j = nxt
        while j < len(ext.offsets) and ext.offsets[j] < end + window:
            cid = ext.chunks[j]
            if self._decoded.get(cid) is None and cid not in self._pending:
                self._nursery.start_soon(self._prefetch, cid)
            j += 1
        if self.cache.remote is None:
            return
        frames_window = min(window * 8, _FRAMES_AHEAD_MAX)
        while j < len(ext.offsets) and ext.offsets[j] < end + frames_window:
            cid = ext.chunks[j]
            j += 1
            if cid in self._frames_seen:
                continue
            if len(self._frames_seen) > 100_000:
                self._frames_seen.clear()
            self._frames_seen.add(cid)
            if not self.cache.holds(cid):
                self._nursery.start_soon(self._prefetch_frame, cid)

    async def _prefetch_frame(self, cid: ChunkId) -> None:
        """Fetch a frame the cache lacks from the store into the cache, ahead of its decode."""
        async with self._frames_limit:
            try:
                await self._frame(cid)
                self.frames_prefetched += 1
            except CorruptChunk as exc:
                log.debug("fetching chunk %s ahead failed: %s", cid.hex(), exc)

    async def _decode(self, cid: ChunkId, frame: bytes, _depth: int) -> bytes:
        hdr = parse_header(frame)
        try:
            base = await self.chunk(hdr.base, _depth + 1) if hdr.base is not None else None
        except ChunkMissing:
            # re-encoded against another base (files.repack) after we read it, the old base collected
            frame = await self._frame(cid)
            hdr = parse_header(frame)
            base = await self.chunk(hdr.base, _depth + 1) if hdr.base is not None else None
        if hdr.raw_len <= _INLINE_DECODE:
            return decode(frame, cid, base)
        return await self.workers.run_foreground(decode, frame, cid, base)

    async def _heal(self, cid: ChunkId, frame: bytes, exc: CorruptChunk, _depth: int) -> bytes:
        """A corrupt local frame: decode the store's copy instead (if it has one) and keep it. Raises the
        original error when there is nothing better."""
        remote = await self.workers.run_foreground(self.cache.remote_frame, cid)
        if remote is None or remote == frame:
            raise exc
        data = await self._decode(cid, remote, _depth)
        if self.cache.is_small(remote):
            Tiering(self.db).keep_small_frame(cid, remote, replace=True)
        else:
            await self.workers.run_foreground(self.cache.keep, cid, remote, True)
        log.warning("chunk %s was corrupt in the local cache (%s); read and healed from the store", cid.hex(), exc)
        return data

    async def _frame(self, cid: ChunkId) -> bytes:
        """The stored frame of ``cid``: a small one from the database right here, through this thread's
        read connection (a thread round trip would cost more), else the file's, read in a worker thread."""
        small = self.cache.small(cid)
        if small is not None:
            return small
        frame = await self.workers.run_foreground(self.cache.get, cid)
        if self.cache.is_small(frame):  # fetched from the store (a local one would have been a row): keep it
            Tiering(self.db).keep_small_frame(cid, frame, replace=False)
        return frame

    async def read(self, vid: VersionId, size_of_file: int, off: int, size: int, what: str) -> bytes:
        """Read ``size`` bytes at ``off`` of committed version ``vid``. ``what`` names the file in logs."""
        end = min(off + size, size_of_file)
        if off >= end:
            return b""
        ext = self.extents(vid)
        i = max(0, bisect.bisect_right(ext.offsets, off) - 1)
        parts: list[bytes] = []
        pos = off
        while pos < end and i < len(ext.offsets):
            c_off, c_len, cid = ext.offsets[i], ext.lengths[i], ext.chunks[i]
            self.cache.touch(cid)
            try:
                data = await self.chunk(cid)
            except CorruptChunk as exc:
                log.error("corrupt chunk %s in %s at offset %d: %s", cid.hex(), what, c_off, exc)
                raise
            lo = pos - c_off
            hi = min(end, c_off + c_len) - c_off
            parts.append(data[lo:hi])
            pos = c_off + hi
            i += 1
        self._read_ahead(vid, ext, off, end, i)
        self.requests += 1
        self.request_bytes += end - off
        return b"".join(parts)
