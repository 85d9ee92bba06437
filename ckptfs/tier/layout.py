"""Names and formats of the objects in the store (docs/architecture.md, "Bucket layout"). Pure functions.

* ``packs/<ab>/<random id>``: frames back to back, exactly as in the local cache, then a zstd-compressed
  JSON index and its length as 8 little-endian bytes;
* ``journal/<writer id>/<ts:020d>-<random>``: a zstd-compressed JSON list of path events;
* ``gc/<ts:020d>-<random>``: a garbage-collection record (JSON): what is marked since when, what was swept;
* ``snapshots/<ts:020d>-<random>``: the merged journal as of a gc cycle (zstd-compressed JSON): each
  path's winning event with its rank, and the segments it covers.
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
PACK_PREFIX = "packs/"
GC_PREFIX = "gc/"
SNAPSHOT_PREFIX = "snapshots/"


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
    # one join: ``join(parts) + trailer`` copied the 32 MiB twice more, each into fresh memory (a third
    # of the uploader's CPU beside a trainer, py-spy)
    data = b"".join([*parts, trailer, struct.pack("<Q", len(trailer))])
    name = os.urandom(16).hex()  # random: global without coordination, and a re-upload is a new name
    return Pack(f"{PACK_PREFIX}{name[:2]}/{name}", data, offsets)


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


@dataclass(frozen=True, slots=True)
class GcRecord:
    """One cycle of ``ckptfs gc``: each object marked (not live, older than the grace) and since when,
    each object swept (deleted) and when, and the grace period the cycle used — all times in ns."""

    ts_ns: int
    grace_s: float
    marked: dict[str, int]
    swept: dict[str, int]


def gc_key(ts_ns: int) -> str:
    return f"{GC_PREFIX}{ts_ns:020d}-{os.urandom(6).hex()}"


def encode_gc_record(rec: GcRecord) -> bytes:
    doc = {"format": FORMAT, "ts": rec.ts_ns, "grace_s": rec.grace_s, "marked": rec.marked, "swept": rec.swept}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_gc_record(data: bytes) -> GcRecord:
    """Raises ValueError for anything that is not a gc record of this format."""
    try:
        doc = json.loads(data)
        if doc["format"] != FORMAT:
            raise ValueError(f"gc record of format {doc['format']}")
        return GcRecord(
            int(doc["ts"]),
            float(doc["grace_s"]),
            {str(k): int(v) for k, v in doc["marked"].items()},
            {str(k): int(v) for k, v in doc["swept"].items()},
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a ckptfs gc record: {exc}") from None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The journal merged: every path's winning event (``gone`` ones too, so a covered segment read again
    cannot bring a removed path back) with its rank, and the keys of the segments merged into it."""

    ts_ns: int
    covers: frozenset[str]
    winners: dict[str, tuple[tuple[int, str, str, int], dict[str, Any]]]


def snapshot_key(ts_ns: int) -> str:
    return f"{SNAPSHOT_PREFIX}{ts_ns:020d}-{os.urandom(6).hex()}"


def encode_snapshot(snap: Snapshot) -> bytes:
    doc = {
        "format": FORMAT,
        "kind": "snapshot",
        "ts": snap.ts_ns,
        "covers": sorted(snap.covers),
        "paths": {p: [list(rank), ev] for p, (rank, ev) in snap.winners.items()},
    }
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())


def decode_snapshot(data: bytes) -> Snapshot:
    """Raises ValueError for anything that is not a journal snapshot of this format."""
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 32))
        if doc.get("format") != FORMAT or doc.get("kind") != "snapshot":
            raise ValueError("not a ckptfs journal snapshot")
        winners = {str(p): ((int(r[0]), str(r[1]), str(r[2]), int(r[3])), ev) for p, (r, ev) in doc["paths"].items()}
        return Snapshot(int(doc["ts"]), frozenset(str(k) for k in doc["covers"]), winners)
    except (zstandard.ZstdError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a ckptfs journal snapshot: {exc}") from None
