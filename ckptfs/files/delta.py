"""Delta coding policy: which stored chunk a new piece is XOR'd against, and the encode step itself.

A new version of a file finds, for each of its slots, the latest chunk stored for that slot by any file
with the same layout signature (``ChunkIndex.slot_bases``). Chains are bounded by ``max_chain``: a base
already ``max_chain`` deltas deep is replaced by the keyframe at the root of its chain, so reading any
chunk decodes at most ``max_chain`` deltas. ``max_chain = 1`` is "delta against the keyframe";
larger values chain against the previous version. A new keyframe is written whenever the delta does not
beat plain byte-grouped compression (training drifted far from the keyframe).
"""

from __future__ import annotations

from ckptfs.cache import ChunkCache
from ckptfs.codec import Codec, encode, parse_header
from ckptfs.errors import CorruptChunk, NotFound
from ckptfs.files.chunks import ChunkIndex, SlotBase
from ckptfs.files.reader import MAX_CHAIN, fetch_and_decode
from ckptfs.types import ChunkId


def choose_base(chunks: ChunkIndex, candidate: SlotBase | None, max_chain: int) -> tuple[ChunkId, int] | None:
    """The (base chunk, its depth) for a new piece, or None to store a keyframe. Trio thread, no checkpoint."""
    if candidate is None or max_chain <= 0:
        return None
    cid, depth = candidate.chunk, candidate.depth
    hops = 0
    while depth >= max_chain:
        row = chunks.db.one("SELECT base, depth FROM chunks WHERE id=?", (cid,))
        if row is None or row[0] is None or hops > MAX_CHAIN:
            return None
        cid, depth = ChunkId(bytes(row[0])), int(row[1]) - 1
        hops += 1
    row = chunks.db.one("SELECT depth FROM chunks WHERE id=?", (cid,))
    if row is None:
        return None
    return cid, int(row[0])


def encode_piece(
    cache: ChunkCache, data: bytes, level: int, width: int, base: ChunkId | None
) -> tuple[bytes, int, ChunkId | None]:
    """Worker thread: encode ``data``, against ``base`` when given. Returns (frame, codec, base used or None).

    An unreadable or corrupt base is not fatal: the piece is stored as a keyframe instead.
    """
    base_pair = None
    if base is not None:
        try:
            base_pair = (base, fetch_and_decode(cache, base))
        except (CorruptChunk, NotFound, OSError):
            base_pair = None
    frame, codec = encode(data, level, width, base_pair)
    used = parse_header(frame).base if codec == Codec.DELTA_GROUPED_ZSTD else None
    return frame, int(codec), used
