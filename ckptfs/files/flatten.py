"""Flat copies: the newest chunk of every delta-base slot also kept as a keyframe, in the cache only
(``ingest.flat_newest``, on by default).

Ingest codes a checkpoint against the previous one of its layout (``files.delta``), so the newest —
the one a restore reads — sits at the deep end of a chain and costs ``depth + 1`` decodes per chunk.
Reverse deltas (``files.reverse``) re-encode the history instead, which with tiering puts every
version into the bucket twice (its keyframe while it is the newest, then its delta): the bucket is
immutable and a node uploads a version as soon as it is local. A flat copy changes nothing the
metadata or the bucket knows: while ingest is idle, each chunk a slot names (the newest of its slot)
that is a delta is decoded once and encoded alone (fast zstd) into ``<cache>/flat/<ab>/<id>``. The
reader decodes that copy when there is one; the chunk's own frame, its chain and its upload stay as
they are. When the slot moves on to a newer version (or the chunk becomes a keyframe, or goes), its
copy is deleted at the next pass.

Crash safety needs no protocol: a copy is written ``tmp`` -> ``rename`` without an fsync, and is
only ever a second encoding of a chunk whose canonical frame is untouched. A copy that is torn,
corrupt (the decoded bytes are checked against the chunk id like every frame) or missing is dropped
and the read decodes the chain. The copies count against the cache cap and are the first thing the
evictor drops (``files.evict``); none is made while the cache is over its cap or the disk is low.
The cost: one decode of the chain and one encode per changed chunk per version, in idle time, and
the local disk space of one keyframe per layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ckptfs.cache import ChunkCache
from ckptfs.codec import decode, encode, parse_header
from ckptfs.errors import CacheFull, ChunkMissing, CorruptChunk
from ckptfs.files.flat import FlatCopies
from ckptfs.files.reader import fetch_and_decode
from ckptfs.files.workers import Workers
from ckptfs.meta import Database
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)


def keyframe_of(cache: ChunkCache, cid: ChunkId, level: int) -> bytes:
    """Worker thread: ``cid`` decoded through its chain and encoded alone."""
    frame = cache.get(cid)
    hdr = parse_header(frame)
    data = decode(frame, cid, None if hdr.base is None else fetch_and_decode(cache, hdr.base))
    return encode(data, level, hdr.width, None)[0]


@dataclass(frozen=True, slots=True)
class FlattenSettings:
    zstd_level: int
    period_s: float = 1.0


class Flattener:
    def __init__(
        self,
        db: Database,
        cache: ChunkCache,
        flat: FlatCopies,
        workers: Workers,
        busy: Callable[[], bool],
        room: Callable[[], bool],
        settings: FlattenSettings,
    ) -> None:
        self.db = db
        self.cache = cache
        self.flat = flat
        self.workers = workers
        self.busy = busy
        self.room = room  # is there room on the cache disk (under the cap, disk not low)?
        self.settings = settings
        self._failed: set[ChunkId] = set()  # not tried again this session (logged once)

    def wanted(self) -> set[ChunkId]:
        """Chunks a delta-base slot names (the newest of their slot) that are deltas."""
        rows = self.db.execute(
            "SELECT DISTINCT s.chunk FROM slot_index s JOIN chunks c ON c.id = s.chunk WHERE c.depth > 0"
        ).fetchall()
        return {ChunkId(bytes(r[0])) for r in rows}

    @property
    def pending(self) -> int:
        """Newest chunks that still lack a copy (and will be tried)."""
        return len(self.wanted() - self.flat.ids - self._failed)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.settings.period_s)
            await self.step()

    async def step(self) -> None:
        """One pass: drop the copies no slot wants any more, then copy what is missing while idle."""
        wanted = self.wanted()
        for cid in self.flat.ids - wanted:
            self.flat.drop(cid)
        todo = sorted(wanted - self.flat.ids - self._failed)
        for cid in todo:
            if self.busy() or not self.room():
                return
            try:
                frame = await self.workers.run_background(keyframe_of, self.cache, cid, self.settings.zstd_level)
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
