"""The namespace journal: path events built from the local namespace, and the order-independent merge
of every writer's events (docs/architecture.md, "The namespace journal"). Pure functions."""

from __future__ import annotations

import stat
from collections.abc import Iterable
from typing import Any

import xxhash

from ckptfs.meta.tiering import ChunkRow, Entry, FileLayout, Rank
from ckptfs.tier.layout import path_text
from ckptfs.types import ChunkId


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def digest(e: Entry) -> bytes:
    """What, if it changes, makes a path publish again (atime and ctime do not)."""
    key = repr((kind_of(e.mode), e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.version, e.target))
    return xxhash.xxh3_128_digest(key.encode())


def event(
    e: Entry,
    extents: list[tuple[int, int, ChunkId]],
    chunks: Iterable[ChunkRow],
    layout: FileLayout | None = None,
) -> dict[str, Any]:
    """The journal event of a path. For a file, ``chunks`` holds every chunk of ``extents`` and their
    bases: object, offset, length, base, depth, plain length and codec of its frame, so a reader can
    fetch a whole chain at once; ``layout`` (if known) adds the version's layout, its signature and each
    extent's slot as a fourth element, so a node that recovers it goes on coding deltas against it."""
    ev: dict[str, Any] = {
        "path": path_text(e.path),
        "kind": kind_of(e.mode),
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "mtime": e.mtime_ns,
    }
    if ev["kind"] == "file":
        ev["size"] = e.size
        if layout is not None and layout.signature is not None and len(layout.slots) == len(extents):
            ev["layout"] = layout.layout
            ev["signature"] = layout.signature
            ev["extents"] = [
                [off, n, cid.hex()] if slot is None else [off, n, cid.hex(), slot]
                for (off, n, cid), slot in zip(extents, layout.slots, strict=True)
            ]
        else:
            ev["extents"] = [[off, n, cid.hex()] for off, n, cid in extents]
        ev["chunks"] = {
            r.id.hex(): [
                r.remote,
                r.remote_off,
                r.remote_len,
                None if r.base is None else r.base.hex(),
                r.depth,
                r.raw_len,
                r.codec,
            ]
            for r in chunks
        }
    elif ev["kind"] == "symlink":
        ev["target"] = path_text(e.target or b"")
    return ev


def tombstone(path: bytes) -> dict[str, Any]:
    return {"path": path_text(path), "kind": "gone"}


def winners(
    segments: Iterable[dict[str, Any]], base: dict[str, tuple[Rank, dict[str, Any]]] | None = None
) -> dict[str, tuple[Rank, dict[str, Any]]]:
    """For each path, the event with the greatest (segment time, writer id, segment id, position in the
    segment) and its rank, ``gone`` included — from decoded segments in any order (the random segment id
    breaks the tie of two segments a writer stamped with one time, after its clock went back), and from
    ``base`` (a snapshot's winners; merging a segment it covers again changes nothing)."""
    best: dict[str, tuple[Rank, dict[str, Any]]] = dict(base or {})
    for seg in segments:
        ts, writer, sid = int(seg["ts"]), str(seg["writer"]), str(seg.get("id", ""))
        for i, ev in enumerate(seg["events"]):
            rank = (ts, writer, sid, i)
            cur = best.get(ev["path"])
            if cur is None or rank > cur[0]:
                best[ev["path"]] = (rank, ev)
    return best


def merge(segments: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every live path and its winning event (a ``gone`` that wins removes the path)."""
    return {p: ev for p, (_, ev) in winners(segments).items() if ev["kind"] != "gone"}
