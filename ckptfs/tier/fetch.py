"""Reading a published file straight from the store, from its journal event alone: every frame of every
chain is located by the event's chunk map, fetched in parallel, decoded bases first and verified
against its chunk id (``codec.decode``). Blocking; for worker threads, ``ckptfs recover`` and tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptfs.backend.base import ObjectStore
from ckptfs.codec import decode, parse_header
from ckptfs.errors import CorruptChunk
from ckptfs.types import ChunkId


def fetch_frames(store: ObjectStore, ev: dict[str, Any], threads: int = 8) -> dict[str, bytes]:
    """Every frame the event's chunk map names, by chunk id (hex)."""
    chunks: dict[str, list[Any]] = ev.get("chunks", {})

    def one(item: tuple[str, list[Any]]) -> tuple[str, bytes]:
        cid, (key, off, length, *_rest) = item
        frame = store.get(key, off or 0, length)
        if length is not None and len(frame) != length:
            raise CorruptChunk(f"object {key} holds {len(frame)} bytes of chunk {cid} at {off}, not {length}")
        return cid, frame

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks)))) as pool:
        return dict(pool.map(one, chunks.items()))


def read_file(store: ObjectStore, ev: dict[str, Any], threads: int = 8) -> bytes:
    """The bytes of the file ``ev`` describes. Raises ``CorruptChunk`` if a frame is missing from the
    event, corrupt, or does not decode to its id."""
    frames = fetch_frames(store, ev, threads)
    plain: dict[str, bytes] = {}

    def chunk(cid: str, depth: int = 0) -> bytes:
        got = plain.get(cid)
        if got is not None:
            return got
        if depth > 64:
            raise CorruptChunk(f"delta chain through {cid} is too long")
        frame = frames.get(cid)
        if frame is None:
            raise CorruptChunk(f"chunk {cid} is not in the file's chunk map")
        hdr = parse_header(frame)
        base = None if hdr.base is None else chunk(hdr.base.hex(), depth + 1)
        data = decode(frame, ChunkId(bytes.fromhex(cid)), base)
        plain[cid] = data
        return data

    parts = []
    for off, length, cid, *_slot in ev.get("extents", []):
        data = chunk(cid)
        if len(data) != length:
            raise CorruptChunk(f"chunk {cid} at offset {off} is {len(data)} bytes, the extent says {length}")
        parts.append(data)
    out = b"".join(parts)
    if len(out) != ev.get("size", 0):
        raise CorruptChunk(f"{ev.get('path')}: extents give {len(out)} bytes, the event says {ev.get('size')}")
    return out
