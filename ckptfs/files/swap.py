"""Replace the stored frame of a chunk (same plain bytes, new encoding or new delta base), crash-safe.

Used by ``files.repack`` (new base) and ``files.compact`` (denser codec, same base). The chunk id, its
plain bytes and every reference to it stay; only the frame and the chunk row's codec/base/depth change:

1. a ``rebase_intents`` row holds the new base (``ChunkIndex.begin_rebase``), and is made durable (WAL
   fsync) before step 2: after a power cut, the frame on disk may name the new base, which must then
   still be held — and recovery must know there is a swap to settle;
2. the new frame replaces the old one atomically (write tmp, fsync, rename, fsync the directory);
3. the chunk row names the new base and releases the old one (``ChunkIndex.finish_rebase``); the old
   base's file, if that was its last reference, is deleted once this is durable (``files.reclaim``).

A small new frame (``ChunkCache.is_small``) is written by step 3's transaction itself, and the old
frame's file, if any, deleted once that transaction is durable.

A crash between 1 and 3 is settled at start-up from whichever frame is on disk
(``ChunkIndex.recover_rebases``). Readers that fetched the old frame just before the rename and then
miss its old base retry once (``ChunkReader.chunk``). Run it holding the ingest gate exclusively.
"""

from __future__ import annotations

from ckptfs.codec import parse_header
from ckptfs.files.chunks import ChunkIndex
from ckptfs.files.workers import Workers
from ckptfs.types import ChunkId


async def swap_frame(chunks: ChunkIndex, workers: Workers, cid: ChunkId, frame: bytes, depth: int) -> None:
    """Make ``frame`` (whose header names its base) the stored form of ``cid`` at chain ``depth``; collect
    whatever loses its last reference. The caller pins ``cid`` and the new base."""
    hdr = parse_header(frame)
    chunks.begin_rebase(cid, hdr.base)
    small = chunks.cache.is_small(frame)
    if not small:
        try:
            await workers.run_io(chunks.db.sync_wal)
            await workers.run_io(chunks.cache.put, cid, frame)
            await workers.run_io(chunks.cache.sync_dirs, [cid])
        except BaseException:
            released = chunks.settle_rebase(cid)  # the old frame or the new one, whichever is there
            chunks.collect(released)
            raise
    old = chunks.finish_rebase(cid, int(hdr.codec), len(frame), depth, frame if small else None)
    if old is not None:
        chunks.collect([old])
    if small and chunks.cache.has_file(cid):
        # The old frame's file is stale now, but it may go only once the row holding the new frame is
        # durable: a power loss could undo that commit (``meta.Database.sync_wal``).
        await workers.run_io(chunks.db.sync_wal)
        chunks.cache.delete(cid)
