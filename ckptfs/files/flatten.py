"""Flat copies: the newest chunk of every delta-base slot also kept decoded, in the cache only
(``ingest.flat_newest``, on by default).

Ingest codes a checkpoint against the previous one of its layout (``files.delta``), so the newest —
the one a restore reads — sits at the deep end of a chain and costs ``depth + 1`` decodes per chunk.
Reverse deltas (``files.reverse``) re-encode the history instead, which with tiering puts every
version into the bucket twice (its keyframe while it is the newest, then its delta): the bucket is
immutable and a node uploads a version as soon as it is local. A flat copy changes nothing the
metadata or the bucket knows: while ingest is idle, each chunk a slot names (the newest of its slot)
that is a delta is decoded once and written as a raw frame (the plain bytes behind a frame header)
to ``<cache>/flat/<ab>/<id>``. The reader takes that copy when there is one; the chunk's own frame,
its chain and its upload stay as they are. When the slot moves on to a newer version (or the chunk
becomes a keyframe, or goes), its copy is deleted at the next pass.

Why raw: reading a raw frame costs a copy and the id check, 0.11 s of CPU per GB, against 0.92 for
a byte-grouped zstd keyframe (measured per 4 MiB piece of an fp32 AdamW checkpoint, one thread),
for 1.24x the space of such a keyframe. A restore is CPU-bound on the cores ``torch.load`` shares;
NVMe reads the extra bytes in less time than zstd takes to inflate them.

Crash safety needs no protocol: a copy is written ``tmp`` -> ``rename`` without an fsync, and is
only ever a second form of a chunk whose canonical frame is untouched. A copy that is torn, corrupt
(the bytes are checked against the chunk id like every frame's) or missing is dropped and the read
decodes the chain. The copies count against the cache cap and are the first thing the evictor drops
(``files.evict``); none is made while the cache is over 90 % of its cap or the disk is low. The
cost: one decode of the chain per changed chunk per version, in idle time, and the local disk space
of the newest checkpoint's changed tensors, uncompressed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ckptfs.cache import ChunkCache
from ckptfs.codec import decode, encode_raw, parse_header
from ckptfs.codec.frame import HEADER_SIZE
from ckptfs.errors import CacheFull, ChunkMissing, CorruptChunk
from ckptfs.files.flat import FlatCopies
from ckptfs.files.reader import fetch_and_decode
from ckptfs.files.workers import Workers
from ckptfs.meta import Database
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)


def flat_frame(cache: ChunkCache, cid: ChunkId) -> bytes:
    """Worker thread: ``cid`` decoded through its chain, as a raw frame."""
    frame = cache.get(cid)
    hdr = parse_header(frame)
    return encode_raw(decode(frame, cid, None if hdr.base is None else fetch_and_decode(cache, hdr.base)))


class Flattener:
    def __init__(
        self,
        db: Database,
        cache: ChunkCache,
        flat: FlatCopies,
        workers: Workers,
        busy: Callable[[], bool],
        room: Callable[[int], bool],
        period_s: float = 1.0,
    ) -> None:
        self.db = db
        self.cache = cache
        self.flat = flat
        self.workers = workers
        self.busy = busy
        self.room = room  # may this many bytes more go on the cache disk (the cap, a low disk)?
        self.period_s = period_s
        self._failed: set[ChunkId] = set()  # not tried again this session (logged once)

    def wanted(self) -> dict[ChunkId, int]:
        """Chunks a delta-base slot names (the newest of their slot) that are deltas, and their plain sizes."""
        rows = self.db.execute(
            "SELECT DISTINCT s.chunk, c.raw_len FROM slot_index s JOIN chunks c ON c.id = s.chunk WHERE c.depth > 0"
        ).fetchall()
        return {ChunkId(bytes(r[0])): int(r[1]) for r in rows}

    @property
    def pending(self) -> int:
        """Copies still to make (and to be tried) or to drop (their slot moved on, or the chunk became a
        keyframe, e.g. by compaction)."""
        wanted = self.wanted().keys()
        return len(wanted - self.flat.ids - self._failed) + len(self.flat.ids - wanted)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.period_s)
            await self.step()

    async def step(self) -> None:
        """One pass: drop the copies no slot wants any more, then copy what is missing while idle."""
        wanted = self.wanted()
        for cid in self.flat.ids - wanted.keys():
            self.flat.drop(cid)
        todo = sorted(wanted.keys() - self.flat.ids - self._failed)
        for cid in todo:
            if self.busy() or not self.room(wanted[cid] + HEADER_SIZE):
                return  # (no room: again once there is, under the cap and on the disk)
            try:
                frame = await self.workers.run_background(flat_frame, self.cache, cid)
                await self.workers.run_io(self.flat.write, cid, frame)
            except ChunkMissing:
                continue  # re-encoded or collected meanwhile: the next pass sees what is there now
            except CacheFull:
                return  # the disk is nearly full: again once there is room
            except (CorruptChunk, OSError) as exc:
                self._failed.add(cid)
                log.warning("no flat copy of chunk %s: %s", cid.hex(), exc)
                return
            self.flat.ids.add(cid)
            self.flat.made += 1
