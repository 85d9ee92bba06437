"""Reverse deltas: the newest version of each layout becomes a keyframe, the one before it a delta
against it (``ingest.newest_keyframe``; off by default).

Ingest codes a new checkpoint against the previous one of its layout (``files.delta``), so the newest
— the one a restore reads — sits at the deep end of a chain and costs ``depth + 1`` decodes per chunk.
While ingest is idle, for every chunk a delta-base slot names (the newest chunk of that slot) that is
a delta ``c -> b``:

1. ``c`` is re-encoded alone (a keyframe); what is coded against ``c`` moves up by its old depth;
2. ``b`` is re-encoded as a delta against ``c`` — if ``b`` is still live, is not itself a slot's newest
   chunk, and the chunks coded against ``b`` stay within ``max_chain`` at their new depth. Otherwise ``b``
   keeps its frame (and a keyframe stays in the history, as ingest's own chain bound makes one).

In steady state the previous newest was a keyframe, so the two swaps only trade places: the stored
bytes stay those of forward chains. Each swap is ``files.swap`` (crash-safe; a crash between the two
leaves two keyframes, both decodable); re-encoded chunks take the fast zstd forms and join the queue of
``files.compact``, like newly ingested ones. Run holding the ingest gate exclusively, like repack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ckptfs import failpoints
from ckptfs.errors import CacheFull, CorruptChunk
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.gate import Gate
from ckptfs.files.repack import reencode_swap
from ckptfs.files.workers import Workers
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)

_BATCH = 64  # chunks flipped per pass before looking at ``busy`` again


@dataclass(frozen=True, slots=True)
class ReverseSettings:
    max_chain: int
    zstd_level: int
    period_s: float = 0.5


class Reverser:
    def __init__(
        self, chunks: ChunkIndex, workers: Workers, gate: Gate, busy: Callable[[], bool], settings: ReverseSettings
    ) -> None:
        self.chunks = chunks
        self.workers = workers
        self.gate = gate
        self.busy = busy
        self.settings = settings
        self.flipped = 0  # newest chunks made keyframes
        self.rebased = 0  # previous ones re-encoded against them
        self._failed: set[ChunkId] = set()  # not tried again this session (logged once)

    def candidates(self, limit: int) -> list[ChunkId]:
        """Chunks a delta-base slot names (the newest of their slot) that are still deltas."""
        rows = self.chunks.db.execute(
            "SELECT DISTINCT s.chunk FROM slot_index s JOIN chunks c ON c.id = s.chunk"
            " WHERE c.base IS NOT NULL LIMIT ?",
            (limit,),
        ).fetchall()
        return [ChunkId(bytes(r[0])) for r in rows]

    async def run(self) -> None:
        while True:
            await trio.sleep(self.settings.period_s)
            if self.busy():
                continue
            for cid in self.candidates(_BATCH + len(self._failed)):
                if self.busy():
                    break
                if cid in self._failed:
                    continue
                try:
                    async with self.gate.exclusive():
                        failpoints.hit("reverse")
                        await self.flip(cid)
                except (CacheFull, OSError, CorruptChunk) as exc:
                    self._failed.add(cid)
                    log.warning("reversing the delta of chunk %s stopped: %s", cid.hex(), exc)
                    break

    def _base(self, cid: ChunkId) -> ChunkId | None:
        """The chunk's delta base (None: a keyframe, or gone)."""
        row = self.chunks.db.one("SELECT base FROM chunks WHERE id=?", (cid,))
        return None if row is None or row[0] is None else ChunkId(bytes(row[0]))

    def _deepest_below(self, cid: ChunkId) -> int | None:
        """The greatest depth among the chunks coded against ``cid``, transitively (None: there are none)."""
        row = self.chunks.db.one(
            "WITH RECURSIVE t(id) AS (SELECT id FROM chunks WHERE base = ?"
            " UNION SELECT c.id FROM chunks c JOIN t ON c.base = t.id)"
            " SELECT max(depth) FROM chunks WHERE id IN (SELECT id FROM t)",
            (cid,),
        )
        return None if row is None or row[0] is None else int(row[0])

    def _is_slot_chunk(self, cid: ChunkId) -> bool:
        return self.chunks.db.one("SELECT 1 FROM slot_index WHERE chunk=? LIMIT 1", (cid,)) is not None

    async def flip(self, c: ChunkId) -> bool:
        """Make ``c`` a keyframe and its old base a delta against it (when that keeps the bound). Returns
        False if there was nothing to do. Run it holding the gate exclusively."""
        b = self._base(c)
        if b is None:
            return False
        await self._swap(c, None, 0)  # (what is coded against c moves up with it: ``finish_rebase``)
        self.flipped += 1
        depth_b = self.chunks.depth(b)
        refs = self.chunks.direct_refs(b)
        if depth_b is None or refs is None or refs <= 0 or self._is_slot_chunk(b) or self.chunks.pinned(b):
            return True  # gone, only deltas hold it (repack's), or the newest of another slot
        deepest = self._deepest_below(b)
        if deepest is not None and deepest + (1 - depth_b) > self.settings.max_chain:
            return True  # the chunks coded against b would exceed the bound: b stays as it is
        if await self._swap(b, c, 1):
            self.rebased += 1
        return True

    async def _swap(self, cid: ChunkId, base: ChunkId | None, depth: int) -> bool:
        """Re-encode ``cid`` against ``base`` (or alone) and swap the frame in. False when the delta did
        not pay (the encoder chose a keyframe): then nothing changes."""
        got = await reencode_swap(
            self.chunks,
            self.workers,
            cid,
            base,
            self.settings.zstd_level,
            lambda chosen: depth if chosen == base else None,
        )
        return got is not None
