"""Worker-thread plumbing: limiters and thread priority, created once in ``daemon.py`` and passed down.

Threads run pure work (bytes in, values out) and never touch SQLite or shared dicts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

T = TypeVar("T")


def _set_nice(nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        pass  # raising priority back needs CAP_SYS_NICE; a niced read thread is only slower


@dataclass(slots=True)
class Workers:
    """Capacity limiters for background CPU work (ingest: hash, encode), background I/O (writing and
    fsyncing chunk files: mostly waiting on the disk, so it must not hold a CPU slot) and foreground
    work (reads a user waits for, fsync)."""

    background: trio.CapacityLimiter
    foreground: trio.CapacityLimiter
    nice: int = 10
    io: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(4))

    @classmethod
    def create(cls, background_threads: int, nice: int) -> Workers:
        return cls(trio.CapacityLimiter(background_threads), trio.CapacityLimiter(8), nice)

    async def run_background(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a low-priority worker thread. Checkpoints; not cancellable mid-call."""
        return await self._run_niced(self.background, fn, *args)

    async def run_io(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` — background disk I/O — in a low-priority thread outside the CPU limiter."""
        return await self._run_niced(self.io, fn, *args)

    async def _run_niced(self, limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: object) -> T:
        nice = self.nice

        def call() -> T:
            _set_nice(nice)
            return fn(*args)

        return await trio.to_thread.run_sync(call, limiter=limiter)

    async def run_foreground(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a normal-priority worker thread (reads a user waits for)."""

        def call() -> T:
            _set_nice(0)
            return fn(*args)

        return await trio.to_thread.run_sync(call, limiter=self.foreground)
