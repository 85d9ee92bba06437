"""A writer's view of the store's gc records (docs/architecture.md, "Remote garbage collection").

Before a journal segment is put, the view must be younger than ``max_age`` (``node.gc_view_s``, and
at most half the grace period the newest record names): then a segment that names an object marked
after the view was taken is in the store before any sweep of that mark reads the journal. Objects
the view shows as marked or swept are *dead* to this writer: the uploader puts their frames up again
under new names before naming them (``tier.uploader``), the evictor keeps their local frames, and
referenced frames that only the dead object holds are fetched back into the cache while it still
exists.
"""

from __future__ import annotations

import time

from ckptfs.backend.base import ObjectStore
from ckptfs.errors import PermanentBackendError, UserError
from ckptfs.tier.gc import newest_record
from ckptfs.tier.layout import GcRecord


class GcView:
    """Refreshed in a worker thread, read on the trio thread (a refresh swaps whole attributes)."""

    def __init__(self, store: ObjectStore, max_age_s: float) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.taken = -float("inf")  # monotonic time the last refresh started
        self.record: GcRecord | None = None
        self.dead: frozenset[str] = frozenset()
        self.generation = 0  # bumped when ``dead`` changes

    def age_limit(self) -> float:
        if self.record is None:
            return self.max_age_s
        return min(self.max_age_s, self.record.grace_s / 2)

    def stale(self) -> bool:
        return time.monotonic() - self.taken >= self.age_limit()

    def refresh(self) -> bool:
        """Blocking. Re-read the newest record; True if the dead set changed. Raises ``BackendError``
        (an unreadable record too: a writer must not publish without knowing what is marked)."""
        started = time.monotonic()
        try:
            _, rec = newest_record(self.store)
        except UserError as exc:
            raise PermanentBackendError(str(exc)) from None
        dead = frozenset(rec.marked) | frozenset(rec.swept) if rec is not None else frozenset()
        self.record, self.taken = rec, started
        if dead == self.dead:
            return False
        self.dead = dead
        self.generation += 1
        return True
