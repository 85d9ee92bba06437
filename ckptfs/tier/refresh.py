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
from ckptfs.tier.recover import entries, fetch_segments
from ckptfs.types import InodeId

log = logging.getLogger(__name__)


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
        seen = self.tiering.seen_segments()
        new = [k for k in keys if not k.startswith(own) and k not in seen]
        if not new:
            return 0
        got = await trio.to_thread.run_sync(fetch_segments, self.store, new)
        segments = [seg for _, seg in got]
        best = journal.winners(segments)
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
            self.tiering.import_version(ino, entry.size, entry.mtime_ns, entry.extents, entry.chunks)
        self.invalidate(parent, name)
        return ino
