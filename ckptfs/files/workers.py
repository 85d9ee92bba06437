"""Worker-thread plumbing: limiters and thread priority, created once in ``daemon.py`` and passed down.

Threads run pure work (bytes in, values out) and never touch SQLite or shared dicts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import trio

T = TypeVar("T")
_CORE_POLL_S = 0.1  # how often background work waiting for a free core looks again


def _set_nice(nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        pass  # raising priority back needs CAP_SYS_NICE; a niced read thread is only slower


def _become_idle() -> None:
    """Initializer of the idle pool's threads: ``SCHED_IDLE`` for good (an unprivileged thread cannot
    leave it, which is why idle work has threads of its own instead of trio's shared ones)."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        _set_nice(19)


async def run_niced(limiter: trio.CapacityLimiter, nice: int, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in one of trio's worker threads at ``nice`` (set on every call: the threads are
    shared by every kind of work). Checkpoints; not cancellable mid-call."""

    def call() -> T:
        _set_nice(nice)
        return fn(*args)

    return await trio.to_thread.run_sync(call, limiter=limiter)


@dataclass(slots=True)
class Workers:
    """Capacity limiters and priorities: background CPU work (ingest: hash, encode; compaction, repack),
    background I/O (writing and fsyncing chunk files, durable marks, uploads: mostly waiting on the
    disk or the network, so it must not hold a CPU slot) and foreground work (reads a user waits for,
    fsync).

    Background CPU work runs ``SCHED_IDLE`` when ``idle`` is set (a trainer on the same cores keeps
    them), and does not start while ``no_core()`` says the other processes leave no core free: a
    SCHED_IDLE thread still takes the trainer's caches, memory bandwidth and SMT sibling, and the
    gaps a CPU trainer leaves are milliseconds long. Both unless ``urgent()`` says the backlog has
    grown too large to wait for idle cores (then it runs at ``nice`` like the I/O). Background I/O is
    never idle-scheduled: durable marks come due ``cache.durable_after_s`` after a close whatever the
    trainer does."""

    background: trio.CapacityLimiter
    foreground: trio.CapacityLimiter
    nice: int = 10
    io: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(4))
    idle: bool = False
    urgent: Callable[[], bool] = lambda: False
    no_core: Callable[[], bool] = lambda: False
    idle_threads: list[int] = field(default_factory=list)  # native ids of the SCHED_IDLE pool's threads
    _idle_pool: ThreadPoolExecutor | None = None

    @classmethod
    def create(cls, background_threads: int, nice: int, idle: bool = False) -> Workers:
        return cls(trio.CapacityLimiter(background_threads), trio.CapacityLimiter(8), nice, idle=idle)

    async def run_background(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a low-priority worker thread. Checkpoints; not cancellable mid-call."""
        while self.idle and not self.urgent():
            if not self.no_core():
                async with self.background:
                    return await self._run_idle(fn, *args)
            await trio.sleep(_CORE_POLL_S)
        return await self._run_niced(self.background, fn, *args)

    async def run_io(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` — background disk I/O — in a niced thread outside the CPU limiter."""
        return await self._run_niced(self.io, fn, *args)

    async def _run_niced(self, limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: object) -> T:
        return await run_niced(limiter, self.nice, fn, *args)

    async def _run_idle(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the ``SCHED_IDLE`` pool; like ``trio.to_thread.run_sync``, not cancellable
        while it runs."""
        if self._idle_pool is None:
            self._idle_pool = ThreadPoolExecutor(
                int(self.background.total_tokens), thread_name_prefix="ckptfs-idle", initializer=self._idle_thread
            )
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._idle_pool.submit(fn, *args)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()

    def _idle_thread(self) -> None:
        _become_idle()
        self.idle_threads.append(threading.get_native_id())

    async def run_foreground(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a normal-priority worker thread (reads a user waits for)."""
        return await run_niced(self.foreground, 0, fn, *args)
