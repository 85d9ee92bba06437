"""Repack: re-encode the live chunks of a delta tree whose chains run through dead chunks.

A chunk is *dead* when only the deltas coded against it still reference it: its file was deleted or
overwritten (a trainer's ``save_total_limit`` rotation, a replaced ``latest.pt``). Left alone, a
dead base costs its full size for bytes nobody can read, and with ``max_chain`` > 1 a whole chain of
deleted checkpoints would stay behind the one that is still there.

A *tree* is a keyframe and every chunk coded against it, transitively. For a tree with a dead chunk
that something live depends on (exclusive of ingest, so bases and depths do not move under it):

* *settled* chunks — live, with every ancestor live — keep their frames;
* the other live chunks, in the order of the versions that hold them, keep their frame when their
  base is settled by now and the chain stays within ``max_chain``; otherwise they are re-encoded
  against the newest settled chunk of an older version (else of any version) whose depth leaves room,
  or as a keyframe when none does. Each becomes settled in turn.

For ``checkpoint-1 <- checkpoint-2 <- ... <- checkpoint-5`` with 1-4 deleted, ``checkpoint-5`` becomes
the keyframe and ``checkpoint-6`` its delta. The dead chunks then lose their last references and
are collected.

Each re-encode is crash-safe (``files.swap``). Re-encoded chunks use the fast zstd forms and join
the queue of ``files.compact``, like newly ingested ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ckptfs import failpoints
from ckptfs.cache import ChunkCache
from ckptfs.codec import decode, encode, parse_header
from ckptfs.errors import CacheFull, CorruptChunk
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.delta import chain_root
from ckptfs.files.gate import Gate
from ckptfs.files.reader import MAX_CHAIN, fetch_and_decode
from ckptfs.files.swap import swap_frame
from ckptfs.files.workers import Workers
from ckptfs.types import ChunkId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RepackSettings:
    max_chain: int
    zstd_level: int
    period_s: float = 0.5  # how often released chunks are looked at


@dataclass(slots=True)
class _Node:
    cid: ChunkId
    base: ChunkId | None
    depth: int
    order: int  # newest version holding the chunk (0 = none): the order the tree is rebuilt in
    live: bool


def reencode(cache: ChunkCache, cid: ChunkId, base: ChunkId | None, level: int) -> bytes:
    """Worker thread: the frame of ``cid``'s plain bytes encoded against ``base`` (or alone; also when the
    keyframe form wins)."""
    frame = cache.get(cid)
    hdr = parse_header(frame)
    data = decode(frame, cid, None if hdr.base is None else fetch_and_decode(cache, hdr.base))
    pair = None if base is None else (base, fetch_and_decode(cache, base))
    return encode(data, level, hdr.width, pair)[0]


async def reencode_swap(
    chunks: ChunkIndex,
    workers: Workers,
    cid: ChunkId,
    base: ChunkId | None,
    level: int,
    depth_of: Callable[[ChunkId | None], int | None],
) -> tuple[ChunkId | None, int] | None:
    """Re-encode ``cid`` against ``base`` (or alone; the encoder may still choose a keyframe) and swap the
    frame in at ``depth_of(the base it chose)`` — or keep the old frame if that is None. Returns (new
    base, depth), or None when nothing changed. Pins ``cid`` and ``base`` meanwhile; a re-encoded chunk
    joins the queue of ``files.compact``. Run it holding the gate exclusively."""
    held = [cid] if base is None else [cid, base]
    for h in held:
        chunks.pin(h)
    try:
        frame = await workers.run_background(reencode, chunks.cache, cid, base, level)
        chosen = parse_header(frame).base
        depth = depth_of(chosen)
        if depth is None:
            return None
        await swap_frame(chunks, workers, cid, frame, depth)
        chunks.queue_compaction([cid])
        return chosen, depth
    finally:
        chunks.unpin(held)
        chunks.collect(held)


class Repacker:
    def __init__(
        self, chunks: ChunkIndex, workers: Workers, gate: Gate, busy: Callable[[], bool], settings: RepackSettings
    ) -> None:
        self.chunks = chunks
        self.workers = workers
        self.gate = gate
        self.busy = busy  # True while a version is written or waits for ingest: repack waits for a pause
        self.settings = settings

    async def run(self) -> None:
        """Until cancelled: repack the trees of chunks that lost references."""
        todo = set(self.chunks.only_deltas_hold())
        while True:
            await trio.sleep(self.settings.period_s)
            if self.busy():
                continue
            todo |= self.chunks.released
            self.chunks.released.clear()
            roots: set[ChunkId] = set()
            for cid in todo:
                refs = self.chunks.direct_refs(cid)
                if refs is not None and refs <= 0 and self.chunks.cache.holds(cid):
                    # (a dead chunk that is only in the store frees nothing here: re-encoding its
                    # dependents would fetch and upload them again for no local byte)
                    root = chain_root(self.chunks, cid)
                    if root is not None:
                        roots.add(root)
            todo.clear()
            for root in roots:
                if self.busy():
                    break
                try:
                    async with self.gate.exclusive():
                        failpoints.hit("repack")
                        await self.repack_tree(root)
                except (CacheFull, OSError, CorruptChunk) as exc:
                    log.warning("repack of the delta tree at %s stopped: %s", root.hex(), exc)

    def _tree(self, root: ChunkId) -> list[_Node]:
        rows = self.chunks.db.execute(
            "WITH RECURSIVE t(id) AS (SELECT ? UNION SELECT c.id FROM chunks c JOIN t ON c.base = t.id)"
            " SELECT c.id, c.base, c.depth,"
            " coalesce((SELECT max(version) FROM extents e WHERE e.chunk = c.id),"
            "          (SELECT max(version) FROM slot_index s WHERE s.chunk = c.id), 0),"
            " c.refcount - (SELECT count(*) FROM chunks d WHERE d.base = c.id)"
            " FROM chunks c JOIN t ON c.id = t.id",
            (root,),
        ).fetchall()
        return [
            _Node(
                ChunkId(bytes(cid)),
                None if base is None else ChunkId(bytes(base)),
                int(depth),
                int(order),
                int(direct) > 0 or self.chunks.pinned(ChunkId(bytes(cid))),
            )
            for cid, base, depth, order, direct in rows
        ]

    async def repack_tree(self, root: ChunkId) -> int:
        """Rebuild the tree at ``root`` so that no live chunk depends on a dead one. Returns the number of
        chunks re-encoded. Run it holding the gate exclusively."""
        nodes = {n.cid: n for n in self._tree(root)}
        settled: dict[ChunkId, _Node] = {}

        def all_live(n: _Node) -> bool:
            seen = 0
            while n.live and n.base is not None and seen <= MAX_CHAIN:
                parent = nodes.get(n.base)
                if parent is None:
                    return False
                n, seen = parent, seen + 1
            return n.live and n.base is None

        for n in nodes.values():
            if all_live(n):
                settled[n.cid] = n
        todo = sorted((n for n in nodes.values() if n.live and n.cid not in settled), key=lambda n: n.order)
        if not todo:
            return 0
        k = self.settings.max_chain
        count = 0
        for n in todo:
            if n.base in settled and settled[n.base].depth + 1 <= k:
                n.depth = settled[n.base].depth + 1
                self.chunks.set_depth(n.cid, n.depth)
            else:
                await self._rebase(n, self._choose(n, settled))
                count += 1
            settled[n.cid] = n
        log.debug("repacked the delta tree at %s: %d of %d chunks re-encoded", root.hex(), count, len(nodes))
        return count

    def _choose(self, n: _Node, settled: dict[ChunkId, _Node]) -> _Node | None:
        """The newest settled chunk of an older version whose depth leaves room, else the oldest of a
        newer one, else None (a keyframe)."""
        room = [s for s in settled.values() if s.depth < self.settings.max_chain]
        older = [s for s in room if s.order <= n.order]
        if older:
            return max(older, key=lambda s: s.order)
        return min(room, key=lambda s: s.order) if room else None

    async def _rebase(self, n: _Node, base: _Node | None) -> None:
        got = await reencode_swap(
            self.chunks,
            self.workers,
            n.cid,
            None if base is None else base.cid,
            self.settings.zstd_level,
            lambda chosen: 0 if chosen is None or base is None else base.depth + 1,
        )
        assert got is not None  # (every depth is accepted)
        n.base, n.depth = got
