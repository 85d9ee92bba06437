"""Recovery from the store alone: every writer's journal segments, fetched in parallel and merged in any
order (``journal.merge``), become the namespace of an empty cache. Files come back ``remote``: their
chunks have rows that say where each frame is in the store and no local frame, so the first read
fetches them (``cache.remote``).

Used by the daemon when an empty cache is mounted against a store that has a journal, and by
``ckptfs recover``.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptfs.backend.base import ObjectStore
from ckptfs.errors import ObjectNotFound, UserError
from ckptfs.files.chunks import ChunkIndex
from ckptfs.meta import Database
from ckptfs.meta.tiering import ChunkRow, FileLayout, ImportEntry, Rank, Tiering
from ckptfs.tier import journal
from ckptfs.tier.layout import (
    JOURNAL_PREFIX,
    SNAPSHOT_PREFIX,
    Snapshot,
    decode_segment,
    decode_snapshot,
    path_bytes,
    path_text,
)
from ckptfs.types import ChunkId, VersionId

log = logging.getLogger(__name__)
T = TypeVar("T")
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Recovered:
    segments: int
    files: int
    dirs: int
    others: int
    bytes: int


def newest_decodable(
    store: ObjectStore, prefix: str, decode: Callable[[bytes], T], unreadable: Callable[[str, ValueError], None]
) -> tuple[list[str], tuple[str, T] | None]:
    """The keys under ``prefix`` (sorted) and the newest (key, decoded object) among them. An object
    deleted since the listing is skipped; one that does not decode goes to ``unreadable``, which raises
    to stop or returns to try the one before. Raises ``BackendError``."""
    keys = sorted(store.list(prefix))
    for key in reversed(keys):
        try:
            return keys, (key, decode(store.get(key)))
        except ObjectNotFound:
            continue  # superseded and deleted since the listing
        except ValueError as exc:
            unreadable(key, exc)
    return keys, None


def newest_snapshot(store: ObjectStore, strict: bool = False) -> tuple[str, Snapshot] | None:
    """(key, snapshot) of the newest journal snapshot, or None. One
    that cannot be read is skipped with a warning for the one before it — which, with the segments
    still listed, is complete too (a gc deletes only the segments the snapshot before the newest
    covers) — unless ``strict``: then ``UserError``. Raises ``BackendError``."""

    def unreadable(key: str, exc: ValueError) -> None:
        if strict:
            raise UserError(f"journal snapshot {key} is unreadable ({exc})") from None
        log.warning("journal snapshot %s is unreadable (%s); using the one before it", key, exc)

    return newest_decodable(store, SNAPSHOT_PREFIX, decode_snapshot, unreadable)[1]


@dataclass(frozen=True, slots=True)
class JournalView:
    """The store's journal as read at one moment."""

    listed: list[str]  # segment keys listed (each merged: fetched, or covered by the snapshot)
    winners: dict[str, tuple[Rank, dict[str, Any]]]  # per path the winning event and its rank, gone ones too
    snapshot: tuple[str, Snapshot] | None  # the newest readable snapshot merged in, and its key


def read_journal(
    store: ObjectStore, threads: int = 16, progress: Progress | None = None, strict: bool = False
) -> JournalView:
    """The newest snapshot and every listed segment it does not cover, merged (segments listed first,
    snapshots second: a segment a gc deletes after this listing is in a snapshot put long before). A
    segment that cannot be decoded is skipped with a warning (an interrupted writer cannot leave one:
    puts are atomic), one that vanished between list and get too — unless ``strict`` (``UserError``).
    Raises ``BackendError``."""
    keys = list(store.list(JOURNAL_PREFIX))
    found = newest_snapshot(store, strict)
    snap = None if found is None else found[1]
    covered = snap.covers if snap is not None else frozenset()
    got = fetch_segments(store, [k for k in keys if k not in covered], threads, progress, strict)
    merged = journal.winners((seg for _, seg in got), base=None if snap is None else snap.winners)
    fetched = {key for key, _ in got}
    return JournalView([k for k in keys if k in fetched or k in covered], merged, found)


def fetch_segments(
    store: ObjectStore, keys: list[str], threads: int = 16, progress: Progress | None = None, strict: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """(key, decoded segment) of each of ``keys``, fetched ``threads`` at once. A segment that cannot be
    decoded is skipped with a warning (an interrupted writer cannot leave one: puts are atomic), one
    that vanished between list and get too — unless ``strict`` (garbage collection: a segment it did not
    read could name what it would delete), which raises ``UserError`` instead. Raises ``BackendError``."""

    def one(key: str) -> dict[str, Any] | None:
        try:
            return decode_segment(store.get(key))
        except ObjectNotFound:
            if strict:
                raise UserError(f"journal segment {key} vanished while the journal was read") from None
            return None
        except ValueError as exc:
            if strict:
                raise UserError(f"journal segment {key} is unreadable ({exc})") from None
            log.warning("journal segment %s is unreadable (%s); skipped", key, exc)
            return None

    out = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
        for done, (key, seg) in enumerate(zip(keys, pool.map(one, keys), strict=True), 1):
            if progress:
                progress(done, len(keys))
            if seg is not None:
                out.append((key, seg))
    return out


def _chunk_rows(ev: dict[str, Any]) -> list[ChunkRow]:
    rows = []
    for cid, (key, off, length, base, depth, raw_len, codec) in ev["chunks"].items():
        rows.append(
            ChunkRow(
                ChunkId(bytes.fromhex(cid)),
                int(codec),
                int(length),
                int(raw_len),
                None if base is None else ChunkId(bytes.fromhex(base)),
                int(depth),
                str(key),
                int(off or 0),
                int(length),
            )
        )
    return rows


def _layout(ev: dict[str, Any]) -> FileLayout | None:
    """The layout a file event publishes (None: none, e.g. content-defined chunks or an older writer)."""
    signature = ev.get("signature")
    if not isinstance(signature, str):
        return None
    layout = ev.get("layout")
    slots = [None if len(x) < 4 or x[3] is None else str(x[3]) for x in ev["extents"]]
    return FileLayout(None if layout is None else str(layout), signature, slots)


def newest_of_each_layout(
    ranked: dict[str, tuple[Rank, dict[str, Any]]], imported: list[ImportEntry]
) -> dict[str, ImportEntry]:
    """Per layout signature, the file the journal published last (the greatest rank): the one the node
    that wrote it had as the delta base of that layout's next version."""
    best: dict[str, tuple[Rank, ImportEntry]] = {}
    for e in imported:
        if e.layout is None or e.layout.signature is None:
            continue
        rank = ranked[path_text(e.path)][0]
        cur = best.get(e.layout.signature)
        if cur is None or rank > cur[0]:
            best[e.layout.signature] = (rank, e)
    return {sig: e for sig, (_, e) in best.items()}


def _index_slots(db: Database, newest: dict[str, ImportEntry], vids: dict[bytes, VersionId]) -> None:
    """The slot index of a recovered cache: each layout's newest file names the bases of its slots (so
    the next save of that layout is stored as deltas, and the flattener makes its flat copies). One
    transaction."""
    with db.transaction() as c:  # atomic: no await until commit
        for sig, e in newest.items():
            vid = vids.get(e.path)
            if vid is None or e.layout is None or e.extents is None:
                continue
            slots = [(slot, cid) for (_o, _n, cid), slot in zip(e.extents, e.layout.slots, strict=True) if slot]
            ChunkIndex.set_slots(c, sig, vid, slots)


def entries(view: dict[str, Any]) -> list[ImportEntry]:
    """The view as rows to import, every directory before what it holds (missing parents are made)."""
    out: dict[bytes, ImportEntry] = {}
    for text, ev in view.items():
        path = path_bytes(text)
        if not path.startswith(b"/") or path == b"/":
            continue
        kind = ev["kind"]
        mode = int(ev["mode"])
        if kind == "file":
            ext = [(int(o), int(n), ChunkId(bytes.fromhex(c))) for o, n, c, *_ in ev["extents"]]
            out[path] = ImportEntry(
                path,
                mode,
                ev["uid"],
                ev["gid"],
                ev["mtime"],
                int(ev["size"]),
                False,
                None,
                ext,
                _chunk_rows(ev),
                _layout(ev),
            )
        elif kind == "symlink":
            target = path_bytes(ev["target"])
            out[path] = ImportEntry(path, mode, ev["uid"], ev["gid"], ev["mtime"], len(target), False, target, None, [])
        else:
            out[path] = ImportEntry(path, mode, ev["uid"], ev["gid"], ev["mtime"], 0, kind == "dir", None, None, [])
    for path in list(out):  # a parent with no live dir event of its own (made implicitly)
        parent = path.rpartition(b"/")[0]
        while parent and parent not in out:
            out[parent] = ImportEntry(parent, stat.S_IFDIR | 0o755, 0, 0, 0, 0, True, None, None, [])
            parent = parent.rpartition(b"/")[0]
    for path in list(out):  # something under a path that is not a directory: the directory wins
        parent = path.rpartition(b"/")[0]
        if parent and not out[parent].is_dir:
            log.warning("recovery: %r is not a directory but holds %r; made a directory", parent, path)
            p = out[parent]
            out[parent] = ImportEntry(parent, stat.S_IFDIR | 0o755, p.uid, p.gid, p.mtime_ns, 0, True, None, None, [])
    return sorted(out.values(), key=lambda e: (e.path.count(b"/"), e.path))


def rebuild(db: Database, store: ObjectStore, progress: Progress | None = None) -> Recovered | None:
    """Fill an empty cache's namespace from the store. None when the store has no journal (a new store).
    Raises ``UserError`` if the cache is not empty, ``BackendError`` if the store fails."""
    tiering = Tiering(db)
    if not tiering.is_empty():
        raise UserError("recover: the cache already holds a namespace; recover into an empty cache directory")
    view = read_journal(store, progress=progress)
    if not view.listed and view.snapshot is None:
        return None
    ranked = view.winners
    rows = entries({p: ev for p, (_, ev) in ranked.items() if ev["kind"] != "gone"})
    vids = tiering.import_entries(rows)
    _index_slots(db, newest_of_each_layout(ranked, rows), vids)
    # What this new incarnation has "published" is what it recovered: only later changes go in its journal;
    # and the refresh from other nodes starts after these segments, at these ranks.
    now = tiering.namespace()
    tiering.commit_published(
        {e.path: journal.digest(e) for e in now},
        [],
        {path_bytes(p): rank for p, (rank, _) in ranked.items()},
        {e.path: e.inode for e in now},
    )
    tiering.mark_seen(view.listed)
    if view.snapshot is not None:
        tiering.set_snapshot_applied(view.snapshot[0])
    return Recovered(
        segments=len(view.listed) + (view.snapshot is not None),
        files=sum(1 for e in rows if e.extents is not None),
        dirs=sum(1 for e in rows if e.is_dir),
        others=sum(1 for e in rows if e.extents is None and not e.is_dir),
        bytes=sum(e.size for e in rows if e.extents is not None),
    )
