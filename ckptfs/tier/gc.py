"""Remote garbage collection (``ckptfs gc``): mark the packs no live journal event names, sweep them a
grace period later if they are still dead, revive the ones that became live again. The protocol and
why it is safe against writers running meanwhile are in docs/architecture.md ("Remote garbage
collection"); the writers' half is ``tier.gcview``.

Each cycle also compacts the journal: a snapshot of the merged journal, and the segments an older
snapshot covers deleted. Blocking; one ``ckptfs gc`` at a time per store. Only packs, journal
segments a snapshot covers, and superseded gc records and snapshots are ever deleted.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ckptfs.backend.base import ObjectInfo, ObjectStore
from ckptfs.errors import UserError
from ckptfs.meta.tiering import Rank
from ckptfs.tier.layout import (
    GC_PREFIX,
    PACK_PREFIX,
    SNAPSHOT_PREFIX,
    GcRecord,
    Snapshot,
    decode_gc_record,
    encode_gc_record,
    encode_snapshot,
    gc_key,
    read_pack_index,
    snapshot_key,
)
from ckptfs.tier.recover import JournalView, newest_decodable, read_journal

log = logging.getLogger(__name__)

SWEPT_KEEP = 4  # a swept name stays in the records for this many grace periods (writers' views)
_TAIL = 256 * 1024  # one ranged GET of a pack's end holds its index unless the pack has thousands of frames


@dataclass
class GcReport:
    """What one cycle found and did (``ckptfs gc`` prints it; ``--json`` gives it as is)."""

    segments: int = 0
    packs: int = 0
    pack_bytes: int = 0
    live_packs: int = 0
    partly_dead_packs: int = 0
    dead_bytes_in_live_packs: int = 0  # frames no live event names, inside packs that stay
    young_packs: int = 0  # not live, but put less than the grace period ago: never candidates
    marked_now: int = 0
    marked: int = 0  # every object the new record marks (carried over and new)
    marked_bytes: int = 0
    revived: int = 0
    swept: int = 0
    swept_bytes: int = 0
    next_sweep_ns: int | None = None  # the earliest a marked object may be swept
    record: str | None = None  # the gc record written (None: a dry run)
    snapshot: str | None = None  # the journal snapshot written (None: a dry run)
    segments_deleted: int = 0  # journal segments a snapshot a grace old covers
    dry_run: bool = False
    swept_keys: list[str] = field(default_factory=list)


def newest_record(store: ObjectStore) -> tuple[list[str], GcRecord | None]:
    """(every gc record's key, the newest record). The newest must decode: raises ``UserError`` if it
    does not (what it marks is unknown, so neither a sweep nor a writer may go on). Raises ``BackendError``."""

    def unreadable(key: str, exc: ValueError) -> None:
        raise UserError(f"gc record {key} is unreadable ({exc}); delete it if it is not ckptfs's") from None

    keys, newest = newest_decodable(store, GC_PREFIX, decode_gc_record, unreadable)
    return keys, None if newest is None else newest[1]


def live_frames(winners: dict[str, tuple[Rank, dict[str, Any]]]) -> dict[str, set[tuple[int, int]]]:
    """Object -> the (offset, length) of each frame in it that a winning event names (a file's chunks and
    every base of theirs)."""
    live: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for _, ev in winners.values():
        if ev["kind"] != "file":
            continue
        for key, off, length, *_ in ev["chunks"].values():
            if key:
                live[str(key)].add((int(off or 0), int(length)))
    return live


def _dead_bytes(store: ObjectStore, info: ObjectInfo, live: set[tuple[int, int]]) -> int:
    """Bytes of the pack's frames that no live event names (its index read from the pack's tail)."""
    start = max(0, info.size - _TAIL)
    tail = store.get(info.key, start)
    try:
        index = read_pack_index(tail)
    except ValueError:
        index = read_pack_index(store.get(info.key))  # an index longer than the tail
    return sum(length for _, _, off, length in index if (off, length) not in live)


def _compact(store: ObjectStore, view: JournalView, start: int, grace: int, report: GcReport) -> None:
    """Journal compaction: a snapshot of the merged journal covering every segment listed; then the
    segments the previous snapshot covers are deleted once it is a grace period old (every reader that
    lists segments from then on also lists a snapshot that holds them), and snapshots before the
    previous one (the previous one stays: with the segments left it is complete should the new one be
    unreadable). A ``gone`` winner older than two grace periods is dropped: every segment it could
    beat has been merged into a snapshot long since."""
    horizon = start - 2 * grace
    winners = {p: w for p, w in view.winners.items() if w[1]["kind"] != "gone" or w[0][0] >= horizon}
    prev = view.snapshot
    ts = max(start, prev[1].ts_ns + 1 if prev else 0)
    report.snapshot = snapshot_key(ts)
    store.put(report.snapshot, encode_snapshot(Snapshot(ts, frozenset(view.listed), winners)))
    if prev is None:
        return
    prev_key, prev_snap = prev
    if start - prev_snap.ts_ns > grace:
        listed = set(view.listed)
        for key in sorted(prev_snap.covers & listed):
            store.delete(key)
            report.segments_deleted += 1
    for key in store.list(SNAPSHOT_PREFIX):
        if key < prev_key:
            store.delete(key)


def collect(
    store: ObjectStore,
    grace_s: float,
    *,
    dry_run: bool = False,
    now_ns: Callable[[], int] = time.time_ns,
    threads: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> GcReport:
    """One cycle. ``now_ns`` is read before the journal is listed: a writer whose view of the records
    predates a mark has put its segment well before then (docs/architecture.md). Raises ``UserError``
    (an unreadable journal segment or gc record: nothing is deleted) or ``BackendError``."""
    grace = int(grace_s * 1e9)
    start = now_ns()
    rec_keys, prev = newest_record(store)
    packs = {i.key: i for i in store.list_info(PACK_PREFIX)}
    view = read_journal(store, threads, progress, strict=True)
    live = live_frames(view.winners)
    report = GcReport(
        segments=len(view.listed), packs=len(packs), pack_bytes=sum(i.size for i in packs.values()), dry_run=dry_run
    )

    marked: dict[str, int] = {}
    sweep: dict[str, int] = {}
    settled: set[str] = set()  # marks looked at: revived, swept, carried over, or gone
    for key, t_m in (prev.marked if prev else {}).items():
        info = packs.get(key)
        settled.add(key)
        if info is None:
            continue  # gone already (an earlier sweep, or someone else)
        if key in live:
            report.revived += 1  # named again: left out of the new record
        elif info.mtime_ns > t_m:
            settled.discard(key)  # put again after the mark: judged afresh below, by its new age
        elif start - t_m > grace:
            sweep[key] = start
        else:
            marked[key] = t_m
    for key, info in packs.items():
        if key in live or key in settled:
            continue
        if start - info.mtime_ns > grace:
            marked[key] = start
            report.marked_now += 1
        else:
            report.young_packs += 1

    live_packs = [packs[k] for k in live if k in packs]
    report.live_packs = len(live_packs)
    missing = sorted(k for k in live if k not in packs)
    if missing:
        log.error("gc: %d objects the journal names are not in the store, e.g. %s", len(missing), missing[0])
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        dead = list(pool.map(lambda i: _dead_bytes(store, i, live[i.key]), live_packs))
    report.partly_dead_packs = sum(1 for d in dead if d)
    report.dead_bytes_in_live_packs = sum(dead)
    report.marked = len(marked)
    report.marked_bytes = sum(packs[k].size for k in marked)
    report.swept = len(sweep)
    report.swept_bytes = sum(packs[k].size for k in sweep)
    report.swept_keys = sorted(sweep)
    if marked:
        report.next_sweep_ns = min(marked.values()) + grace
    if dry_run:
        return report

    swept = {k: t for k, t in (prev.swept if prev else {}).items() if start - t < SWEPT_KEEP * grace}
    swept.update(sweep)
    ts = max(start, prev.ts_ns + 1 if prev else 0)
    report.record = gc_key(ts)
    # The record first: a writer that lists it from now on knows what goes; a crash before the deletes
    # leaves them to the next cycle (a swept name still in the store is swept again).
    store.put(report.record, encode_gc_record(GcRecord(ts, grace_s, marked, swept)))
    for key in sweep:
        store.delete(key)
    for key, t_s in (prev.swept if prev else {}).items():
        info = packs.get(key)
        if info is not None and info.mtime_ns <= t_s and key not in live and key not in sweep:
            store.delete(key)  # an earlier cycle's delete that did not happen (it crashed after its record)
    for key in rec_keys:
        if key < report.record:
            store.delete(key)  # superseded: the new record carries every mark that still counts
    _compact(store, view, start, grace, report)
    log.info(
        "gc: %d packs live, %d marked, %d revived, %d swept (%.1f MB)",
        report.live_packs,
        report.marked,
        report.revived,
        report.swept,
        report.swept_bytes / 1e6,
    )
    return report
