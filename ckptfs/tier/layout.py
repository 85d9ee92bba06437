"""Names and formats of the objects in the store (docs/architecture.md, "Bucket layout"). Pure functions.

* ``packs/<ab>/<random id>``: frames back to back, exactly as in the local cache, then a zstd-compressed
  JSON index and its length as 8 little-endian bytes;
* ``journal/<writer id>/<ts:020d>-<random>``: a zstd-compressed JSON list of path events.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import xxhash
import zstandard

from ckptfs.types import ChunkId

FORMAT = 1
MARKER_KEY = "ckptfs.json"
JOURNAL_PREFIX = "journal/"


def frame_digest(frame: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(frame)


def marker() -> bytes:
    return json.dumps({"format": FORMAT, "kind": "ckptfs"}).encode()


def check_marker(data: bytes) -> str | None:
    """None if the store's marker is one this version reads, else why not."""
    try:
        doc = json.loads(data)
        fmt = int(doc["format"])
    except (ValueError, KeyError, TypeError):
        return "its ckptfs.json is not a ckptfs format marker"
    return None if fmt == FORMAT else f"it holds format {fmt}; this ckptfs reads format {FORMAT}"


@dataclass(frozen=True, slots=True)
class Pack:
    key: str
    data: bytes
    offsets: dict[ChunkId, tuple[int, int]]  # chunk -> (offset, length) in data


def build_pack(frames: list[tuple[ChunkId, bytes]]) -> Pack:
    parts: list[bytes] = []
    index: list[list[Any]] = []
    offsets: dict[ChunkId, tuple[int, int]] = {}
    pos = 0
    for cid, frame in frames:
        parts.append(frame)
        index.append([cid.hex(), frame_digest(frame), pos, len(frame)])
        offsets[cid] = (pos, len(frame))
        pos += len(frame)
    trailer = zstandard.ZstdCompressor(level=3).compress(json.dumps(index).encode())
    data = b"".join(parts) + trailer + struct.pack("<Q", len(trailer))
    name = os.urandom(16).hex()  # random: global without coordination, and a re-upload is a new name
    return Pack(f"packs/{name[:2]}/{name}", data, offsets)


def read_pack_index(data: bytes) -> list[tuple[ChunkId, str, int, int]]:
    """The index in a pack's trailer: (chunk, frame digest, offset, length). Raises ValueError."""
    if len(data) < 8:
        raise ValueError("pack too short")
    (n,) = struct.unpack("<Q", data[-8:])
    if n > len(data) - 8:
        raise ValueError("pack trailer length is out of range")
    index = json.loads(zstandard.ZstdDecompressor().decompress(data[-8 - n : -8]))
    return [(ChunkId(bytes.fromhex(c)), str(d), int(o), int(ln)) for c, d, o, ln in index]


def new_segment_id() -> str:
    return os.urandom(6).hex()


def segment_key(writer: str, ts_ns: int, seg_id: str) -> str:
    return f"{JOURNAL_PREFIX}{writer}/{ts_ns:020d}-{seg_id}"


def encode_segment(writer: str, ts_ns: int, events: list[dict[str, Any]], seg_id: str = "") -> bytes:
    doc = {"format": FORMAT, "writer": writer, "ts": ts_ns, "id": seg_id, "events": events}
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())


def decode_segment(data: bytes) -> dict[str, Any]:
    """Raises ValueError for anything that is not a journal segment of this format."""
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 30))
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd frame: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("events"), list):
        raise ValueError("not a ckptfs journal segment")
    return doc


def path_text(path: bytes) -> str:
    """A path as JSON text: non-UTF-8 bytes survive as surrogate escapes (``os.fsdecode``)."""
    return os.fsdecode(path)


def path_bytes(text: str) -> bytes:
    return os.fsencode(text)
