"""Failsafe mode: what the daemon does when it cannot go on, instead of dying and leaving ENOTCONN.

One ``Health`` per daemon, built in ``daemon.py`` and handed to the FUSE edge and every background job.
Trio thread only. ``trip`` is called on an unexpected exception in a handler or a background job, or
when the metadata cannot be written (read-only, I/O errors). From then on: the traceback has been
logged once; background jobs that write (ingest, durable marks, deletes, repack, compaction) stop;
the mount stays; every read that can be verified is served; writes and the rest answer EIO
(``errors.Failsafe``). The state is visible as the xattr ``user.ckptfs.failsafe`` on the mount's root
(read by ``ckptfs stats``/``fsck``), in the file ``<cache>/FAILSAFE`` (best effort: the disk may be the
cause), and in a log line every minute. A restart after the cause is fixed resumes normally.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ckptfs.errors import CkptfsError, Failsafe, MetadataUnwritable

log = logging.getLogger(__name__)
MARKER_NAME = "FAILSAFE"


class Health:
    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.marker = None if cache_dir is None else Path(cache_dir) / MARKER_NAME
        self.reason: str | None = None
        self.since: float | None = None  # time.time() of the trip

    @property
    def failsafe(self) -> bool:
        return self.reason is not None

    def trip(self, what: str, exc: BaseException | None = None) -> None:
        """Enter failsafe mode because of ``what`` (logged with ``exc``'s traceback the first time only).
        Idempotent; no checkpoint."""
        if self.reason is not None:
            log.debug("failsafe mode already on; also: %s (%r)", what, exc)
            return
        self.reason = what if exc is None else f"{what}: {exc!r}"
        self.since = time.time()
        log.critical(
            "entering failsafe mode: %s. Background writes stopped; reads that verify are served, writes answer"
            " EIO. Unmount, fix the cause, mount again.",
            self.reason,
            exc_info=exc,
        )
        if self.marker is not None:
            try:
                self.marker.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {self.reason}\n")
            except OSError as err:
                log.error("cannot write %s: %s", self.marker, err)

    def check(self) -> None:
        """Raise ``Failsafe`` (EIO) when writes are refused."""
        if self.reason is not None:
            raise Failsafe(self.reason)

    def describe(self) -> str:
        """One line for status output ("" when healthy)."""
        if self.reason is None or self.since is None:
            return ""
        return f"failsafe mode since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}: {self.reason}"

    def clear_marker(self) -> str | None:
        """At start-up: remove a previous run's marker; return what it said."""
        if self.marker is None:
            return None
        try:
            text = self.marker.read_text().strip()
        except OSError:
            return None
        self.marker.unlink(missing_ok=True)
        return text


def is_fatal(exc: BaseException) -> bool:
    """Does ``exc`` mean the daemon cannot go on? True for a bug (anything ckptfs does not raise on
    purpose), metadata that cannot be written, and I/O errors of the cache disk; False for what a user
    or a full disk causes (those map to an errno and the daemon goes on)."""
    if isinstance(exc, sqlite3.Error):
        return "full" not in str(exc)  # SQLITE_FULL: a full disk (ENOSPC), not a broken one
    if isinstance(exc, OSError):
        return exc.errno in (errno.EIO, errno.EROFS)
    return not isinstance(exc, CkptfsError) or isinstance(exc, MetadataUnwritable)


async def guarded(health: Health, name: str, job: Callable[[], Awaitable[None]]) -> None:
    """Run a background job; an exception that escapes it puts the daemon in failsafe mode instead of
    ending it (cancellation passes through)."""
    try:
        await job()
    except Exception as exc:
        health.trip(f"{name} failed", exc)
