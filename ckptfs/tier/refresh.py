"""Other nodes' changes, from their journals: every ``node.refresh_s`` the store's journal is listed, the
segments of other writers not applied yet are fetched and merged, and each path whose winning event is
newer (segment time, writer id, position) than what this node shows is changed to match it — a file
(its version ``remote``, fetched on first read), a directory, a symlink, or gone.

Consistency (docs/architecture.md): close-to-open per path; the last writer wins per path. A path this
node changed and has not published yet keeps its local state (it will be published later, and win
or lose by its own rank then). A conflict that would delete local data — another node's file where
this node has a non-empty directory — is skipped and logged. A replaced file gets a new inode: a
reader that has the old one open keeps reading the old version; the kernel's entry is invalidated.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from typing import Any

import trio

from ckptfs.backend.base import ObjectStore
from ckptfs.errors import BackendError
from ckptfs.meta import Database
from ckptfs.meta.tiering import Tiering
from ckptfs.namespace import Tree
from ckptfs.tier import journal
from ckptfs.tier.layout import JOURNAL_PREFIX, path_bytes, path_text
from ckptfs.tier.recover import entries, fetch_segments, newest_snapshot
from ckptfs.types import InodeId

log = logging.getLogger(__name__)

_SNAPSHOT_CHECK_S = 60.0  # how often a pass also looks for a new journal snapshot


class Refresher:
    def __init__(
        self,
        db: Database,
        tree: Tree,
        store: ObjectStore,
        writer: str,
        interval: float,
        invalidate: Callable[[InodeId, bytes], None],
        healthy: Callable[[], bool] = lambda: True,
    ) -> None:
        self.db = db
        self.tiering = Tiering(db)
        self.tree = tree
        self.store = store
        self.writer = writer
        self.interval = interval
        self.invalidate = invalidate
        self.healthy = healthy
        self.applied = 0
        self.last_error: str | None = None
        self._next_snapshot_check = 0.0  # the first pass looks at once

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            if not self.healthy():
                continue
            try:
                await self.refresh()
                self.last_error = None
            except BackendError as exc:
                if self.last_error != str(exc):
                    log.warning("refresh from the store failed: %s; retrying", exc)
                self.last_error = str(exc)

    async def refresh(self) -> int:
        """One pass; returns how many paths changed."""
        own = f"{JOURNAL_PREFIX}{self.writer}/"
        keys = await trio.to_thread.run_sync(lambda: list(self.store.list(JOURNAL_PREFIX)))
        listed = set(keys)
        seen = self.tiering.seen_segments()
        new = [k for k in keys if not k.startswith(own) and k not in seen]
        base, snap_key, covers = None, None, frozenset[str]()
        if time.monotonic() >= self._next_snapshot_check:
            # Segments a gc compacted are deleted a grace period after a snapshot covers them: a node
            # that was down (or could not refresh) that long finds them only there. Listed after the
            # segments (see ``recover.read_journal``).
            self._next_snapshot_check = time.monotonic() + _SNAPSHOT_CHECK_S
            gone = [k for k in seen if k not in listed]
            if gone:
                self.tiering.forget_seen(gone)
            found = await trio.to_thread.run_sync(newest_snapshot, self.store)
            if found is not None and found[0] != self.tiering.snapshot_applied():
                snap_key, snap = found
                covers = snap.covers
                if any(k not in seen and not k.startswith(own) for k in covers):
                    base = snap.winners
                    new = [k for k in new if k not in covers]
        if not new and base is None:
            if snap_key is not None:
                self.tiering.set_snapshot_applied(snap_key)
            return 0
        got = await trio.to_thread.run_sync(fetch_segments, self.store, new)
        segments = [seg for _, seg in got]
        best = journal.winners(segments, base)
        changed = 0
        published = self.tiering.published()
        current = {e.path: e for e in self.tiering.namespace()}
        puts = sorted((kv for kv in best.items() if kv[1][1]["kind"] != "gone"), key=lambda kv: kv[0].count("/"))
        gones = sorted((kv for kv in best.items() if kv[1][1]["kind"] == "gone"), key=lambda kv: -kv[0].count("/"))
        for text, (rank, ev) in puts + gones:  # parents before children; removals deepest first
            path = path_bytes(text)
            mine = self.tiering.rank(path)
            if mine is not None and rank <= mine:
                continue
            here = current.get(path)
            prev = published.get(path)
            if here is not None and (prev is None or prev.digest != journal.digest(here)):
                continue  # changed here and not published yet: this node's version will have its own rank
            ino = self._apply(path, ev)
            if ino is not False:
                now = None if ino is None else self.tiering.entry(path, ino)
                self.tiering.applied(path, rank, None if now is None else journal.digest(now), ino)
                changed += 1
        self.tiering.mark_seen(new)
        if snap_key is not None:
            self.tiering.mark_seen(k for k in covers if k in listed)
            self.tiering.set_snapshot_applied(snap_key)
        self.applied += changed
        if changed:
            log.info("refresh: %d paths changed by other nodes", changed)
        return changed

    def _apply(self, path: bytes, ev: dict[str, Any]) -> InodeId | None | bool:
        """Make ``path`` show ``ev``. Trio thread, no checkpoint. Returns the inode now at the path (None:
        nothing), or False if skipped (a conflict)."""
        kind = ev["kind"]
        if kind == "gone":
            at = self.tree.entry_at(path)
            if at is not None and at[2] is not None:
                if not self.tree.remove_entry(at[0], at[1]):
                    log.warning("refresh: another node removed %r, a directory that is not empty here; kept", path)
                    return False
                self.invalidate(at[0], at[1])
            return None
        parent = self.tree.make_parents(path)
        if parent is None:
            log.warning("refresh: %r from another node is under a path that is not a directory here; skipped", path)
            return False
        name = path.rsplit(b"/", 1)[-1]
        at = self.tree.entry_at(path)
        existing = None if at is None else at[2]
        if existing is not None:
            attr = self.tree.getattr(existing)
            if kind == "dir" and stat.S_ISDIR(attr.mode):
                return existing  # already a directory (its mode is its own business)
            if not self.tree.remove_entry(parent, name):
                log.warning("refresh: %r from another node would replace a non-empty directory; skipped", path)
                return False
            self.invalidate(parent, name)
        (entry,) = [e for e in entries({path_text(path): ev}) if e.path == path]
        ino = self.tree.new_entry(parent, name, entry.mode, entry.uid, entry.gid, entry.target)
        if entry.extents is not None and entry.size:
            self.tiering.import_version(ino, entry.size, entry.mtime_ns, entry.extents, entry.chunks, entry.layout)
        self.invalidate(parent, name)
        return ino
