"""``ckptfs warmup``: pull the frames of files into the local cache from the store — fetched in parallel,
kept as they are (not decoded: a read decodes them later, and the store's bytes are the compressed
ones), so a replacement node has its last checkpoint local before training restarts."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ckptfs.cache import ChunkCache
from ckptfs.errors import CorruptChunk
from ckptfs.meta import Database
from ckptfs.meta.tiering import Tiering
from ckptfs.types import VersionId

log = logging.getLogger(__name__)


async def warm(
    db: Database,
    cache: ChunkCache,
    prefixes: list[bytes],
    concurrency: int,
    progress: Callable[[int, int, int, int], None],
) -> tuple[int, int, list[str]]:
    """Fetch every frame the files at or under ``prefixes`` need (their delta bases too) that the cache
    lacks. ``progress(frames done, frames, bytes done, bytes)``. Returns (files, bytes fetched, errors)."""
    tiering = Tiering(db)

    def under(path: bytes) -> bool:
        return any(not p or path == p or path.startswith(p.rstrip(b"/") + b"/") for p in prefixes)

    entries = [e for e in tiering.namespace() if e.version is not None and under(e.path)]
    vids = sorted({VersionId(e.version) for e in entries if e.version is not None})
    rows = [r for r in tiering.closure(vids) if r.remote is not None]
    todo = [r for r in rows if not cache.holds(r.id)]
    total = sum(r.stored for r in todo)
    done_frames = done_bytes = 0
    errors: list[str] = []
    limit = trio.CapacityLimiter(concurrency)

    async def one(row_index: int) -> None:
        nonlocal done_frames, done_bytes
        r = todo[row_index]
        try:
            frame = await trio.to_thread.run_sync(cache.get, r.id, limiter=limit)
        except CorruptChunk as exc:
            if db.one("SELECT 1 FROM chunks WHERE id=? AND remote IS NOT NULL", (r.id,)) is not None:
                errors.append(str(exc))
            return  # collected or re-encoded meanwhile (repack): nothing to fetch any more
        if cache.is_small(frame):
            tiering.keep_small_frame(r.id, frame, replace=False)
        done_frames += 1
        done_bytes += len(frame)
        progress(done_frames, len(todo), done_bytes, total)

    progress(0, len(todo), 0, total)
    async with trio.open_nursery() as nursery:
        for i in range(len(todo)):
            nursery.start_soon(one, i)
    return len(entries), done_bytes, errors
