"""Delta coding policy: which stored chunk a new piece is XOR'd against, and the encode step itself.

A new version of a file finds, for each of its slots, the latest chunk stored for that slot by any file
with the same layout signature (``ChunkIndex.slot_bases``). That latest chunk is the base when

* its chain is shorter than ``max_chain`` (so reading any chunk decodes at most ``max_chain`` deltas),
* its plain bytes are still in the ingester's base cache, or it has a flat copy (``files.flatten``:
  the newest of a slot after a remount or a recovery from the bucket), or it is a keyframe — so
  encoding never decodes a chain: at most one base is decoded per piece, and
* it is *live*: part of another existing file's current content (see ``choose_base``).

Otherwise the base is the keyframe at the root of the latest chunk's chain, if that is live; else the
piece is stored as a keyframe. ``max_chain = 1`` is "always against the keyframe". A new keyframe is
also written whenever the delta does not beat plain byte-grouped compression.
"""

from __future__ import annotations

from collections.abc import Collection

from ckptfs.cache import ChunkCache
from ckptfs.codec import encode, parse_header
from ckptfs.errors import CorruptChunk
from ckptfs.files.chunks import ChunkIndex, SlotBase
from ckptfs.files.lru import BytesLRU
from ckptfs.files.reader import MAX_CHAIN, fetch_and_decode
from ckptfs.types import ChunkId, InodeId


def _live(chunks: ChunkIndex, cid: ChunkId, inode: InodeId) -> bool:
    """Is ``cid`` part of what another existing file shows now? Only then does it cost nothing as a base."""
    row = chunks.db.one(
        "SELECT 1 FROM extents e JOIN inodes i ON i.version = e.version"
        " WHERE e.chunk=? AND i.nlink > 0 AND i.id <> ? LIMIT 1",
        (cid, inode),
    )
    return row is not None


def chain_root(chunks: ChunkIndex, cid: ChunkId) -> ChunkId | None:
    """The keyframe at the root of ``cid``'s delta chain; None when a chunk on the way is gone or the
    chain is longer than any read could decode."""
    for _ in range(MAX_CHAIN + 1):
        row = chunks.db.one("SELECT base FROM chunks WHERE id=?", (cid,))
        if row is None:
            return None
        if row[0] is None:
            return cid
        cid = ChunkId(bytes(row[0]))
    return None


def choose_base(
    chunks: ChunkIndex,
    candidate: SlotBase | None,
    max_chain: int,
    cache: BytesLRU,
    inode: InodeId,
    flat: Collection[ChunkId] = (),
) -> tuple[ChunkId, int, bytes | None] | None:
    """(base chunk, its depth, its plain bytes if cached) for a new piece of ``inode``, or None for a keyframe.

    ``flat``: the chunks with a flat copy (the caller reads the bytes of such a base from it).
    A base must be *live*: part of another existing file's current content. A base that is not would
    be kept only for this delta — for an overwritten ``latest.pt`` or a file replaced by tmp + rename
    that costs more than storing a keyframe, since the old content is going away. Trio thread, no checkpoint.
    """
    if candidate is None or max_chain <= 0:
        return None
    cid, depth = candidate.chunk, candidate.depth
    if depth < max_chain:
        cached = cache.get(cid)
        if (cached is not None or depth == 0 or cid in flat) and _live(chunks, cid, inode):
            return cid, depth, cached
    root = chain_root(chunks, cid)
    if root is None or not _live(chunks, root, inode):
        return None
    return root, 0, cache.get(root)


def encode_piece(
    cache: ChunkCache,
    data: bytes,
    level: int,
    width: int,
    base: ChunkId | None,
    base_bytes: bytes | None,
) -> tuple[bytes, int, ChunkId | None]:
    """Worker thread: encode ``data``, against ``base`` when given. Returns (frame, codec, base used or None).

    ``base_bytes`` are the base's plain bytes when the caller has them; else the base is decoded from the
    cache. An unreadable or corrupt base is not fatal: the piece is stored as a keyframe instead.
    """
    base_pair = None
    if base is not None:
        try:
            base_pair = (base, base_bytes if base_bytes is not None else fetch_and_decode(cache, base))
        except (CorruptChunk, OSError):  # ChunkMissing is a CorruptChunk
            base_pair = None
    frame, codec = encode(data, level, width, base_pair)
    return frame, int(codec), parse_header(frame).base  # set only when a delta codec won
