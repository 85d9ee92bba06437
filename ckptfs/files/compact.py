"""Compaction: re-encode stored float chunks with pcodec when that is denser, off the ingest path.

Ingest stores every piece in the fastest form that compresses it well (byte planes + zstd, against
a base or not), so ``close()`` to ``local`` stays quick. pcodec stores float keyframes 3-7 % and
differences 2-5 % smaller on AdamW checkpoints and decodes faster, but encodes at half zstd-3's speed
for fp32 and a quarter for bf16 — a cost for idle time, not for the window between two saves.

New chunks wait in ``compact_queue``. Whenever no version is being written or waits for ingest and
the other processes leave a core idle (``files.cpuload``: a CPU trainer keeps it waiting), each
queued chunk whose frame has whole 2/4/8-byte elements is encoded again with pcodec (of its difference to the base it
has now, or of its elements alone when a sample says that is smaller) and the frame is swapped
(``files.swap``) if it is at least ``MIN_GAIN`` smaller. A delta may become a keyframe here; no chunk
gets a new base, so chains only get shorter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ckptfs import failpoints
from ckptfs.cache import ChunkCache
from ckptfs.codec import Codec, decode, encode_pco, parse_header
from ckptfs.codec.numeric import WIDTHS
from ckptfs.errors import CacheFull, CorruptChunk
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.gate import Gate
from ckptfs.files.reader import fetch_and_decode
from ckptfs.files.swap import swap_frame
from ckptfs.files.workers import Workers
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)

# pcodec frames also decode faster than the zstd forms (545 vs 202 MB/s for fp32 deltas: no byte-plane
# transpose), so any real gain counts; below this a swap is not worth its write and fsync.
MIN_GAIN = 0.005
_MIN_SIZE = 64 * 1024  # smaller chunks are not worth a second pass
_SAMPLE = 256 * 1024  # bytes from the middle of a delta chunk that decide between its two pcodec forms
_ZSTD_FORMS = {Codec.ZSTD, Codec.GROUPED_ZSTD, Codec.DELTA_GROUPED_ZSTD, Codec.SUB_GROUPED_ZSTD}


@dataclass(frozen=True, slots=True)
class CompactSettings:
    pco_level: int  # 0 = off: the queue is drained without work
    period_s: float = 0.5


def _denser_frame(cache: ChunkCache, cid: ChunkId, level: int) -> bytes | None:
    """Worker thread: a pcodec frame of ``cid`` — of its difference to its current base, or of its
    elements alone when that is smaller on a sample — if it beats the stored frame by ``MIN_GAIN``;
    else None."""
    old = cache.get(cid)
    hdr = parse_header(old)
    if hdr.codec not in _ZSTD_FORMS or hdr.raw_len < _MIN_SIZE:
        return None
    width = hdr.width if hdr.width in WIDTHS else 0
    if not width or hdr.raw_len % width:
        return None
    base_bytes = None if hdr.base is None else fetch_and_decode(cache, hdr.base)
    data = decode(old, cid, base_bytes)
    # pcodec differences need equal lengths; the elements alone may still be denser
    base = None if hdr.base is None or base_bytes is None or len(base_bytes) != len(data) else (hdr.base, base_bytes)
    if base is not None:
        mid = (len(data) // 2 - _SAMPLE // 2) // width * width
        window = slice(max(0, mid), max(0, mid) + _SAMPLE)
        alone = len(encode_pco(data[window], width, level))
        if alone < len(encode_pco(data[window], width, level, (base[0], base[1][window]))):
            base = None  # the delta does not pay (a span of many versions, fast-moving moments)
    frame = encode_pco(data, width, level, base)
    return frame if len(frame) <= len(old) * (1 - MIN_GAIN) else None


class Compactor:
    def __init__(
        self, chunks: ChunkIndex, workers: Workers, gate: Gate, busy: Callable[[], bool], settings: CompactSettings
    ) -> None:
        self.chunks = chunks
        self.workers = workers
        self.gate = gate
        self.busy = busy  # True while a version is written or waits for ingest, or no core is idle
        self.settings = settings

    async def run(self) -> None:
        """Until cancelled: work through the queue while ingest is idle."""
        while True:
            await trio.sleep(self.settings.period_s)
            while not self.busy():
                batch = self.chunks.compaction_batch(16)
                if not batch:
                    break
                for cid in batch:
                    if self.busy():
                        break
                    if self.settings.pco_level <= 0:  # off: drain the queue
                        self.chunks.compaction_done(cid)
                        continue
                    try:
                        async with self.gate.exclusive():
                            failpoints.hit("compact")
                            await self._compact(cid)
                    except (CacheFull, OSError, CorruptChunk) as exc:
                        log.warning("compaction of chunk %s skipped: %s", cid.hex(), exc)
                    self.chunks.compaction_done(cid)

    async def _compact(self, cid: ChunkId) -> None:
        level = self.settings.pco_level
        depth = self.chunks.depth(cid)
        if depth is None or self.chunks.in_store(cid):
            return  # gone; or uploaded already: a denser frame would have to go up again, for a few percent
        self.chunks.pin(cid)
        try:
            frame = await self.workers.run_background(_denser_frame, self.chunks.cache, cid, level)
            if frame is not None and self.chunks.has(cid):
                new_depth = depth if parse_header(frame).base is not None else 0
                # (became a keyframe: everything coded against it moves up with it, in ``finish_rebase``)
                await swap_frame(self.chunks, self.workers, cid, frame, new_depth)
        finally:
            self.chunks.unpin([cid])
            self.chunks.collect([cid])
