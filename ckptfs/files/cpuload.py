"""How many cores the rest of the machine keeps busy: the signal for work that can wait for real idle.

``SCHED_IDLE`` (``files.workers``) keeps background threads off a core the trainer wants, but not
out of the caches, the memory bus or a core's SMT sibling: measured on a 2-core machine with
``scripts/bench_train.py``, a CPU trainer still lost 30 % of its throughput (median) with compaction
on SCHED_IDLE threads, 11 % once compaction waited for this signal. Compaction is an
optimisation, so it waits until the others leave a core free. From ``/proc/stat`` (every process's
CPU time) minus this process's own (``/proc/self/stat``), over the time since the previous look.

The daemon counts only its idle-pool threads as its own (``thread_ticks``): the work that waits
for a free core must not count itself, but the daemon's FUSE loop serving a ``torch.save`` is
the trainer's work as much as the trainer's own thread is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def _proc_stat() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _ticks(stat: str) -> int:
    """User + system clock ticks from a ``/proc/.../stat`` line."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _own_ticks() -> int:
    """This process's user + system clock ticks (all threads)."""
    return _ticks(Path("/proc/self/stat").read_text())


def thread_ticks(tids: Iterable[int]) -> int:
    """User + system clock ticks of these threads of this process (one that has exited counts 0)."""
    total = 0
    for tid in tids:
        try:
            total += _ticks(Path(f"/proc/self/task/{tid}/stat").read_text())
        except (OSError, ValueError):
            pass
    return total


class CpuLoad:
    """``others_busy()``: cores other processes kept busy over the latest window of at least
    ``window_s`` (clock ticks are 10 ms: shorter windows are noise); 0.0 until the first window closes,
    and wherever ``/proc`` cannot be read (then nothing ever waits)."""

    def __init__(
        self,
        cores: int | None = None,
        window_s: float = 0.5,
        proc_stat: Callable[[], tuple[int, int]] = _proc_stat,
        own_ticks: Callable[[], int] = _own_ticks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = cores or os.cpu_count() or 1
        self.window_s = window_s
        self._proc_stat = proc_stat
        self._own_ticks = own_ticks
        self._clock = clock
        self._last: tuple[float, int, int, int] | None = None
        self._value = 0.0

    def others_busy(self) -> float:
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.window_s:
            return self._value
        try:
            busy, total = self._proc_stat()
            own = self._own_ticks()
        except (OSError, ValueError):
            return 0.0
        last, self._last = self._last, (now, busy, total, own)
        if last is None or total <= last[2]:
            return self._value
        wall = (total - last[2]) / self.cores  # ticks of one CPU in the window
        others = (busy - last[1]) - (own - last[3])
        self._value = max(0.0, min(float(self.cores), others / wall))
        return self._value

    def free_cores(self) -> float:
        return self.cores - self.others_busy()
