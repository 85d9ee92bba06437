"""Shared/exclusive gate between ingest jobs (shared) and delta-tree repacks (exclusive).

Ingest reads bases and depths and codes new chunks against them; a repack moves bases and depths.
Ingest has priority: a repack waits until no ingest runs, and new ingests only wait for the repack
already running (one tree, a few pieces). Trio thread only; the counters change between checkpoints.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class Gate:
    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive:
            await self._changed.wait()
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            self._notify()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while self._exclusive or self._shared:
            await self._changed.wait()
        self._exclusive = True
        try:
            yield
        finally:
            self._exclusive = False
            self._notify()
